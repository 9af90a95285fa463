"""
Train an LVLM on image-caption data with NTP or PRIOR.

    python train.py                                   # U-LVLM + PRIOR on built-in shapes (CPU: minutes)
    python train.py configs/shapes_h.py --loss=ntp    # H-LVLM (ViT encoder) with plain NTP
    torchrun --standalone --nproc_per_node=4 train.py # DDP on 4 GPUs (or CPU processes, gloo)

Read top to bottom: settings -> processes and devices -> data and the reference -> model and
optimiser -> resume -> the loop (train_step, logs, validation, checkpoints) -> the finish
(curves, test metrics). Every setting and its default is in config.py.
"""

import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import config as config_mod
import eval as evaluation
from checkpoint import (append_log, atomic_write, cache_root, check_out_dir, claim_dir, load_checkpoint,
                        load_hf_gpt2_into, save_checkpoint, start_log, weights_digest)
from config import ConfigError, Diverged, Interrupted
from data import load_splits, make_loader, make_vocab, micro_batches, step_token_count, text_width, to_device
from device import (barrier, device_peak_flops, grad_scaler, peak_memory, precision_context, resolve_device,
                    resolve_precision, setup_processes)
from encoder import caches_features, ensure_encoder, load_encoder_into, pretrained_vision, use_cached_features
from images import ImageFiles
from model import LVLM, gpt_config
from optim import lr_at, make_optimizer, optimizer_step, set_lr
from plot import plot_run
from prior_loss import gain_loss, ntp_loss, prior_loss
from progress import Progress, hms
from reference import ensure_reference, load_reference
from resume import check_resume, keep_reference, restore_reference, restore_rng, resume
from shapes import CLASS_NAMES, RELEVANT
from stopping import StopOnSignal

REFERENCE_LOSSES = ('prior', 'gain', 'prior_gain')        # the objectives that read the reference's P_r


def objective(cfg, logits, targets, ref_probs=None, n_tokens=None):
    """The training loss: NTP without reference probabilities; else 'gain' or 'prior_gain' (prior_loss.py),
    or PRIOR with cfg's alpha and weight floor (also the oracle and label ceilings, whose P_r stand-in
    comes from the true token classes). n_tokens: caption tokens of the whole step, when this is one
    micro-batch of it."""
    if ref_probs is None:
        return ntp_loss(logits, targets, n_tokens)
    if cfg.loss in ('gain', 'prior_gain'):
        return gain_loss(logits, targets, ref_probs, cfg.loss, cfg.alpha, n_tokens)
    return prior_loss(logits, targets, ref_probs, cfg.alpha, cfg.weight_floor, n_tokens)


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
        load_hf_gpt2_into(model.lm, cfg.gpt2_model)
    for part, frozen in ((model.lm, cfg.freeze_lm), (model.vision, cfg.freeze_vision)):
        part.requires_grad_(not frozen)
    return model.to(device)


def target_weights_source(cfg, ref_probs, device):
    """What the objective reads besides the targets, per micro-batch: the cached P_r rows for
    PRIOR and the gain losses; for the ceilings, a P_r made from the true token classes: the
    oracle's (P_r = 1 on every non-visual token: weight 1 on image-relevant tokens, 0 elsewhere)
    and the label ceiling's (P_r = 1/2 on non-visual tokens: relevant tokens weigh twice the
    others, which keep NTP's share); nothing for NTP. A function (rows, idx, targets, classes) -> [B,T] or None."""
    if cfg.loss in REFERENCE_LOSSES:
        return lambda rows, idx, targets, classes: to_device(
            torch.from_numpy(ref_probs[rows.numpy(), :targets.size(1)]), device)
    if cfg.loss in ('oracle', 'label'):
        p_other = 1.0 if cfg.loss == 'oracle' else 0.5
        return lambda rows, idx, targets, classes: (classes != RELEVANT).float() * p_other
    return lambda rows, idx, targets, classes: None


def train_step(cfg, model, raw_model, optimizer, data, batches, step, ref_probs_of, loss_fn=objective,
               device='cpu', ctx=contextlib.nullcontext(), world=1, scaler=None):
    """One iteration: cfg.grad_accum micro-batches, then one clipped AdamW update (loss-scaled with an
    fp16 GradScaler). Returns (the step's loss as a device tensor, lr, FLOPs, tokens) of this process; the
    loss is NaN if the gradient was not finite (with fp16, the GradScaler skips such steps instead).
    Nothing here waits for the device: the host queues the step and goes on to prepare the next."""
    lr = lr_at(step, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters or cfg.max_iters, cfg.min_lr_ratio)
    set_lr(optimizer, lr)
    # Every micro-batch divides by the caption tokens of the whole step, so the step's loss
    # (and gradient) is the global token mean however the batch is cut into micro-batches.
    n_tokens = step_token_count(data, cfg.batch_size * cfg.grad_accum * world, step, cfg.seed)
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
        flops += raw_model.flops_per_sample(T, with_vision=images.dim() == 4) * len(rows)
        tokens += (raw_model.n_prefix + T) * len(rows)
    grad_norm = optimizer_step(raw_model, optimizer, cfg.grad_clip, scaler)
    if scaler is None:
        loss_sum = torch.where(torch.isfinite(grad_norm), loss_sum, torch.nan)
    return loss_sum, lr, flops, tokens


def validate(cfg, model, val_data, vocab, device, ctx, step, record, log):
    rows = torch.arange(min(len(val_data), cfg.eval_batches * cfg.batch_size))
    m = evaluation.teacher_forced_metrics(model, val_data, vocab, rows, device, ctx=ctx)
    record({'step': step, **{f'val_{k}': v for k, v in m.items()}})
    classes = ', '.join(f"{c} {m[f'loss_{c}']:.3f}" for c in CLASS_NAMES if not math.isnan(m[f'loss_{c}']))
    attr = '' if math.isnan(m['attr_acc']) else f", attr_acc {m['attr_acc']:.3f}"   # NaN: no attributes
    log(f"step {step}: val loss {m['loss']:.4f}" + (f" ({classes})" if classes else '') + attr)


def wandb_run(cfg):
    """A Weights & Biases run (--wandb_project), or None; wandb is imported only when asked for."""
    if not cfg.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb_project needs the wandb package (pip install wandb)") from None
    return wandb.init(project=cfg.wandb_project, name=os.path.basename(os.path.normpath(cfg.out_dir)),
                      config=config_mod.as_dict(cfg))


def train(cfg, log=print, loss_fn=objective):
    """Run one training job as configured; returns the final test metrics (master) or None.
    `loss_fn` has objective()'s signature: a loss variant under study goes in here (see README).
    One run per out_dir at a time: the master holds a lock on it until it returns or dies.
    SIGTERM or SIGINT stops it cleanly (stopping.py): a checkpoint, then Interrupted."""
    cfg = config_mod.absolute_paths(cfg)         # a checkpoint's paths mean the same from anywhere
    master = int(os.environ.get('RANK', 0)) == 0
    resolve_precision(resolve_device(cfg.device), cfg.precision)    # refused before out_dir is claimed
    with StopOnSignal() as stopper, claim_dir(cfg.out_dir) if master else contextlib.nullcontext():
        stopper.where = "before training began (" + ("its checkpoint is as it was)" if cfg.resume else
                                                     "no checkpoint of this run yet)")
        if master:
            check_out_dir(cfg)
        global_batch = cfg.batch_size * cfg.grad_accum * int(os.environ.get('WORLD_SIZE', 1))
        ckpt, cfg = check_resume(cfg, os.path.join(cfg.out_dir, 'ckpt.pt'), global_batch)
        return run_training(cfg, log, loss_fn, ckpt, stopper)


def run_training(cfg, log, loss_fn, ckpt, stopper):
    """The job itself, in its out_dir (see train)."""
    # ---- processes and devices ----
    t_start = time.time()
    ddp, device, rank, world = setup_processes(cfg)
    master = rank == 0
    log = log if master else (lambda *a, **k: None)
    cuda = str(device).startswith('cuda')
    ctx, scaler = precision_context(device, cfg.precision), grad_scaler(device, cfg.precision)
    tracker = wandb_run(cfg) if master else None
    log(f"config: {json.dumps(config_mod.as_dict(cfg))}")

    # ---- data, vocabulary, reference ----
    t0 = time.time()
    splits = load_splits(cfg)
    vocab = make_vocab(cfg, splits['train'])
    for data in splits.values():
        data.encode(vocab)
    train_data = splits['train']
    log(f"data: {', '.join(f'{k} {len(v)}' for k, v in splits.items())} captions, vocab {vocab.size}, "
        f"{time.time() - t0:.1f}s")
    ref_ckpt = ref_probs = vision_ckpt = reference = None
    if cfg.loss in REFERENCE_LOSSES or cfg.init_lm == 'ref':      # scores needed by those losses only
        if ckpt is not None and master:
            restore_reference(cfg, train_data)
        ref_ckpt, ref_probs = ensure_reference(cfg, train_data, vocab, device, log, master, cfg.loss in REFERENCE_LOSSES)
        reference = {k: v for k, v in load_checkpoint(ref_ckpt).items() if k in ('model', 'model_args', 'vocab')}
    if cfg.init_vision in ('clip', 'words'):
        vision_ckpt = ensure_encoder(cfg, train_data, vocab, device, log, master, splits['val'])

    # ---- model, optimiser, resume ----
    model = raw_model = build_model(cfg, vocab, device, ref_ckpt, vision_ckpt)
    optimizer = make_optimizer(model, cfg.learning_rate, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {cfg.arch.upper()}-LVLM, {n_params / 1e6:.2f}M parameters ({n_trained / 1e6:.2f}M trained), "
        f"{model.n_prefix} image tokens")
    global_batch = cfg.batch_size * cfg.grad_accum * world
    ckpt_path, log_path = os.path.join(cfg.out_dir, 'ckpt.pt'), os.path.join(cfg.out_dir, 'log.jsonl')
    inputs = {'data_fingerprint': train_data.fingerprint(), 'image_fingerprint': train_data.image_fingerprint(),
              'reference_sha256': reference and weights_digest(reference['model'])}
    step = resume(ckpt, model, optimizer, scaler, inputs, log, ckpt_path, cfg)
    if caches_features(cfg):
        use_cached_features(splits, raw_model.vision, device, cache_root(cfg), log, master)   # the resumed weights'
    if master:
        start_log(log_path, step)
        if ref_ckpt:
            keep_reference(ref_ckpt, cfg.out_dir)
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[torch.cuda.current_device()] if cuda else None)

    def record(entry):                           # one log.jsonl line (and W&B point)
        append_log(log_path, entry)
        if tracker:
            tracker.log({k: v for k, v in entry.items() if k != 'step'}, step=entry['step'])

    saved_step = step if ckpt else None          # the last checkpoint written (or resumed from)

    def save():
        # The run folder is self-contained: eval.py needs no other file (reference.pt, once) and no working directory.
        save_checkpoint({'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
                         'scaler': scaler.state_dict() if scaler else None,
                         'config': config_mod.as_dict(cfg), 'model_args': vars(raw_model.lm.config),
                         'vocab': vocab.state(), 'step': step, 'data_position': step * global_batch,
                         **inputs, 'ref_ckpt': ref_ckpt,
                         'rng': {'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if cuda else None}},
                        ckpt_path)

    def check_finite():
        # Read where the loop waits for the device anyway; the bad weights are never saved.
        bad = int(first_bad)
        if bad <= cfg.max_iters:
            kept = f"the last good checkpoint, step {saved_step}, is {ckpt_path}" if saved_step is not None else \
                "no checkpoint was written before it"
            raise Diverged(f"the loss or gradient became NaN or infinite at step {bad}; stopped without saving; "
                           f"{kept} (a lower --learning_rate or a --grad_clip may help)")

    # ---- the training loop ----
    peak = device_peak_flops(device)
    log(f"tokens per iteration: {global_batch} captions x ({raw_model.n_prefix} image + <= {cfg.block_size} text)"
        f" = global batch {global_batch} ({cfg.batch_size} x {cfg.grad_accum} accum x {world} proc); "
        f"{resolve_precision(device, cfg.precision)}; peak {peak / 1e12 if peak else float('nan'):.2f} TFLOP/s")
    if step == 0 and master:
        validate(cfg, raw_model, splits['val'], vocab, device, ctx, step, record, log)
    model.train()
    batches = iter(make_loader(train_data, micro_batches(len(train_data), cfg.batch_size, cfg.grad_accum, world,
                                                         rank, cfg.seed, step, cfg.max_iters), cfg.num_workers, cuda))
    if ckpt is not None:
        restore_rng(ckpt, cuda)
    ref_probs_of = target_weights_source(cfg, ref_probs, device)
    progress = Progress(cfg.max_iters, done=step)
    t_last, flops_since, tokens_since, iters = time.time(), 0.0, 0, 0
    first_bad = torch.tensor(cfg.max_iters + 1, device=device)      # the first non-finite step, on the device
    stopper.deferring = True                     # from here a signal ends the run after the step in progress
    stopper.where = f"a second time, at once ({ckpt_path} is the last checkpoint written)"
    while step < cfg.max_iters:
        loss_sum, lr, flops, tokens = train_step(cfg, model, raw_model, optimizer, train_data, batches, step,
                                                 ref_probs_of, loss_fn, device, ctx, world, scaler)
        step, iters, flops_since, tokens_since = step + 1, iters + 1, flops_since + flops, tokens_since + tokens
        first_bad = torch.where(torch.isfinite(loss_sum) | (first_bad <= cfg.max_iters), first_bad, step)
        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            if ddp:
                dist.all_reduce(loss_sum)                  # the processes' parts of the step's loss
            loss_val = loss_sum.item()                     # syncs the device, so timing is real
            check_finite()
            dt = time.time() - t_last
            peak = device_peak_flops(device, flops_since / dt)
            mfu = flops_since / dt / peak if peak else float('nan')        # this process on its device
            mem = peak_memory(cuda) / 2 ** 20
            log(f"iter {progress.line(step)}: loss {loss_val:.4f}, lr {lr:.2e}, {1000 * dt / iters:.0f} ms/iter, "
                f"{tokens_since * world / dt:,.0f} tok/s, MFU {100 * mfu:.1f}%, peak mem {mem:,.0f} MiB")
            if master:
                record({'step': step, 'train_loss': loss_val, 'lr': lr, 'ms_per_iter': 1000 * dt / iters,
                        'mfu': mfu, 'peak_mem_mib': mem})
            t_last, flops_since, tokens_since, iters = time.time(), 0.0, 0, 0
        do_eval = step % cfg.eval_interval == 0 or step == cfg.max_iters
        do_save = (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or step == cfg.max_iters
        if do_eval or do_save:
            check_finite()                       # on every process: the same answer (gradients are all-reduced)
        if master and (do_eval or do_save):
            if cuda:
                torch.cuda.synchronize()         # the step's queued GPU work is training time
            t_pause = time.time()
            if do_eval:
                validate(cfg, raw_model, splits['val'], vocab, device, ctx, step, record, log)
            if do_save:
                save()
            t_last += time.time() - t_pause      # evaluation and checkpoints are not training time
        saved_step = step if do_save else saved_step       # (the master wrote it)
        if stopper.requested():                  # the same answer on every process: all stop here
            check_finite()
            if master and not do_save:
                save()
            barrier()                            # the others wait for the master's checkpoint
            raise Interrupted(f"stopped by {stopper.received or 'a signal to another process'} after step "
                              f"{step}: {ckpt_path} holds it; --resume=True continues the run")
    stopper.deferring = False
    if isinstance(train_data.images, ImageFiles) and train_data.images.broken().any():
        log(f"data: skipped {int(train_data.images.broken().sum())} training images that went bad during the run "
            f"(--skip_bad; their captions did not train)")
    stopper.where = f"after the last step ({ckpt_path} is complete; the final evaluation did not finish)"

    # ---- the finish: curves, test metrics ----
    results = None
    if master:
        plot_run(log_path, os.path.join(cfg.out_dir, 'loss.png'))
        if cfg.final_eval:
            results, captions = evaluation.evaluate(raw_model, splits['test'], vocab, device, ctx=ctx,
                                                    reference=reference)
            atomic_write(os.path.join(cfg.out_dir, 'eval_test.json'),
                         lambda f: f.write(json.dumps(results, indent=1).encode()))
            log('\nsample captions (greedy, test):\n' + evaluation.sample_report(captions, splits['test']))
            log(f"\ntest metrics ({cfg.arch.upper()}-LVLM, {cfg.loss}):\n" +
                evaluation.format_table({cfg.loss: results}))
        log(f"outputs in {cfg.out_dir}: ckpt.pt, log.jsonl, loss.png" + (', eval_test.json' if cfg.final_eval else ''))
        log(f"wall time {hms(time.time() - t_start)}")
        if tracker:
            tracker.finish()
    barrier()                                    # the other processes wait while rank 0 evaluates
    if ddp:
        dist.destroy_process_group()
    return results


if __name__ == '__main__':
    config_mod.cli(lambda argv: train(config_mod.load_config(argv)), sys.argv[1:], __doc__, config_mod.settings_help())
