"""
Train an LVLM on image-caption data with NTP or PRIOR: the tutorial's last file.

    python train.py                                   # U-LVLM + PRIOR on built-in shapes (CPU: minutes)
    python train.py configs/shapes_h.py --loss=ntp    # H-LVLM (ViT encoder) with plain NTP
    torchrun --standalone --nproc_per_node=4 train.py # DDP on 4 GPUs (or CPU processes, gloo)

Read top to bottom: the model as configured -> what the loss reads besides the logits -> one step ->
the job: set-up (processes, data, the reference, model, optimiser, resume), the loop (steps, logs,
validation, checkpoints), the finish (curves, test metrics). Settings: config.py; what a run writes
and how it survives faults and signals: runs/.
"""

import runs.startup  # noqa: F401  (first of all: a signal while the imports below load ends in one line)

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from config import absolute_paths, as_dict, load_config, settings_help
from data import global_batch, load_splits, make_loader, make_vocab, micro_batches, step_token_count, text_width
from encoder import ensure_encoder, load_encoder_into
import eval as evaluation
from metrics.report import format_table, sample_report, val_summary
from model import LVLM, gpt_config
from pretrained.features import caches_features, use_cached_features
from pretrained.gpt2 import load_gpt2_into
from pretrained.vision import pretrained_vision
from prior_loss import LOSSES, objective
from reference import ensure_reference, load_reference, reference_path
from runs.caches import cache_root, captions_fingerprint, image_digests, images_fingerprint
from runs.cli import cli
from runs.devices import (barrier, device_peak_flops, grad_scaler, precision_context, resolve_device,
                          resolve_precision, setup_processes, to_device, wrap)
from runs.early_stop import EarlyStop, best_path
from runs.errors import ConfigError
from runs.files import (append_log, atomic_write, check_out_dir, checkpoint_path, claim_dir, load_checkpoint,
                        save_checkpoint, start_log, weights_digest)
from runs.optim import lr_at, make_optimizer, optimizer_step, set_lr
from runs.plots import plot_run
from runs.progress import Throughput, hms, parameter_counts, train_flops, wandb_run
from runs.reference_files import keep_reference, restore_reference
from runs.resume import check_resume, restore_rng, resume
from runs.stopping import FiniteGuard, StopOnSignal
from sources.images import report_broken
from sources.shapes import RELEVANT


def build_model(cfg, vocab, device, ref_ckpt=None, vision_ckpt=None):
    """The LVLM with its LM and vision encoder initialised as cfg.init_lm and cfg.init_vision
    say, and parts frozen as asked."""
    torch.manual_seed(cfg.seed)                  # same seed -> same init for every loss
    model = LVLM(cfg, gpt_config(cfg, vocab))
    if cfg.init_vision in ('clip', 'words'):
        load_encoder_into(model.vision, vision_ckpt)
    elif cfg.init_vision == 'pretrained':
        model.vision = pretrained_vision(cfg)
    if cfg.init_lm == 'ref':
        ref, ref_vocab, _ = load_reference(ref_ckpt, 'cpu')
        if ref_vocab.gpt2_ids != vocab.gpt2_ids:
            raise ConfigError(f"reference {ref_ckpt} was trained with another vocabulary")
        model.lm.load_state_dict(ref.state_dict())
    elif cfg.init_lm == 'gpt2':
        load_gpt2_into(model.lm, cfg.gpt2_model)
    for part, frozen in ((model.lm, cfg.freeze_lm), (model.vision, cfg.freeze_vision)):
        part.requires_grad_(not frozen)
    return model.to(device)


def target_weights_source(cfg, ref_probs, device):
    """What the objective reads besides the targets, per micro-batch, as (rows, idx, targets, classes) ->
    [B,T] or None: the cached P_r rows; for the ceilings, a P_r from the true token classes (oracle: 1
    on every non-visual token, so weight 0 there; label: 1/2, so relevant tokens weigh twice); or None (NTP)."""
    if LOSSES[cfg.loss].reads_reference:
        return lambda rows, idx, targets, classes: to_device(
            torch.from_numpy(ref_probs[rows.numpy(), :targets.size(1)]), device)
    if LOSSES[cfg.loss].needs_classes:
        p_other = 1.0 if cfg.loss == 'oracle' else 0.5
        return lambda rows, idx, targets, classes: (classes != RELEVANT).float() * p_other
    return lambda rows, idx, targets, classes: None


def train_step(cfg, model, raw_model, optimizer, data, batches, step, ref_probs_of, loss_fn=objective,
               device='cpu', ctx=contextlib.nullcontext(), world=1, scaler=None):
    """One iteration: cfg.grad_accum micro-batches, then one clipped AdamW update (loss-scaled under fp16).
    Returns (the step's loss and the gradient norm before clipping, as device tensors, lr, FLOPs, tokens)
    of this process; the loss is NaN if the gradient was not finite (fp16's GradScaler skips such steps).
    Nothing here waits for the device."""
    lr = lr_at(step, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters or cfg.max_iters, cfg.min_lr_ratio)
    set_lr(optimizer, lr)
    # Every micro-batch divides by the caption tokens of the whole step, so the step's loss
    # (and gradient) is the global token mean however the batch is cut into micro-batches.
    n_tokens = step_token_count(data, global_batch(cfg, world), step, cfg.seed)
    loss_sum, flops, tokens = torch.zeros((), device=device), 0.0, 0
    for micro in range(cfg.grad_accum):
        images, rows = next(batches)
        T = text_width(data.targets[rows])       # drop the columns that are padding in every row (host side)
        images, idx, targets, classes = data.batch(rows, device, images)
        idx, targets, classes = idx[:, :T], targets[:, :T], classes[:, :T]
        ref_probs = ref_probs_of(rows, idx, targets, classes)     # copied before the forward is queued
        if isinstance(model, DDP):               # all-reduce gradients on the last micro-step only
            model.require_backward_grad_sync = micro == cfg.grad_accum - 1
        with ctx:
            logits = model(images, idx)
        loss = loss_fn(cfg, logits, targets, ref_probs, n_tokens)
        scaled = loss * world                    # DDP averages gradients over processes: undo it
        (scaled if scaler is None else scaler.scale(scaled)).backward()
        loss_sum += loss.detach()
        flops += train_flops(raw_model, T, with_vision=images.dim() == 4) * len(rows)
        tokens += (raw_model.n_prefix + T) * len(rows)
    grad_norm = optimizer_step(raw_model, optimizer, cfg.grad_clip, scaler)
    if scaler is None:
        loss_sum = torch.where(torch.isfinite(grad_norm), loss_sum, torch.nan)
    return loss_sum, grad_norm, lr, flops, tokens


def validate(cfg, model, val_data, vocab, device, ctx, step, record, log, reference=None):
    rows = torch.arange(min(len(val_data), cfg.eval_batches * cfg.batch_size))
    m = evaluation.teacher_forced_metrics(model, val_data, vocab, rows, device, ctx=ctx)
    line = val_summary(m)
    if cfg.stop_on == 'retrieval_ratio_r1':      # photos: the headline metric itself, on the split's first 200 images
        m.update(evaluation.retrieval_metrics(model, val_data, device, ctx=ctx,
                                              ref_probs=evaluation.reference_probs(reference, val_data, device)))
        line += f", ratio R@1 {m['retrieval_ratio_r1']:.3f}"
    record({'step': step, **{f'val_{k}': v for k, v in m.items()}})
    log(f"step {step}: {line}")
    if cfg.patience and cfg.stop_on != 'loss' and m[cfg.stop_on] != m[cfg.stop_on]:     # NaN: nothing to score
        raise ConfigError(f"stop_on {cfg.stop_on!r}: val has nothing to score it on ({len(rows)} captions an "
                          "evaluation, or under 10 images; raise eval_batches or n_val, or stop on 'loss')")
    return m


@dataclass
class Job:
    """A training job once it is set up (see setup): where it runs, what it reads, what it trains."""
    cfg: object
    log: object
    ddp: bool                       # under torchrun: process `rank` of `world`, one per device
    device: str
    rank: int
    world: int
    ctx: object                     # autocast for cfg.precision, or a null context
    scaler: object                  # fp16's GradScaler, or None
    tracker: object                 # a Weights & Biases run, or None
    splits: dict
    vocab: object
    ref_ckpt: str                   # the reference's file, its cached P_r [N, T] of the training captions,
    ref_probs: object               # and its weights for the final eval (None, None, None without one)
    reference: dict
    model: object                   # what trains: raw_model, compiled and/or DDP-wrapped
    raw_model: object
    optimizer: object
    inputs: dict                    # the training captions', images' and reference's digests
    early: EarlyStop                # the best val `stop_on` so far, with patience > 0 (runs/early_stop.py)
    step: int = 0
    saved_step: int = None          # the last checkpoint written (or resumed from)
    t_start: float = 0.0            # when this part of the run began (a resume is a new part),
    wall_before: tuple = ()         # and the seconds of the parts before it, up to their last checkpoint

    def wall_parts(self):
        return [*self.wall_before, time.time() - self.t_start]

    def record(self, entry):        # one log.jsonl line (and W&B point)
        append_log(os.path.join(self.cfg.out_dir, 'log.jsonl'), entry)
        if self.tracker:
            self.tracker.log({k: v for k, v in entry.items() if k != 'step'}, step=entry['step'])

    def save(self, path=None):
        """This step's checkpoint (or, at `path`, a copy such as best.pt). The run folder is self-contained:
        eval.py needs no other file (reference.pt, written once) and no working directory."""
        cuda = str(self.device).startswith('cuda')
        save_checkpoint({'model': self.raw_model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                         'scaler': self.scaler.state_dict() if self.scaler else None, 'config': as_dict(self.cfg),
                         'model_args': vars(self.raw_model.lm.config), 'vocab': self.vocab.state(), 'step': self.step,
                         'data_position': self.step * global_batch(self.cfg, self.world), **self.inputs,
                         'ref_ckpt': self.ref_ckpt,
                         'rng': {'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if cuda else None},
                         'wall_parts_s': self.wall_parts(),
                         **({'early_stop': self.early.state()} if self.cfg.patience else {})},
                        path or checkpoint_path(self.cfg.out_dir))
        if path is None:
            self.saved_step = self.step


def train(cfg, log=print, loss_fn=objective):
    """Run one training job as configured; returns the final test metrics (master) or None.
    `loss_fn` has prior_loss.objective's signature: a loss variant under study goes in here.
    One run per out_dir at a time: the master holds a lock on it until it returns or dies.
    SIGTERM or SIGINT stops it cleanly (runs/stopping.py): a checkpoint, then Interrupted."""
    cfg = absolute_paths(cfg)                    # a checkpoint's paths mean the same from anywhere
    master = int(os.environ.get('RANK', 0)) == 0
    resolve_precision(resolve_device(cfg.device), cfg.precision)    # refused before out_dir is claimed
    with StopOnSignal() as stopper, claim_dir(cfg.out_dir) if master else contextlib.nullcontext():
        stopper.where = "before training began (" + ("its checkpoint is as it was)" if cfg.resume else
                                                     "no checkpoint of this run yet)")
        if master:
            check_out_dir(cfg)
        world = int(os.environ.get('WORLD_SIZE', 1))
        ckpt, cfg = check_resume(cfg, checkpoint_path(cfg.out_dir), global_batch(cfg, world))
        t_start = time.time()
        job = setup(cfg, log, ckpt)
        job.t_start, job.wall_before = t_start, tuple(ckpt.get('wall_parts_s', ())) if ckpt else ()
        train_loop(job, loss_fn, stopper, ckpt)
        stopper.where = f"after the last step ({checkpoint_path(cfg.out_dir)} is complete; the final " \
                        f"evaluation did not finish)"
        return finish(job)


def setup(cfg, log, ckpt):
    """Processes and devices, the data, the reference (and a pretrained encoder), the model and its
    optimiser, resumed from `ckpt` if there is one: the Job, ready for its first step."""
    ddp, device, rank, world = setup_processes(cfg)
    log = log if rank == 0 else (lambda *a, **k: None)
    tracker = wandb_run(cfg, as_dict(cfg)) if rank == 0 else None
    log(f"config: {json.dumps(as_dict(cfg))}")
    t0 = time.time()
    splits = load_splits(cfg)
    vocab = make_vocab(cfg, splits['train'])
    for data in splits.values():
        data.encode(vocab)
    train_data = splits['train']
    log(f"data: {', '.join(f'{k} {len(v)}' for k, v in splits.items())} captions, vocab {vocab.size}, "
        f"{time.time() - t0:.1f}s")
    ref_ckpt = ref_probs = vision_ckpt = reference = None
    if LOSSES[cfg.loss].reads_reference or cfg.init_lm == 'ref':
        if ckpt is not None and rank == 0:
            restore_reference(cfg, reference_path(cfg, train_data, vocab))
        ref_ckpt, ref_probs = ensure_reference(cfg, train_data, vocab, device, log, rank == 0,
                                               scored=LOSSES[cfg.loss].reads_reference)
        reference = {k: v for k, v in load_checkpoint(ref_ckpt).items() if k in ('model', 'model_args', 'vocab')}
    if cfg.init_vision in ('clip', 'words'):
        vision_ckpt = ensure_encoder(cfg, train_data, vocab, device, log, rank == 0, splits['val'])
    model = build_model(cfg, vocab, device, ref_ckpt, vision_ckpt)
    optimizer = make_optimizer(model, cfg.learning_rate, cfg)
    log(f"model: {cfg.arch.upper()}-LVLM, {parameter_counts(model)}, {model.n_prefix} image tokens")
    scaler = grad_scaler(device, cfg.precision)
    inputs = {'data_fingerprint': captions_fingerprint(train_data), 'image_fingerprint': images_fingerprint(train_data),
              'eval_image_fingerprint': [images_fingerprint(splits[k]) for k in ('val', 'test')],
              'reference_sha256': reference and weights_digest(reference['model']),
              'image_digests': {k: image_digests(v) for k, v in splits.items()}}     # to name what changed
    step = resume(ckpt, model, optimizer, scaler, inputs, log, checkpoint_path(cfg.out_dir), cfg, splits)
    if caches_features(cfg):                     # the resumed weights' features; flip_view: a mirrored view too
        use_cached_features(splits, model.vision, device, cache_root(cfg), log, rank == 0,
                            flip=('train',) if cfg.flip_view else ())
        if cfg.flip_view and ref_probs is not None:
            ref_probs = np.concatenate([ref_probs, ref_probs])   # the second view's rows: the same captions
    if rank == 0:
        start_log(os.path.join(cfg.out_dir, 'log.jsonl'), step)
        if ref_ckpt:
            keep_reference(ref_ckpt, cfg.out_dir)
    wrapped = wrap(model, cfg.compile, ddp, device)
    early = EarlyStop(cfg.patience, cfg.stop_on, ckpt.get('early_stop') if ckpt else None)
    return Job(cfg, log, ddp, device, rank, world, precision_context(device, cfg.precision), scaler, tracker, splits,
               vocab, ref_ckpt, ref_probs, reference, wrapped, model, optimizer, inputs, early, step,
               saved_step=step if ckpt else None)


def train_loop(job, loss_fn, stopper, ckpt):
    """The steps from job.step to cfg.max_iters (or an early stop, with patience): a log line every
    log_interval steps, validation every eval_interval, a checkpoint every ckpt_interval and at the end."""
    cfg, log, device, cuda = job.cfg, job.log, job.device, str(job.device).startswith('cuda')
    ckpt_path = checkpoint_path(cfg.out_dir)
    peak, n = device_peak_flops(device), global_batch(cfg, job.world)
    log(f"tokens per iteration: {n} captions x ({job.raw_model.n_prefix} image + <= {cfg.block_size} text) = global "
        f"batch {n} ({cfg.batch_size} x {cfg.grad_accum} accum x {job.world} proc); "
        f"{resolve_precision(device, cfg.precision)}; peak {peak / 1e12 if peak else float('nan'):.2f} TFLOP/s")
    if job.step == 0 and job.rank == 0:
        validate(cfg, job.raw_model, job.splits['val'], job.vocab, device, job.ctx, 0, job.record, log,
                 job.reference)
    job.model.train()
    train_data = job.splits['train']
    batches = iter(make_loader(train_data, micro_batches(len(train_data), cfg, job.world, job.rank, job.step,
                                                         cfg.max_iters), cfg.num_workers, cuda))
    if ckpt is not None:
        restore_rng(ckpt, cuda)
    ref_probs_of = target_weights_source(cfg, job.ref_probs, device)
    meter, guard = Throughput(device, job.world, cfg.max_iters, job.step), FiniteGuard(cfg.max_iters, device)
    stopper.deferring = True                     # from here a signal ends the run after the step in progress
    stopper.where = f"a second time, at once ({ckpt_path} is the last checkpoint written)"
    while job.step < cfg.max_iters and not job.early.done:
        loss_sum, grad_norm, lr, flops, tokens = train_step(cfg, job.model, job.raw_model, job.optimizer, train_data,
                                                            batches, job.step, ref_probs_of, loss_fn, device, job.ctx,
                                                            job.world, job.scaler)
        job.step += 1
        meter.add(flops, tokens)
        guard.note(loss_sum, job.step)
        if job.step % cfg.log_interval == 0 or job.step == cfg.max_iters:
            if job.ddp:
                dist.all_reduce(loss_sum)        # the processes' parts of the step's loss
            loss_val = loss_sum.item()           # syncs the device, so the timing is real
            guard.check(job.saved_step, ckpt_path)
            line, entry = meter.report(job.step, loss_val, lr, grad_norm.item())
            log(line)
            if job.rank == 0:
                job.record(entry)
        do_eval = job.step % cfg.eval_interval == 0 or job.step == cfg.max_iters
        do_save = (cfg.ckpt_interval and job.step % cfg.ckpt_interval == 0) or job.step == cfg.max_iters
        if do_eval or do_save:
            guard.check(job.saved_step, ckpt_path)   # on every process: the same answer (gradients are all-reduced)
        if job.rank == 0 and (do_eval or do_save):
            with meter.paused():                 # evaluation and checkpoints are not training time
                validate_and_save(job, do_eval, do_save)
        if do_eval and cfg.patience and job.early.everyone_stops(job.device, job.ddp):
            job.saved_step = job.step            # (the master saved where it stopped)
            break
        job.saved_step = job.step if do_save else job.saved_step      # (the master wrote it)
        stopper.stop_if_requested(job.step, ckpt_path, lambda: guard.check(job.saved_step, ckpt_path),
                                  job.save if job.rank == 0 and not do_save else None)
    stopper.deferring = False
    report_broken(train_data.images, log)


def validate_and_save(job, do_eval, do_save):
    """The master's work at an eval or checkpoint step. With patience: best.pt when val `stop_on` is the
    best so far, and a checkpoint where an early stop ends the run."""
    cfg = job.cfg
    if do_eval:
        m = validate(cfg, job.raw_model, job.splits['val'], job.vocab, job.device, job.ctx, job.step, job.record,
                     job.log, job.reference)
        if cfg.patience and job.early.improved(job.step, m[cfg.stop_on]):
            job.save(best_path(cfg.out_dir))
        if job.early.done:
            job.log(f"early stop at step {job.step}: no better val {cfg.stop_on} in {cfg.patience} evaluations since "
                    f"step {job.early.best_step} ({job.early.best:.4f}); best.pt holds those weights")
            do_save = True
    if do_save:
        job.save()


def finish(job):
    """Curves and the test metrics (master), then every process leaves together. Returns the metrics or None."""
    cfg, log, results = job.cfg, job.log, None
    if job.rank == 0:
        plot_run(os.path.join(cfg.out_dir, 'log.jsonl'), os.path.join(cfg.out_dir, 'loss.png'))
        if cfg.final_eval:
            if cfg.patience:                     # the weights of the best val value
                job.raw_model.load_state_dict(load_checkpoint(best_path(cfg.out_dir))['model'])
            test = job.splits['test']
            results, captions = evaluation.evaluate(job.raw_model, test, job.vocab, job.device, ctx=job.ctx,
                                                    reference=job.reference, beam=cfg.beam,
                                                    length_penalty=cfg.length_penalty)
            if cfg.patience:
                results['best_step'] = job.early.best_step
            atomic_write(os.path.join(cfg.out_dir, 'eval_test.json'),
                         lambda f: f.write(json.dumps(results, indent=1).encode()))
            how = 'greedy' if cfg.beam == 1 else f'beam {cfg.beam}'
            log(f'\nsample captions ({how}, test):\n' + sample_report(captions, test))
            log(f"\ntest metrics ({cfg.arch.upper()}-LVLM, {cfg.loss}):\n{format_table({cfg.loss: results})}")
        log(f"outputs in {cfg.out_dir}: ckpt.pt, log.jsonl, loss.png" + (', eval_test.json' if cfg.final_eval else ''))
        parts = job.wall_parts()
        job.record({'step': job.step, 'wall_s': sum(parts), 'wall_parts_s': parts})
        log(f"wall time {hms(sum(parts))}" + (f" over {len(parts)} parts ({', '.join(map(hms, parts))})"
                                               if len(parts) > 1 else ''))
        if job.tracker:
            job.tracker.finish()
    barrier()                                    # the other processes wait while rank 0 evaluates
    if job.ddp:
        dist.destroy_process_group()
    return results


if __name__ == '__main__':
    cli(lambda argv: train(load_config(argv)), sys.argv[1:], __doc__, settings_help())
