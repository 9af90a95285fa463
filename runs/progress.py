"""
Progress of a long loop as people expect it: `N/M`, time elapsed, time left (ETA); and of the
training loop, its throughput: ms per iteration, tokens/s, MFU (model FLOPs utilisation: the FLOPs
the model needs, counted below, over the device's peak) and peak memory.

    progress = Progress(total)
    for i in range(total):
        ...
        if progress.due():                       # every few seconds, never in between
            log(f"scoring {progress.line(i + 1)}")
"""

import contextlib
import os
import time

import torch
import torch.nn as nn

from runs.devices import device_peak_flops, peak_memory
from runs.errors import ConfigError


def hms(seconds):
    """12.3s, 4m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
    def __init__(self, total, every=5.0, done=0):
        """`total` steps (None if unknown), of which `done` were done before (a resumed run): the ETA
        counts this session's pace."""
        self.total, self.every, self.start = total, every, done
        self.t0 = self.last = time.time()

    def elapsed(self):
        return time.time() - self.t0

    def due(self):
        """True at most once every `every` seconds (a loop that ends sooner prints nothing)."""
        if time.time() - self.last < self.every:
            return False
        self.last = time.time()
        return True

    def line(self, done):
        elapsed = self.elapsed()
        if self.total is None:                   # a stream of unknown length
            return f"{done}, {hms(elapsed)} elapsed"
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = hms((self.total - done) / rate) if rate > 0 else '?'
        return f"{done}/{self.total}, {hms(elapsed)} elapsed, ETA {eta}"


class Throughput:
    """The training loop's pace since its last report: add() each step's FLOPs and tokens, report()
    at a log step; evaluation and checkpoints inside paused() do not count as training time."""

    def __init__(self, device, world, total, done):
        self.device, self.world, self.cuda = device, world, str(device).startswith('cuda')
        self.progress = Progress(total, done=done)
        self.restart()

    def restart(self):
        self.t_last, self.flops, self.tokens, self.iters = time.time(), 0.0, 0, 0

    def add(self, flops, tokens):
        self.flops, self.tokens, self.iters = self.flops + flops, self.tokens + tokens, self.iters + 1

    def report(self, step, loss, lr, grad_norm):
        """(the log line, the log.jsonl record) of the steps since the last report; grad_norm is this
        step's before clipping (the same on every DDP process). Call after reading the loss: that syncs
        the device, so the time is real."""
        dt = time.time() - self.t_last
        peak = device_peak_flops(self.device, self.flops / dt)
        mfu = self.flops / dt / peak if peak else float('nan')        # this process on its device
        mem = peak_memory(self.cuda) / 2 ** 20
        line = (f"iter {self.progress.line(step)}: loss {loss:.4f}, lr {lr:.2e}, {1000 * dt / self.iters:.0f} ms/iter, "
                f"{self.tokens * self.world / dt:,.0f} tok/s, MFU {100 * mfu:.1f}%, peak mem {mem:,.0f} MiB")
        record = {'step': step, 'train_loss': loss, 'grad_norm': grad_norm, 'lr': lr,
                  'ms_per_iter': 1000 * dt / self.iters, 'mfu': mfu,
                  'peak_mem_mib': mem}
        self.restart()
        return line, record

    @contextlib.contextmanager
    def paused(self):
        if self.cuda:
            torch.cuda.synchronize()             # the step's queued GPU work is training time
        t_pause = time.time()
        yield
        self.t_last += time.time() - t_pause


def parameter_counts(model):
    """'1.23M parameters (0.45M trained)'."""
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{n_params / 1e6:.2f}M parameters ({n_trained / 1e6:.2f}M trained)"


def wandb_run(cfg, config):
    """A Weights & Biases run (--wandb_project) logging `config`, or None; wandb is imported only when asked for."""
    if not cfg.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb_project needs the wandb package (pip install wandb)") from None
    return wandb.init(project=cfg.wandb_project, name=os.path.basename(os.path.normpath(cfg.out_dir)), config=config)


# ---- FLOPs, for MFU: the 6N rule plus attention, per part of the model by what it does ----

# FLOPs per (weight x token) and per (attention score x channel) of a part, by what it does:
# 'train' forward 2 + input gradients 2 + weight gradients 2 (and attention 4 + 8, no weights);
# 'frozen' no weight gradients, but gradients still pass through to a trained part before it;
# 'forward' nothing before it trains, so no backward at all.
FLOP_FACTORS = {'train': (6, 12), 'frozen': (4, 12), 'forward': (2, 4)}


def linear_params(*modules):
    """Weights of the Linear/Conv layers: each costs 2 FLOPs per token forward, 4 backward."""
    return sum(m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def trains(module):
    return any(p.requires_grad for p in module.parameters())


def sequence_flops(gpt, n_text, n_prefix=0, mode='train'):
    """FLOPs of one sequence through a GPT (model.py; `mode` as FLOP_FACTORS): the blocks see
    prefix + text, the LM head only the text positions."""
    c, S = gpt.config, n_prefix + n_text
    per_weight, per_score = FLOP_FACTORS[mode]
    return (per_weight * (linear_params(gpt.h) * S + c.vocab_size * c.n_embd * n_text)
            + per_score * c.n_layer * c.n_embd * S * S)


def train_flops(lvlm, n_text, with_vision=True):
    """Training FLOPs (forward + backward) of one image with n_text caption positions through an
    LVLM (model.py). A frozen part skips its weight gradients (4 FLOPs per weight and token instead
    of 6), and also its input gradients (2 instead of 6) when nothing before it trains.
    with_vision=False: the encoder's features came from the cache, so it did no work."""
    P, vision = lvlm.n_prefix, lvlm.vision
    flops = sequence_flops(lvlm.lm, n_text, n_prefix=P, mode='train' if trains(lvlm.lm) else 'frozen')
    flops += 6 * linear_params(lvlm.projector) * P
    if not with_vision:
        return flops
    if hasattr(vision, 'forward_flops'):         # a CNN encoder measured its forward FLOPs; backward 2x
        return flops + vision.forward_flops * (3 if trains(vision) else 1)
    vision_weight, vision_score = FLOP_FACTORS['train' if trains(vision) else 'forward']
    flops += vision_weight * linear_params(vision) * P
    if hasattr(vision, 'blocks'):                # the ViT's attention
        flops += vision_score * len(vision.blocks) * vision.ln.normalized_shape[0] * P * P
    return flops
