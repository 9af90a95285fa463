"""
Train an LVLM on image-caption data with NTP or PRIOR.

    python train.py                                   # U-LVLM + PRIOR on built-in shapes (CPU: minutes)
    python train.py configs/shapes_h.py --loss=ntp    # H-LVLM (ViT encoder) with plain NTP
    torchrun --standalone --nproc_per_node=4 train.py # DDP on 4 GPUs (or CPU processes, gloo)

Steps: build the data -> (PRIOR or --init_lm=ref) train and score the text-only reference
once -> build the LVLM -> train -> evaluate on the test split and print the table.
Every setting and its default is in config.py.
"""

import contextlib
import functools
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
from data import CLASS_NAMES, RELEVANT, load_splits, make_loader, micro_batches, step_token_count, text_width
from model import LVLM, load_checkpoint, load_hf_gpt2_into, save_checkpoint
from prior_loss import ntp_loss, prior_loss
from reference import ensure_reference, gpt_config, load_reference, make_vocab

# Dense bf16 peak FLOP/s by CUDA device name (MFU's denominator). On CPU we measure instead.
GPU_PEAK_FLOPS = {'H200': 989e12, 'H100 NVL': 835e12, 'H100 PCIe': 756e12, 'H100': 989e12, 'A100': 312e12,
                  'L40S': 362e12, 'L40': 181e12, 'L4': 121e12, 'A10G': 70e12, 'A10': 125e12, 'RTX 4090': 165e12,
                  'RTX 3090': 71e12, 'V100': 125e12, 'T4': 65e12}


@functools.lru_cache       # measured once per process (study.py trains many runs in one)
def device_peak_flops(device):
    """Peak FLOP/s of `device`: the table above on CUDA (None if unknown), a measured fp32
    matmul rate on CPU (the best this machine does, so CPU MFU is honest)."""
    if str(device).startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        known = [k for k in GPU_PEAK_FLOPS if k in name]
        return GPU_PEAK_FLOPS[max(known, key=len)] if known else None      # 'L40S' over 'L4'
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b                                        # warm up the BLAS threads first
    best = float('inf')
    for _ in range(10):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 ** 3 / best


def lr_at(it, cfg):
    """Linear warmup, then cosine decay to learning_rate * min_lr_ratio."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    progress = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def precision_context(device):
    """bf16 autocast (and TF32 matmuls) on CUDA; plain fp32 elsewhere, since bf16 is far slower on CPU."""
    if not str(device).startswith('cuda'):
        return contextlib.nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.autocast('cuda', dtype=torch.bfloat16)


def optimizer_step(model, optimizer, cfg):
    """Clip the gradient norm (if asked), update, and clear the gradients."""
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def objective(cfg, logits, targets, ref_probs=None, n_tokens=None):
    """The training loss: NTP without reference probabilities, else PRIOR with cfg's alpha and floor.
    n_tokens: caption tokens of the whole step, when this is one micro-batch of it."""
    if ref_probs is None:
        return ntp_loss(logits, targets, n_tokens)
    return prior_loss(logits, targets, ref_probs, cfg.alpha, cfg.weight_floor, n_tokens)


def build_model(cfg, vocab, device, ref_path=None):
    """The LVLM with its LM initialised as cfg.init_lm says and parts frozen as asked."""
    torch.manual_seed(cfg.seed)                  # same seed -> same init for every loss
    model = LVLM(cfg, gpt_config(cfg, vocab))
    if cfg.init_lm == 'ref':
        ref, ref_vocab, _ = load_reference(ref_path, 'cpu')
        if ref_vocab.gpt2_ids != vocab.gpt2_ids:
            raise ValueError(f"reference {ref_path} was trained with another vocabulary")
        model.lm.load_state_dict(ref.state_dict())
    elif cfg.init_lm == 'gpt2':
        load_hf_gpt2_into(model.lm, cfg.gpt2_model)
    for part, frozen in ((model.lm, cfg.freeze_lm), (model.vision, cfg.freeze_vision)):
        part.requires_grad_(not frozen)
    return model.to(device)


def make_optimizer(model, cfg, device):
    """AdamW (the fused kernel, on CPU too); weight decay on matrices only (not on biases, norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': cfg.weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)


def plot_curves(log_path, png_path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(log_path)]
    train = [r for r in rows if 'train_loss' in r]
    val = [r for r in rows if 'val_loss' in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([r['step'] for r in train], [r['train_loss'] for r in train], label='train objective')
    ax[0].plot([r['step'] for r in val], [r['val_loss'] for r in val], 'o-', label='val NTP loss')
    for cls in ('relevant', 'filler', 'noise'):
        ax[1].plot([r['step'] for r in val], [r[f'val_loss_{cls}'] for r in val], 'o-', label=cls)
    ax[0].set_title('loss'), ax[1].set_title('val loss per token class')
    for a in ax:
        a.set_xlabel('step'), a.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def train(cfg, log=print, objective=objective):
    """Run one training job as configured; returns the final test metrics (master) or None.
    `objective` has objective()'s signature; study.py passes a variant of PRIOR."""
    # ---- processes and devices ----
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else 'cpu'
        if device != 'cpu':
            torch.cuda.set_device(device)
        dist.init_process_group(backend='nccl' if device != 'cpu' else 'gloo')
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        device, rank, world = config_mod.resolve_device(cfg.device), 0, 1
    master = rank == 0
    log = log if master else (lambda *a, **k: None)
    cuda = str(device).startswith('cuda')
    ctx = precision_context(device)
    log(f"config: {json.dumps(config_mod.as_dict(cfg))}")

    # ---- data, vocabulary, reference ----
    t0 = time.time()
    splits = load_splits(cfg)
    vocab = make_vocab(cfg, splits['train'])
    for data in splits.values():
        data.encode(vocab)
    train_data, val_data = splits['train'], splits['val']
    log(f"data: {', '.join(f'{k} {len(v)}' for k, v in splits.items())} captions, vocab {vocab.size}, "
        f"{time.time() - t0:.1f}s")
    ref_path = ref_probs = None
    if cfg.loss == 'prior' or cfg.init_lm == 'ref':      # scores needed by PRIOR only
        ref_path, ref_probs = ensure_reference(cfg, train_data, vocab, device, log, master, cfg.loss == 'prior')

    # ---- model and optimiser ----
    model = build_model(cfg, vocab, device, ref_path)
    optimizer = make_optimizer(model, cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {cfg.arch} LVLM, {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained), "
        f"{model.n_prefix} image tokens")

    global_batch = cfg.batch_size * cfg.grad_accum * world
    step, ckpt_path, log_path = 0, os.path.join(cfg.out_dir, 'ckpt.pt'), os.path.join(cfg.out_dir, 'log.jsonl')
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        saved = {k: v for k, v in ckpt['config'].items() if k != 'resume'}
        now = {k: v for k, v in config_mod.as_dict(cfg).items() if k != 'resume'}
        if saved != now:
            diff = sorted(k for k in now if saved.get(k) != now[k])
            raise ValueError(f"--resume: config differs from the checkpoint's in {diff}")
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        step = ckpt['step']
        assert ckpt['data_position'] == step * global_batch, "global batch changed since the checkpoint"
        log(f"resumed from {ckpt_path} at step {step}")
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        kept = [line for line in open(log_path)] if cfg.resume and os.path.exists(log_path) else []
        with open(log_path, 'w') as f:           # drop what was logged after the checkpoint
            f.writelines(line for line in kept if json.loads(line)['step'] <= step)

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[torch.cuda.current_device()] if cuda else None)

    def write_log(record):
        if master:
            with open(log_path, 'a') as f:
                f.write(json.dumps(record) + '\n')

    def validate():
        if not master:
            return
        rows = torch.arange(min(len(val_data), cfg.eval_batches * cfg.batch_size))
        m = evaluation.teacher_forced_metrics(raw_model, val_data, vocab, rows, device, ctx=ctx)
        write_log({'step': step, **{f'val_{k}': v for k, v in m.items()}})
        classes = ', '.join(f"{c} {m[f'loss_{c}']:.3f}" for c in CLASS_NAMES if not math.isnan(m[f'loss_{c}']))
        attr = '' if math.isnan(m['attr_acc']) else f", attr_acc {m['attr_acc']:.3f}"   # NaN: no attributes
        log(f"step {step}: val loss {m['loss']:.4f}" + (f" ({classes})" if classes else '') + attr)

    def save():
        if master:
            save_checkpoint({'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
                             'config': config_mod.as_dict(cfg), 'model_args': vars(raw_model.lm.config),
                             'vocab': vocab.state(), 'step': step, 'data_position': step * global_batch,
                             'ref_path': ref_path,
                             'rng': {'cpu': torch.get_rng_state(),
                                     'cuda': torch.cuda.get_rng_state() if cuda else None}}, ckpt_path)

    # ---- the training loop ----
    peak = device_peak_flops(device)
    log(f"tokens per iteration: {global_batch} captions x ({raw_model.n_prefix} image + <= {cfg.block_size} text)"
        f" = global batch {global_batch} ({cfg.batch_size} x {cfg.grad_accum} accum x {world} proc); "
        f"peak {peak / 1e12 if peak else float('nan'):.2f} TFLOP/s")
    if step == 0:
        validate()
    model.train()
    t_last, flops_since, tokens_since, iters = time.time(), 0.0, 0, 0
    loader = iter(make_loader(train_data, micro_batches(len(train_data), cfg.batch_size, cfg.grad_accum, world, rank,
                                                        cfg.seed, step, cfg.max_iters), cfg.num_workers, cuda))
    if cfg.resume:                               # last, as the peak measurement and loader drew from the RNG
        torch.set_rng_state(ckpt['rng']['cpu'])  # (dropout masks continue as if never interrupted)
        if cuda and ckpt['rng']['cuda'] is not None:
            torch.cuda.set_rng_state(ckpt['rng']['cuda'])
    while step < cfg.max_iters:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr
        # Every micro-batch divides by the caption tokens of the whole step, so the step's loss
        # (and gradient) is the global token mean however the batch is cut into micro-batches.
        n_tokens = step_token_count(train_data, global_batch, step, cfg.seed)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            images, rows = next(loader)
            images, idx, targets, classes = train_data.batch(rows, device, images)
            T = text_width(targets)
            idx, targets, classes = idx[:, :T], targets[:, :T], classes[:, :T]
            if ddp:                              # all-reduce gradients on the last micro-step only
                model.require_backward_grad_sync = micro == cfg.grad_accum - 1
            with ctx:
                logits = model(images, idx)
            p = None
            if cfg.loss == 'prior':
                p = torch.from_numpy(ref_probs[rows.numpy(), :T]).to(device)
            elif cfg.loss == 'oracle':           # as if the reference knew every non-visual token
                p = (classes != RELEVANT).float()
            loss = objective(cfg, logits, targets, p, n_tokens)
            (loss * world).backward()            # DDP averages gradients over processes: undo it
            loss_sum += loss.detach()
            flops_since += raw_model.flops_per_sample(T) * len(rows)
            tokens_since += (raw_model.n_prefix + T) * len(rows)
        optimizer_step(raw_model, optimizer, cfg)
        step, iters = step + 1, iters + 1

        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            if ddp:
                dist.all_reduce(loss_sum)                  # the processes' parts of the step's loss
            loss_val = loss_sum.item()                     # syncs the device, so timing is real
            dt = time.time() - t_last
            mfu = flops_since / dt / peak if peak else float('nan')        # this process on its device
            log(f"iter {step}: loss {loss_val:.4f}, lr {lr:.2e}, {1000 * dt / iters:.0f} ms/iter, "
                f"{tokens_since * world / dt:,.0f} tok/s, MFU {100 * mfu:.1f}%")
            write_log({'step': step, 'train_loss': loss_val, 'lr': lr, 'ms_per_iter': 1000 * dt / iters, 'mfu': mfu})
            t_last, flops_since, tokens_since, iters = time.time(), 0.0, 0, 0
        do_eval = step % cfg.eval_interval == 0 or step == cfg.max_iters
        do_save = (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or step == cfg.max_iters
        if do_eval or do_save:
            if cuda:
                torch.cuda.synchronize()         # the step's queued GPU work is training time
            t_pause = time.time()
            if do_eval:
                validate()
            if do_save:
                save()
            t_last += time.time() - t_pause      # evaluation and checkpoints are not training time

    # ---- the end: curves, test metrics ----
    results = None
    if master:
        plot_curves(log_path, os.path.join(cfg.out_dir, 'loss.png'))
        if cfg.final_eval:
            results, captions = evaluation.evaluate(raw_model, splits['test'], vocab, device, ctx=ctx,
                                                    ref_path=ref_path)
            with open(os.path.join(cfg.out_dir, 'eval_test.json'), 'w') as f:
                json.dump(results, f, indent=1)
            log('\nsample captions (greedy, test):\n' + evaluation.sample_report(captions, splits['test']))
            log(f"\ntest metrics ({cfg.arch}, {cfg.loss}):\n" + evaluation.format_table({cfg.loss: results}))
        log(f"outputs in {cfg.out_dir}: ckpt.pt, log.jsonl, loss.png" + (', eval_test.json' if cfg.final_eval else ''))
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return results


if __name__ == '__main__':
    train(config_mod.load_config(sys.argv[1:]))
