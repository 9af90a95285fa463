"""
Speed and memory of one training step: NTP and PRIOR side by side, in one process; then what the
reference costs elsewhere (scoring the captions once, and decoding with --debias).

    python bench.py                                    # the default config on this machine
    python bench.py configs/shapes_h.py --bench_iters=50
    python bench.py --device=cuda --compile=True ...   # see scripts/gpu_bench.sh

Three variants of train.py's step, on one model and optimiser, fed the same batches:
  ntp     plain next-token prediction
  cached  PRIOR reading P_r from a memory-mapped [N, T] array, as train.py reads its cache
  online  PRIOR running the text-only reference GPT inside the step (no grad) for P_r
The variants take turns every iteration, so a machine that gets busier or quieter mid-run
shifts all three alike, and each figure is the median over the timed iterations. Decoding is
timed the same way, step by step: plain and debiased (the reference beside the LVLM,
reference.Debias) in turns, for greedy and beam-search batches (the config's beam, at least 2).

It prints figures and asserts nothing. Speed does not depend on weight values, so the LM
starts from scratch, the reference is a fresh GPT and the cached P_r are random: nothing
is trained or loaded (--init_lm=gpt2 reads only the checkpoint's config, for its shape, and
uses GPT-2's vocabulary; a pretrained encoder starts from scratch too, and a frozen one runs
every step, as train.py does with --cache_features=False).
Bench-only flags: --bench_iters (timed iterations), --bench_warmup (untimed ones first).
n_train defaults to 2048 here (quick data); a config file or flag overrides it. Every train.py
setting applies (--precision=fp16 times the loss-scaled step).
"""

import runs.startup  # noqa: F401  (first of all: a signal while the imports below load ends in one line)

import dataclasses
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from config import load_config, settings_help
from data import global_batch, load_splits, make_loader, make_vocab, micro_batches
from model import GPT, gpt_config
from decoding.generate import NextToken
from reference import DEBIAS_MIN_WEIGHT, Debias, score_captions, target_probs
from runs.cli import Flag, cli, flags_help, parse_flags
from runs.devices import (device_peak_flops, grad_scaler, peak_memory, precision_context, reset_peak_memory,
                          resolve_device, resolve_precision, to_device)
from runs.optim import make_optimizer
from runs.progress import parameter_counts, sequence_flops
from train import build_model, train_step

BENCH_FLAGS = {'bench_iters': Flag(20, low=1, help='timed iterations'),
               'bench_warmup': Flag(3, low=0, help='untimed iterations first')}
VARIANTS = ('ntp', 'cached', 'online')


def parse_args(argv):
    """(bench flags, Config): bench-only flags apart, the rest exactly as train.py reads them."""
    ours = [a for a in argv if a.startswith('--') and a[2:].partition('=')[0] in BENCH_FLAGS]
    rest = [a for a in argv if a not in ours]
    return parse_flags(ours, BENCH_FLAGS), load_config(['--n_train=2048'] + rest)


class Bench:
    """One model, optimiser and reference as train.py builds them (a scratch LM of the same shape),
    the training split, and cached P_r: random values, memory-mapped from disk like train.py's cache."""

    def __init__(self, cfg, n_iters):
        self.cfg, self.device = cfg, resolve_device(cfg.device)
        self.cuda = str(self.device).startswith('cuda')
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.ctx, self.scaler = precision_context(self.device, cfg.precision), grad_scaler(self.device, cfg.precision)
        self.splits = load_splits(cfg, names=('train', 'val'))
        self.vocab = make_vocab(cfg, self.splits['train'])
        for data in self.splits.values():
            data.encode(self.vocab)
        self.train = self.splits['train']
        lm = gpt_config(cfg, self.vocab)
        build_cfg = dataclasses.replace(cfg, init_lm='scratch', init_vision='scratch', n_layer=lm.n_layer,
                                        n_head=lm.n_head, n_embd=lm.n_embd)    # weights do not change speed
        self.raw_model = build_model(build_cfg, self.vocab, self.device)       # frozen parts stay frozen
        self.optimizer = make_optimizer(self.raw_model, cfg.learning_rate, cfg)
        torch.manual_seed(cfg.seed + 1)
        self.ref = GPT(lm).to(self.device).eval().requires_grad_(False)
        self.model, self.ref_fwd = (torch.compile(self.raw_model), torch.compile(self.ref)) if cfg.compile \
            else (self.raw_model, self.ref)
        self.model.train()
        self.tmp = tempfile.TemporaryDirectory()
        cache = os.path.join(self.tmp.name, 'ref_probs_train.npy')
        np.save(cache, np.random.default_rng(0).random(self.train.targets.shape, dtype=np.float32))
        self.ref_probs = np.load(cache, mmap_mode='r')
        # one loader per variant over the same stream of rows, as train.py builds its own
        self.loaders = {v: iter(make_loader(self.train, micro_batches(len(self.train), cfg, 1, 0, 0, n_iters),
                                            cfg.num_workers, self.cuda)) for v in VARIANTS}

    def describe(self):
        cfg, raw_model, device = self.cfg, self.raw_model, self.device
        peak = device_peak_flops(device)
        threads = '' if self.cuda else f', {torch.get_num_threads()} threads'
        precision = resolve_precision(device, cfg.precision) + threads
        print(f"bench: {cfg.arch} LVLM, {parameter_counts(raw_model)}, "
              f"reference GPT {sum(p.numel() for p in self.ref.parameters()) / 1e6:.2f}M, vocab {self.vocab.size}; "
              f"{raw_model.n_prefix} image + <= {cfg.block_size} text tokens; batch {cfg.batch_size} x "
              f"{cfg.grad_accum} accum")
        print(f"device: {torch.cuda.get_device_name(device) if self.cuda else 'cpu'}, {precision}, compile "
              f"{cfg.compile}; peak {peak / 1e12 if peak else float('nan'):.3f} TFLOP/s"
              f"{'' if self.cuda else ' (measured fp32 matmul)'}; load average {os.getloadavg()[0]:.2f}")

    def timed(self, variant):
        """The variant's loader and P_r source for train_step, each adding its seconds to `spent`
        (synced around the timed part, so the shares are upper bounds: train.py never syncs mid-run
        and may prepare a batch while the device still works)."""
        spent = dict(data=0.0, lookup=0.0, ref_flops=0.0)

        def next_batch():
            self.sync()
            t = time.perf_counter()
            batch = next(self.loaders[variant])
            self.sync()
            spent['data'] += time.perf_counter() - t
            return batch

        def ref_probs_of(rows, idx, targets, classes):
            if variant == 'ntp':
                return None
            if variant == 'online':
                spent['ref_flops'] += sequence_flops(self.ref, targets.size(1), mode='forward') * len(rows)
                with torch.no_grad(), self.ctx:
                    return target_probs(self.ref_fwd, idx, targets)
            self.sync()
            t = time.perf_counter()
            p = to_device(torch.from_numpy(self.ref_probs[rows.numpy(), :targets.size(1)]), self.device)
            self.sync()
            spent['lookup'] += time.perf_counter() - t
            return p
        return spent, iter(next_batch, None), ref_probs_of

    def step(self, variant, it):
        """One iteration of train.py's own train_step. Returns seconds (total, data, P_r lookup) and the work done."""
        spent, batches, ref_probs_of = self.timed(variant)
        self.sync()
        t0 = time.perf_counter()
        _, _, _, flops, tokens = train_step(self.cfg, self.model, self.raw_model, self.optimizer, self.train, batches, it,
                                         ref_probs_of, device=self.device, ctx=self.ctx, scaler=self.scaler)
        self.sync()
        return dict(s=time.perf_counter() - t0, data=spent['data'] + spent['lookup'], lookup=spent['lookup'],
                    flops=flops, ref_flops=spent['ref_flops'], tokens=tokens,
                    images=global_batch(self.cfg))


def report(bench, timings, mem, n_iters, n_warmup):
    """The table of medians, the PRIOR/NTP step-time ratios, and what they mean."""
    def med(v, key='s'):
        return statistics.median(r[key] for r in timings[v])

    def mean(v, key):
        return statistics.fmean(r[key] for r in timings[v])

    rates = {v: (mean(v, 'flops') + mean(v, 'ref_flops')) / med(v) for v in VARIANTS}     # all FLOPs done
    peak = device_peak_flops(bench.device, max(rates.values()))   # a CPU peak measured while busy can be too low
    print(f"\n{n_iters} timed iterations after {n_warmup} warmup (medians):")
    print(f"{'variant':8} {'ms/iter':>9} {'tokens/s':>11} {'images/s':>10} {'MFU':>7} {'data':>7} "
          f"{'lookup':>7} {'peak mem':>10}")
    for v in VARIANTS:
        s = med(v)
        mfu = rates[v] / peak if peak else float('nan')
        print(f"{v:8} {1000 * s:9.2f} {mean(v, 'tokens') / s:11,.0f} {mean(v, 'images') / s:10,.1f} "
              f"{100 * mfu:6.1f}% {100 * med(v, 'data') / s:6.2f}% {100 * med(v, 'lookup') / s:6.2f}% "
              f"{mem[v] / 2 ** 20:7.1f} MiB")
    # Ratios pair each PRIOR step with the NTP step just before it on the same batch, so a
    # burst of load from other processes moves both sides of a pair (medians of the pairs).
    cached, online = (statistics.median(b['s'] / a['s'] for a, b in zip(timings['ntp'], timings[v]))
                      for v in VARIANTS[1:])
    predicted = 1 + mean('online', 'ref_flops') / mean('online', 'flops')
    print(f"PRIOR/NTP step time: cached {cached:.3f}, online {online:.3f} (FLOPs predict {predicted:.3f}, "
          f"so online costs {100 * (online / predicted - 1):+.1f}% over its FLOPs)")
    print(f"data = loader (+ P_r lookup for cached) share of step time; lookup = P_r lookup alone; "
          f"peak mem = {'max_memory_allocated' if bench.cuda else 'peak RSS (ru_maxrss)'} per variant")


def scoring_speed(bench):
    """Offline scoring, what PRIOR pays once per dataset instead of once per step."""
    val = bench.splits['val']
    score_captions(bench.ref, val, bench.device)            # warm up (allocator, kernels)
    bench.sync()
    t0 = time.perf_counter()
    score_captions(bench.ref, val, bench.device)
    bench.sync()
    print(f"reference scoring (reference.score_captions, val split): {len(val) / (time.perf_counter() - t0):,.0f} "
          f"captions/s ({len(val)} captions, fp32)")


@torch.no_grad()
def decoding_speed(bench, n_images=64, repeats=3):
    """The cost of one decoding step (decoding/generate.NextToken over a whole caption length), plain and
    debiased (the reference beside the LVLM, reference.Debias), for greedy and beam-search batches
    (n_images x beam rows). Fixed steps: with random weights the two would write captions of other lengths."""
    val, model = bench.splits['val'], bench.raw_model.eval()
    images = val.batch(torch.arange(min(n_images, len(val))), bench.device)[0]
    fix = Debias(bench.ref, bench.cfg.alpha, bench.cfg.weight_floor, DEBIAS_MIN_WEIGHT)
    steps = bench.cfg.block_size - 1
    tokens = torch.randint(0, bench.vocab.size, (steps, len(images) * max(2, bench.cfg.beam)), device=bench.device)
    for beam in (1, max(2, bench.cfg.beam)):
        seconds = {False: [], True: []}
        for it in range(repeats + 1):
            for debiased in (False, True):
                bench.sync()
                t0 = time.perf_counter()
                with bench.ctx:
                    next_token = NextToken(model, images, copies=beam, debias=fix if debiased else None)
                    for t in range(steps):
                        next_token(tokens[t, :len(images) * beam])
                bench.sync()
                if it:                                   # the first turn warms up
                    seconds[debiased].append(time.perf_counter() - t0)
        ratio = statistics.median(b / a for a, b in zip(seconds[False], seconds[True]))
        plain, debiased = (1000 * statistics.median(seconds[d]) / steps for d in (False, True))
        print(f"decoding step, {len(images)} images x beam {beam}: plain {plain:.2f} ms, debiased {debiased:.2f} ms; "
              f"debiased/plain {ratio:.2f}")


def main(argv):
    flags, cfg = parse_args(argv)
    n_iters = flags['bench_warmup'] + flags['bench_iters']
    bench = Bench(cfg, n_iters)
    bench.describe()
    timings, mem = {v: [] for v in VARIANTS}, dict.fromkeys(VARIANTS, 0)
    for it in range(n_iters):                    # the variants take turns, iteration by iteration
        for v in VARIANTS:
            reset_peak_memory(bench.cuda)
            r = bench.step(v, it)
            mem[v] = max(mem[v], peak_memory(bench.cuda))
            if it >= flags['bench_warmup']:
                timings[v].append(r)
    report(bench, timings, mem, flags['bench_iters'], flags['bench_warmup'])
    scoring_speed(bench)
    decoding_speed(bench)
    bench.tmp.cleanup()


if __name__ == '__main__':
    cli(main, sys.argv[1:], __doc__, flags_help(BENCH_FLAGS) + '\n\n' + settings_help())
