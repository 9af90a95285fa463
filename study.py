"""
Replication study: does PRIOR beat NTP on the shapes data, where, and why.

    python study.py            # the full study (about an hour on 2 CPU cores)
    python study.py --quick    # the same protocol, shrunk (about 12 minutes), into results/quick/
    python study.py --report   # only rebuild results/ tables and plots from the run JSONs there

Options: --tiny (about a minute; for tests), --results=DIR (default results/, or results/quick/
for --quick), --out=DIR (checkpoints and references, default out/study/<preset>/),
--threads=N (torch threads, default 1).

The protocol, for both settings (U-LVLM: encoder-free, LM trained; H-LVLM: ViT + projector,
LM frozen at the text-only reference):
  1. learning-rate sweep on the val split for each objective (NTP, PRIOR, PRIOR + weight floor),
     selecting on val loss_relevant (the objectives differ, so we select on the task metric);
  2. every objective at its best rate with N seeds, evaluated on the test split; a seed fixes
     the data order, the initialisation (and the reference it starts from) for every objective;
  3. scaling (U): 3 model sizes x 3 compute budgets, NTP and PRIOR, power law of test
     loss_relevant against training FLOPs;
  4. data ablations (U): no noise, much noise, low/high filler, multi-epoch (small n_train),
     and the label oracle (weights from the true token classes: a teacher-forced ceiling).
Every run writes results/runs/<name>.json (config, test metrics, val learning curve, FLOPs);
a run whose JSON exists is skipped, so an interrupted study resumes where it stopped. The
report (results.md, summary.md, study.json, PNGs) is rebuilt from those JSONs only.
"""

import dataclasses
import hashlib
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------------------------
# Presets. `base` are Config fields shared by every run; the rest shapes the protocol.

SETTINGS = {'u': 'configs/shapes_u.py', 'h': 'configs/shapes_h.py'}
OBJECTIVES = ('ntp', 'prior', 'prior_floor')          # the protocol's objectives; 'oracle' is an ablation
# Beyond the paper and beyond the weight floor: PRIOR + floor with the PRIOR term scaled by the image's
# estimated information gain on each token (see pmi_objective); run after the main protocol, U only.
EXTRA_OBJECTIVES = ('prior_floor_pmi',)
PMI_BETA = 3.0
PRESETS = {
    'full': dict(
        base=dict(n_train=4000, n_val=500, n_test=500, n_layer=2, n_head=4, n_embd=64, vit_layer=2, vit_embd=64,
                  max_iters=640, warmup_iters=20, batch_size=32, eval_interval=80, eval_batches=8,
                  log_interval=80, ckpt_interval=0, ref_max_iters=150),
        lrs=[1e-3, 2e-3, 5e-3, 1e-2], seeds=[1337, 1338, 1339], floor=0.2, n_generate=128,
        noise_high=0.9, multi_epoch_n_train=300, ablation_objectives=OBJECTIVES,
        sizes=[(2, 32), (2, 64), (3, 96)], budgets=[160, 320, 640]),
    'quick': dict(
        base=dict(n_train=1500, n_val=200, n_test=200, n_layer=2, n_head=4, n_embd=48, vit_layer=1, vit_embd=48,
                  max_iters=120, warmup_iters=10, batch_size=32, eval_interval=15, eval_batches=4,
                  log_interval=15, ckpt_interval=0, ref_max_iters=60),
        lrs=[1e-3, 2e-3, 5e-3, 1e-2], seeds=[1337, 1338, 1339], floor=0.2, n_generate=48,
        noise_high=0.9, multi_epoch_n_train=150, ablation_objectives=('ntp', 'prior'),
        sizes=[(1, 32), (2, 48), (2, 64)], budgets=[30, 60, 120]),
    'tiny': dict(
        base=dict(n_train=96, n_val=32, n_test=32, n_layer=1, n_head=2, n_embd=16, vit_layer=1, vit_embd=16,
                  max_iters=8, warmup_iters=2, batch_size=8, eval_interval=1, eval_batches=1,
                  log_interval=4, ckpt_interval=0, ref_max_iters=4, ref_batch_size=16),
        lrs=[2e-3, 5e-3], seeds=[1, 2], floor=0.2, n_generate=4,
        noise_high=0.9, multi_epoch_n_train=24, ablation_objectives=('ntp',),
        sizes=[(1, 8), (1, 16)], budgets=[4, 8]),
}


SETTING_NAMES = {'u': 'U-LVLM (encoder-free, LM trained)', 'h': 'H-LVLM (ViT + projector, LM frozen)'}
MAIN_METRIC = 'loss_relevant'                          # selection and scaling metric (lower is better)
# Metrics in the relative improvement (the paper averages relative changes over benchmarks, signed
# so that higher is better). Only image-grounded metrics: filler/noise/total loss are what PRIOR
# deliberately trades away, so they are reported separately as its cost.
REL_METRICS = {'loss_relevant': -1, 'acc_count': 1, 'acc_colour': 1, 'acc_shape': 1, 'acc_position': 1,
               'hallucination': -1, 'recall': 1, 'exact': 1}
REPORT_KEYS = ('loss', 'loss_relevant', 'loss_filler', 'loss_noise', 'attr_acc', 'acc_count', 'acc_colour',
               'acc_shape', 'acc_position', 'hallucination', 'recall', 'exact')
# The same, teacher-forced metrics only: the caption-level shares (recall, exact) sit near 0 for
# models this small, where one caption more or less is a relative change of +-100%.
REL_METRICS_TF = {k: REL_METRICS[k] for k in ('loss_relevant', 'acc_count', 'acc_colour', 'acc_shape',
                                              'acc_position')}
LOWER_BETTER = {'loss', 'loss_relevant', 'loss_filler', 'loss_noise', 'hallucination'}
DATA_DEFAULTS = dict(noise_rate=0.5, filler='default')


# ---------------------------------------------------------------------------------------------
# Run specs: a spec is a small dict; its name is derived from it, so identical runs requested by
# two parts of the study (e.g. a scaling point that is also a main run) are run once.

def spec(setting, objective, lr, seed, **extra):
    return dict(setting=setting, objective=objective, lr=lr, seed=seed, **extra)


def run_name(s):
    parts = [s['setting'], s['objective'], f"lr{s['lr']:g}", f"s{s['seed']}"]
    for key in ('noise_rate', 'filler', 'n_train', 'n_layer', 'n_embd', 'max_iters'):
        if key in s:
            parts.append(f"{key}{s[key]}")
    return '_'.join(str(p) for p in parts).replace('.', 'p')


def make_config(s, preset, out_root):
    import config as config_mod
    cfg = config_mod.load_config([os.path.join(ROOT, SETTINGS[s['setting']])])
    fields = dict(preset['base'])
    fields.update(learning_rate=s['lr'], seed=s['seed'], device='cpu', final_eval=False, compile=False)
    for key in ('noise_rate', 'filler', 'n_train', 'n_layer', 'n_embd', 'max_iters'):
        if key in s:
            fields[key] = s[key]
    if 'max_iters' in s:                                   # keep >= 8 val checkpoints per run
        fields['eval_interval'] = max(1, s['max_iters'] // 8)
        fields['log_interval'] = max(1, s['max_iters'] // 8)
    obj = s['objective']
    fields['loss'] = 'prior' if obj.startswith('prior') else obj
    fields['weight_floor'] = preset['floor'] if obj.startswith('prior_floor') else 0.0
    cfg = dataclasses.replace(cfg, **fields)
    # the reference depends on the data, the LM shape, its recipe and the seed, never on the
    # objective or the architecture: every run that may share it does (kept under out_root)
    ref_key = [cfg.dataset, cfg.data_seed, cfg.image_size, cfg.n_train, cfg.noise_rate, cfg.filler,
               cfg.pixel_noise, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.ref_max_iters,
               cfg.ref_learning_rate, cfg.ref_batch_size, cfg.seed, cfg.init_lm]
    key = hashlib.sha256(json.dumps(ref_key).encode()).hexdigest()[:12]
    cfg.ref_ckpt = os.path.join(out_root, 'ref', key, 'ref.pt')
    cfg.out_dir = os.path.join(out_root, 'runs', run_name(s))
    config_mod.check(cfg)
    return cfg


def mean_max_len(data, batch_size, n_draws=200, seed=0):
    """Expected padded text length T of a training batch (train.py drops all-padding columns)."""
    from prior_loss import IGNORE
    lengths = (data.targets != IGNORE).sum(1).numpy()
    rng = np.random.default_rng(seed)
    return float(np.mean([lengths[rng.choice(len(lengths), size=min(batch_size, len(lengths)), replace=False)].max()
                          for _ in range(n_draws)]))


def pmi_objective(cfg, logits, targets, ref_probs=None, n_tokens=None):
    """train.objective with PRIOR's (1 - P_r)^alpha term scaled by sigmoid(PMI_BETA * PMI), PMI =
    log p(t | image, t<) - log P_r(t | t<): the model's current, detached estimate of what the image
    adds on the token (plus cfg's weight floor, normalised as in prior_loss.token_weights).

    Vanilla PRIOR gives (1 - P_r) ~ 1 both to image-relevant tokens and to noise that nothing
    predicts ("taken by Ana in Lima"); only the former get PMI > 0 once the model sees, so noise
    loses its up-weighting. The gain enters token_weights as an effective P_r,
    1 - (1 - P_r) * gain^(1/alpha), whose (1 - .)^alpha is (1 - P_r)^alpha * gain."""
    import torch
    from prior_loss import IGNORE, ntp_loss, token_nll, token_weights
    if ref_probs is None:
        return ntp_loss(logits, targets, n_tokens)
    nll = token_nll(logits, targets)
    gain = torch.sigmoid(PMI_BETA * (-nll.detach() - ref_probs.float().clamp(1e-6, 1.0).log()))
    weights = token_weights(1 - (1 - ref_probs.float()) * gain ** (1 / cfg.alpha), targets, cfg.alpha,
                            cfg.weight_floor)
    return (weights * nll).sum() / (n_tokens or (targets != IGNORE).sum().clamp(min=1))


def reference_seconds(train_log):
    """Seconds this run spent training + scoring the reference (None if it reused a cached one)."""
    import re
    total, found = 0.0, False
    last_iter = None
    for line in open(train_log):
        m = re.match(r'reference iter \d+: .*\(([\d.]+)s\)', line)
        if m:
            last_iter, found = float(m.group(1)), True
        m = re.match(r'reference: scored .* in ([\d.]+)s', line)
        if m:
            total, found = total + float(m.group(1)), True
    return total + (last_iter or 0.0) if found else None


def execute(s, preset, out_root, runs_dir, log_main):
    """Train one run (unless its JSON exists), evaluate it on test, write its JSON; return the record."""
    name = run_name(s)
    path = os.path.join(runs_dir, name + '.json')
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    import torch
    import config as config_mod
    import eval as evaluation
    from data import load_splits
    from train import train
    cfg = make_config(s, preset, out_root)
    os.makedirs(cfg.out_dir, exist_ok=True)
    t0 = time.time()
    extra = {'loss_fn': pmi_objective} if s['objective'].endswith('_pmi') else {}
    with open(os.path.join(cfg.out_dir, 'train.log'), 'w') as logf:
        train(cfg, log=lambda *a, **k: print(*a, file=logf, flush=True), **extra)
    train_s = time.time() - t0
    model, vocab, _, _ = evaluation.load_trained(os.path.join(cfg.out_dir, 'ckpt.pt'), 'cpu')
    model.lm.requires_grad_(not cfg.freeze_lm)           # as trained: FLOPs and n_trained depend on it
    model.vision.requires_grad_(not cfg.freeze_vision)
    test = load_splits(cfg, names=('test',))['test'].encode(vocab)
    torch.manual_seed(0)
    metrics, captions = evaluation.evaluate(model, test, vocab, 'cpu', n_generate=preset['n_generate'])
    T = mean_max_len(test, cfg.batch_size)
    flops_per_sample = model.flops_per_sample(int(round(T)))
    rows = [json.loads(line) for line in open(os.path.join(cfg.out_dir, 'log.jsonl'))]
    ms = [r['ms_per_iter'] for r in rows if 'ms_per_iter' in r][1:] or [float('nan')]   # first window warms up
    ref_s = reference_seconds(os.path.join(cfg.out_dir, 'train.log'))
    curve = [{k[4:] if k.startswith('val_') else k: v for k, v in r.items()} for r in rows if 'val_loss' in r]
    record = dict(name=name, spec=s, config=config_mod.as_dict(cfg), test=metrics, val=curve[-1], curve=curve,
                  samples=cfg.max_iters * cfg.batch_size, flops_per_sample=flops_per_sample,
                  flops=flops_per_sample * cfg.max_iters * cfg.batch_size, mean_text_len=T,
                  n_params=sum(p.numel() for p in model.parameters()),
                  n_trained=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  sample_captions=captions[:3], train_seconds=train_s, seconds=time.time() - t0,
                  ms_per_iter=float(np.median(ms)), reference_seconds=ref_s,
                  pmi_beta=PMI_BETA if s['objective'].endswith('_pmi') else None)
    os.makedirs(runs_dir, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(record, f, indent=1)
    os.replace(path + '.tmp', path)
    log_main(f"  {name}: {time.time() - t0:.0f}s, test {MAIN_METRIC} {metrics[MAIN_METRIC]:.3f}, "
             f"attr_acc {metrics['attr_acc']:.3f}, val {MAIN_METRIC} {record['val'][MAIN_METRIC]:.3f}")
    return record


def load_runs(runs_dir):
    out = {}
    if os.path.isdir(runs_dir):
        for fn in sorted(os.listdir(runs_dir)):
            if fn.endswith('.json'):
                with open(os.path.join(runs_dir, fn)) as f:
                    r = json.load(f)
                out[r['name']] = r
    return out


# ---------------------------------------------------------------------------------------------
# The protocol

def best_lr(runs, setting, objective, preset):
    """The sweep's best rate for (setting, objective) by val loss_relevant; None if not run yet."""
    seed = preset['seeds'][0]
    scored = []
    for lr in preset['lrs']:
        r = runs.get(run_name(spec(setting, objective, lr, seed)))
        if r is not None:
            scored.append((r['val'][MAIN_METRIC], lr))
    return min(scored)[1] if len(scored) == len(preset['lrs']) else None


def plan(preset, runs):
    """Phases of run specs, in order; later phases read earlier results (best rates)."""
    seeds, lrs = preset['seeds'], preset['lrs']
    yield 'sweep', [spec(st, obj, lr, seeds[0]) for st in ('u', 'h') for obj in OBJECTIVES for lr in lrs]
    best = {(st, obj): best_lr(runs, st, obj, preset) for st in ('u', 'h') for obj in OBJECTIVES}
    yield 'seeds', [spec(st, obj, best[st, obj], sd) for st in ('u', 'h') for obj in OBJECTIVES for sd in seeds[1:]]
    bu = {obj: best['u', obj] for obj in OBJECTIVES}
    scale = []
    for n_layer, n_embd in preset['sizes']:
        for iters in preset['budgets']:
            for obj in ('ntp', 'prior'):
                scale.append(scaling_spec(preset, bu[obj], obj, n_layer, n_embd, iters))
    yield 'scaling', scale
    ablate = []
    ablate.append(spec('u', 'oracle', bu['prior'], seeds[0]))
    for extra in (dict(noise_rate=0.0), dict(noise_rate=preset['noise_high']), dict(filler='low'),
                  dict(filler='high'), dict(n_train=preset['multi_epoch_n_train'])):
        for obj in preset['ablation_objectives']:
            ablate.append(spec('u', obj, bu[obj], seeds[0], **extra))
    yield 'ablations', ablate
    # the PMI variant through the same protocol (U): sweep, seeds at its best rate, the noisy and
    # the multi-epoch data (where up-weighting unpredictable tokens should hurt most)
    yield 'pmi sweep', [spec('u', obj, lr, seeds[0]) for obj in EXTRA_OBJECTIVES for lr in lrs]
    extra = []
    for obj in EXTRA_OBJECTIVES:
        lr = best_lr(runs, 'u', obj, preset)
        extra += [spec('u', obj, lr, sd) for sd in seeds[1:]]
        extra += [spec('u', obj, lr, seeds[0], **x) for x in (dict(noise_rate=preset['noise_high']),
                                                              dict(n_train=preset['multi_epoch_n_train']))]
    yield 'pmi seeds and ablations', extra


def scaling_spec(preset, lr, obj, n_layer, n_embd, iters):
    """A scaling point; the keys equal to the preset's base are left out, so the point that
    matches a main run is that run."""
    b = preset['base']
    extra = {k: v for k, v in (('n_layer', n_layer), ('n_embd', n_embd), ('max_iters', iters)) if v != b[k]}
    return spec('u', obj, lr, preset['seeds'][0], **extra)


def run_study(preset, out_root, runs_dir, log_main):
    t0 = time.time()
    runs = load_runs(runs_dir)
    for phase, specs in plan_live(preset, runs_dir):
        todo = [s for s in specs if run_name(s) not in runs]
        log_main(f"[{time.time() - t0:6.0f}s] phase {phase}: {len(specs)} runs, {len(todo)} to do")
        for s in specs:
            r = execute(s, preset, out_root, runs_dir, log_main)
            runs[r['name']] = r
    return time.time() - t0


def plan_live(preset, runs_dir):
    """plan() re-reading the run JSONs between phases, so best rates come from finished sweeps."""
    phase_i = 0
    while True:
        runs = load_runs(runs_dir)
        phases = list(_phases_upto(preset, runs, phase_i))
        if phase_i >= len(phases):
            return
        yield phases[phase_i]
        phase_i += 1


def _phases_upto(preset, runs, k):
    for i, p in enumerate(plan(preset, runs)):
        yield p
        if i >= k:
            return


# ---------------------------------------------------------------------------------------------
# Aggregation

def mean_std(values):
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if len(v) == 0:
        return float('nan'), float('nan'), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def relative_gain(new, base, metrics=REL_METRICS):
    """Mean over metrics of the signed relative change of `new` over `base` (+ = better), and the
    per-metric changes. A metric whose baseline is 0 is left out (its relative change is undefined)."""
    per = {}
    for key, sign in metrics.items():
        b, n = base.get(key), new.get(key)
        if b is None or n is None or math.isnan(b) or math.isnan(n) or abs(b) < 1e-9:
            continue
        per[key] = sign * (n - b) / abs(b)
    return (float(np.mean(list(per.values()))) if per else float('nan')), per


# Student's t, two-sided 95%, by degrees of freedom; between listed dfs the smaller df's (larger) value
T_CRIT_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
             15: 2.13, 20: 2.09, 30: 2.04}


def paired_t(diffs):
    """(t statistic of the mean of paired differences, its two-sided 95% critical value)."""
    n = len(diffs)
    if n < 2:
        return float('nan'), float('inf')
    mean, se = float(np.mean(diffs)), float(np.std(diffs, ddof=1)) / math.sqrt(n)
    t = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(float('inf'), mean))
    return t, T_CRIT_95[max(df for df in T_CRIT_95 if df <= n - 1)]


def fit_power_law(flops, values):
    """values ~ a * flops^(-k): least squares in log-log; returns (k, a, r2)."""
    x, y = np.log(np.asarray(flops, float)), np.log(np.asarray(values, float))
    slope, icpt = np.polyfit(x, y, 1)
    pred = icpt + slope * x
    ss = ((y - y.mean()) ** 2).sum()
    r2 = 1 - ((y - pred) ** 2).sum() / ss if ss > 0 else float('nan')
    return float(-slope), float(np.exp(icpt)), float(r2)


def aggregate(preset, runs):
    seeds = preset['seeds']
    out = {'preset': {k: list(v) if isinstance(v, tuple) else v for k, v in preset.items()}, 'main': {}, 'sweep': {}, 'relative_gain': {},
           'ablations': {}, 'scaling': {}}
    best = {}
    for st in ('u', 'h'):
        for obj in OBJECTIVES + EXTRA_OBJECTIVES:
            if obj in EXTRA_OBJECTIVES and not any(runs.get(run_name(spec(st, obj, lr, seeds[0])))
                                                   for lr in preset['lrs']):
                continue
            sweep = {}
            for lr in preset['lrs']:
                r = runs.get(run_name(spec(st, obj, lr, seeds[0])))
                if r:
                    sweep[f'{lr:g}'] = {'val_' + MAIN_METRIC: r['val'][MAIN_METRIC], 'val_attr_acc': r['val']['attr_acc'],
                                        'run': r['name']}
            out['sweep'][f'{st}/{obj}'] = sweep
            lr = best_lr(runs, st, obj, preset)
            best[st, obj] = lr
            if lr is None:
                continue
            rs = [runs.get(run_name(spec(st, obj, lr, sd))) for sd in seeds]
            rs = [r for r in rs if r]
            out['main'][f'{st}/{obj}'] = {
                'lr': lr, 'runs': [r['name'] for r in rs],
                'metrics': {k: mean_std([r['test'][k] for r in rs])[:2] for k in REPORT_KEYS},
                'n_seeds': len(rs), 'flops': rs[0]['flops'] if rs else None,
                'train_seconds': mean_std([r['train_seconds'] for r in rs])[:2],
                'ms_per_iter': mean_std([r.get('ms_per_iter') for r in rs])[:2]}
        for obj in ('prior', 'prior_floor') + EXTRA_OBJECTIVES:
            if best.get((st, 'ntp')) is None or best.get((st, obj)) is None:
                continue
            gains, gains_tf, per_metric = [], [], {}
            for sd in seeds:
                a = runs.get(run_name(spec(st, obj, best[st, obj], sd)))
                b = runs.get(run_name(spec(st, 'ntp', best[st, 'ntp'], sd)))
                if a and b:
                    g, per = relative_gain(a['test'], b['test'])
                    gains.append(g)
                    gains_tf.append(relative_gain(a['test'], b['test'], REL_METRICS_TF)[0])
                    for k, v in per.items():
                        per_metric.setdefault(k, []).append(v)
            m, s, n = mean_std(gains)
            m_tf, s_tf, _ = mean_std(gains_tf)
            out['relative_gain'][f'{st}/{obj}'] = {
                'mean': m, 'std': s, 'n_pairs': n, 'per_seed': gains,
                'per_metric': {k: mean_std(v)[:2] for k, v in per_metric.items()},
                'metrics_included': list(REL_METRICS),
                'teacher_forced': {'mean': m_tf, 'std': s_tf, 'per_seed': gains_tf,
                                   'metrics_included': list(REL_METRICS_TF)}}
    # ablations: one seed, each objective at its U rate
    variants = [('default', {}), ('noise 0', dict(noise_rate=0.0)),
                (f"noise {preset['noise_high']:g}", dict(noise_rate=preset['noise_high'])),
                ('filler low', dict(filler='low')), ('filler high', dict(filler='high')),
                (f"multi-epoch (n_train {preset['multi_epoch_n_train']})", dict(n_train=preset['multi_epoch_n_train']))]
    for label, extra in variants:
        row = {}
        for obj in OBJECTIVES + ('oracle',) + EXTRA_OBJECTIVES:
            lr = best.get(('u', 'prior' if obj == 'oracle' else obj))
            if lr is None:
                continue
            r = runs.get(run_name(spec('u', obj, lr, seeds[0], **extra)))
            if r:
                row[obj] = {'run': r['name'], **{k: r['test'][k] for k in REPORT_KEYS},
                            'epochs': r['samples'] / r['config']['n_train']}
        if 'ntp' in row:
            for obj in [o for o in row if o != 'ntp']:
                row[obj]['relative_gain_vs_ntp'] = relative_gain(row[obj], row['ntp'])[0]
                row[obj]['relative_gain_tf_vs_ntp'] = relative_gain(row[obj], row['ntp'], REL_METRICS_TF)[0]
        out['ablations'][label] = row
    # scaling
    for obj in ('ntp', 'prior'):
        lr = best.get(('u', obj))
        if lr is None:
            continue
        pts = []
        for n_layer, n_embd in preset['sizes']:
            for iters in preset['budgets']:
                r = runs.get(run_name(scaling_spec(preset, lr, obj, n_layer, n_embd, iters)))
                if r:
                    pts.append({'run': r['name'], 'n_layer': n_layer, 'n_embd': n_embd, 'max_iters': iters,
                                'n_params': r['n_params'], 'flops': r['flops'], MAIN_METRIC: r['test'][MAIN_METRIC],
                                'attr_err': 1 - r['test']['attr_acc']})
        entry = {'lr': lr, 'points': pts}
        if len(pts) >= 3:
            for metric in (MAIN_METRIC, 'attr_err'):
                k, a, r2 = fit_power_law([p['flops'] for p in pts], [max(p[metric], 1e-6) for p in pts])
                entry[f'fit_{metric}'] = {'exponent': k, 'coefficient': a, 'r2': r2}
            # compute frontier: points better than every cheaper point (the lower envelope)
            front, best_so_far = [], float('inf')
            for p in sorted(pts, key=lambda p: p['flops']):
                if p[MAIN_METRIC] < best_so_far:
                    front.append(p)
                    best_so_far = p[MAIN_METRIC]
            entry['frontier'] = [p['run'] for p in front]
            if len(front) >= 3:
                k, a, r2 = fit_power_law([p['flops'] for p in front], [p[MAIN_METRIC] for p in front])
                entry['fit_frontier'] = {'exponent': k, 'coefficient': a, 'r2': r2}
        out['scaling'][obj] = entry
    out['best_lr'] = {f'{st}/{obj}': lr for (st, obj), lr in best.items()}
    ref = [r['reference_seconds'] for r in runs.values() if r.get('reference_seconds') is not None
           and r['config']['n_layer'] == preset['base']['n_layer'] and r['config']['n_embd'] == preset['base']['n_embd']
           and r['config']['n_train'] == preset['base']['n_train']]
    out['reference_seconds'] = mean_std(ref)[:2] + (len(ref),)
    return out


# ---------------------------------------------------------------------------------------------
# Report

def fmt(m, s=None, digits=3):
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return 'n/a'
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def pct(m, s=None):
    if m is None or math.isnan(m):
        return 'n/a'
    return f"{100 * m:+.1f}%" if s is None else f"{100 * m:+.1f}% ± {100 * s:.1f}"


def write_plots(agg, runs, preset, results_dir):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    colours = {'ntp': 'tab:blue', 'prior': 'tab:red', 'prior_floor': 'tab:green', 'oracle': 'tab:gray',
               'prior_floor_pmi': 'tab:purple'}
    files = []
    # learning curves: mean over seeds (band = min..max), val split
    keys = [('loss_relevant', 'val loss, relevant tokens'), ('loss_filler', 'val loss, filler tokens'),
            ('loss_noise', 'val loss, noise tokens'), ('attr_acc', 'val attribute accuracy')]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for row, st in enumerate(('u', 'h')):
        for obj in OBJECTIVES + EXTRA_OBJECTIVES:
            m = agg['main'].get(f'{st}/{obj}')
            if not m:
                continue
            curves = [runs[n]['curve'] for n in m['runs']]
            steps = [c['step'] for c in curves[0]]
            for col, (key, title) in enumerate(keys):
                vals = np.array([[c[i][key] for i in range(len(steps))] for c in curves])
                ax = axes[row, col]
                ax.plot(steps, vals.mean(0), 'o-', ms=3, color=colours[obj], label=f"{obj} (lr {m['lr']:g})")
                ax.fill_between(steps, vals.min(0), vals.max(0), color=colours[obj], alpha=0.15)
                ax.set_title(f"{st.upper()}: {title}", fontsize=9)
                ax.set_xlabel('step')
        axes[row, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, 'curves.png'), dpi=80)
    plt.close(fig)
    files.append('curves.png')
    # scaling
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for obj, entry in agg['scaling'].items():
        pts = entry['points']
        if not pts:
            continue
        for ax, metric in zip(axes, (MAIN_METRIC, 'attr_err')):
            x = np.array([p['flops'] for p in pts])
            ax.loglog(x, [p[metric] for p in pts], 'o', color=colours[obj], alpha=0.7)
            fit = entry.get(f'fit_{metric}')
            if fit:
                xs = np.geomspace(x.min(), x.max(), 20)
                ax.loglog(xs, fit['coefficient'] * xs ** (-fit['exponent']), '-', color=colours[obj],
                          label=f"{obj}: exponent {fit['exponent']:.3f} (R² {fit['r2']:.2f})")
            ax.set_xlabel('training FLOPs'), ax.set_ylabel(f'test {metric}')
    for ax in axes:
        ax.legend(fontsize=8)
    axes[0].set_title('U-LVLM scaling: test loss on relevant tokens'), axes[1].set_title('1 - attribute accuracy')
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, 'scaling.png'), dpi=80)
    plt.close(fig)
    files.append('scaling.png')
    # ablations: loss per class and attr_acc per data variant
    labels = [l for l, row in agg['ablations'].items() if row]
    if labels:
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
        objs = [o for o in ('ntp', 'prior', 'prior_floor', 'oracle') + EXTRA_OBJECTIVES
                if any(o in agg['ablations'][l] for l in labels)]
        width = 0.8 / len(objs)
        for ax, key in zip(axes, ('loss_relevant', 'loss_filler', 'loss_noise', 'attr_acc')):
            for j, obj in enumerate(objs):
                xs = [i + j * width for i, l in enumerate(labels) if obj in agg['ablations'][l]]
                ys = [agg['ablations'][l][obj][key] for l in labels if obj in agg['ablations'][l]]
                ax.bar(xs, ys, width, color=colours[obj], label=obj)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
            ax.set_xticklabels(labels, rotation=30, ha='right', fontsize=7)
            ax.set_title(f'test {key} (U, 1 seed)', fontsize=9)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(results_dir, 'ablations.png'), dpi=80)
        plt.close(fig)
        files.append('ablations.png')
    return files


def summary_text(agg, preset, preset_name):
    """Plain statements, each number pointing at results/ (study.json and runs/*.json)."""
    L = []
    n_seeds = len(preset['seeds'])
    b = preset['base']
    L.append(f"Setup ({preset_name} preset): shapes data, n_train {b['n_train']}, test {b['n_test']} captions "
             f"({preset['n_generate']} captioned greedily for hallucination/recall/exact); GPT {b['n_layer']}x"
             f"{b['n_embd']} initialised from the text-only reference; {b['max_iters']} iterations of batch "
             f"{b['batch_size']}; learning rate picked per objective from {preset['lrs']} on val "
             f"{MAIN_METRIC}; {n_seeds} seeds at that rate (same data order and init per seed across "
             f"objectives). Mean ± std over seeds. Relative gain = mean over {', '.join(REL_METRICS)} of the "
             f"relative change vs NTP, signed so + is better, paired by seed (a metric with NTP value 0, or undefined, is left "
             f"out); 'teacher-forced' = the same over {', '.join(REL_METRICS_TF)} only. Numbers: "
             f"results/study.json, per run results/runs/*.json.")
    lrs, best = preset['lrs'], agg.get('best_lr', {})
    edges = [f"the {name} ({lr:g}) for {', '.join(sorted(k for k, v in best.items() if v == lr))}"
             for name, lr in (('largest', max(lrs)), ('smallest', min(lrs))) if lr in best.values()]
    if edges:
        L.append(f"Limitation: the best rate is {' and '.join(edges)} of the {len(lrs)} tried, so the sweep "
                 f"does not bracket those optima; a wider sweep could change the comparison.")
    L.append('')
    for st in ('u', 'h'):
        n, p, f = (agg['main'].get(f'{st}/{o}') for o in OBJECTIVES)
        g, gf = agg['relative_gain'].get(f'{st}/prior'), agg['relative_gain'].get(f'{st}/prior_floor')
        if not (n and p and g):
            L.append(f"- {SETTING_NAMES[st]}: not enough runs yet.")
            continue
        nm, pm = n['metrics'], p['metrics']
        better = [k for k in REL_METRICS if k in g['per_metric'] and g['per_metric'][k][0] > 0]
        worse = [k for k in REL_METRICS if k in g['per_metric'] and g['per_metric'][k][0] < 0]
        t, t_crit = paired_t(g['per_seed'])
        tf_t, _ = paired_t(g['teacher_forced']['per_seed'])
        ahead = 'PRIOR ahead of NTP' if g['mean'] > 0 else 'PRIOR not ahead of NTP'
        verdict = (f"{ahead}, significant at 95% (paired t {t:.2f} > {t_crit:.2f})" if abs(t) > t_crit else
                   f"{ahead} on average, not significant at 95% with {g['n_pairs']} seeds (paired t {t:.2f}, "
                   f"needs {t_crit:.2f})")
        L.append(f"- {SETTING_NAMES[st]}: {verdict}: relative gain {pct(g['mean'], g['std'])} "
                 f"(per seed {', '.join(pct(x) for x in g['per_seed'])}; teacher-forced metrics only: "
                 f"{pct(g['teacher_forced']['mean'], g['teacher_forced']['std'])}, paired t {tf_t:.2f}). "
                 f"Better on: {', '.join(better) or 'none'}; "
                 f"worse on: {', '.join(worse) or 'none'}. loss_relevant {fmt(*nm['loss_relevant'])} (NTP) vs "
                 f"{fmt(*pm['loss_relevant'])} (PRIOR); attr_acc {fmt(*nm['attr_acc'])} vs {fmt(*pm['attr_acc'])}; "
                 f"hallucination {fmt(*nm['hallucination'])} vs {fmt(*pm['hallucination'])}.")
        L.append(f"  Cost: filler loss {fmt(*nm['loss_filler'])} (NTP) vs {fmt(*pm['loss_filler'])} (PRIOR), "
                 f"noise-token loss {fmt(*nm['loss_noise'])} vs {fmt(*pm['loss_noise'])}, total caption loss "
                 f"{fmt(*nm['loss'])} vs {fmt(*pm['loss'])}. (Step times: see bench.py; the study's runs share a "
                 f"busy machine, so their timings are not comparable.)")
        if f and gf:
            fm = f['metrics']
            L.append(f"  PRIOR + weight floor {preset['floor']}: relative gain over NTP {pct(gf['mean'], gf['std'])} "
                     f"(teacher-forced only {pct(gf['teacher_forced']['mean'], gf['teacher_forced']['std'])}); "
                     f"loss_relevant {fmt(*fm['loss_relevant'])}, filler loss {fmt(*fm['loss_filler'])}, "
                     f"noise loss {fmt(*fm['loss_noise'])}, total {fmt(*fm['loss'])}.")
        x, gx = agg['main'].get(f'{st}/prior_floor_pmi'), agg['relative_gain'].get(f'{st}/prior_floor_pmi')
        if x and gx:
            xm = x['metrics']
            L.append(f"  PRIOR + floor {preset['floor']} + PMI gain (beta {PMI_BETA:g}; not in the paper, see study.py "
                     f"pmi_objective): relative gain over NTP {pct(gx['mean'], gx['std'])} (teacher-forced only "
                     f"{pct(gx['teacher_forced']['mean'], gx['teacher_forced']['std'])}); loss_relevant "
                     f"{fmt(*xm['loss_relevant'])}, filler loss {fmt(*xm['loss_filler'])}, noise loss "
                     f"{fmt(*xm['loss_noise'])}, total {fmt(*xm['loss'])}.")
    rs = agg.get('reference_seconds')
    if rs and rs[2]:
        L.append(f"- One-off cost of PRIOR: the text-only reference LM, trained and scored once per data set and seed "
                 f"({fmt(rs[0], rs[1], 1)} s here, n={rs[2]}); in this setup NTP starts from the same reference "
                 f"(init_lm=ref), so only the weighting is PRIOR-specific.")
    L.append('')
    ab = agg['ablations']
    if ab:
        parts = []
        for label, row in ab.items():
            if 'ntp' in row and 'prior' in row:
                parts.append(f"{label}: {pct(row['prior']['relative_gain_vs_ntp'])}, teacher-forced "
                             f"{pct(row['prior']['relative_gain_tf_vs_ntp'])} (loss_relevant "
                             f"{fmt(row['ntp']['loss_relevant'])} -> {fmt(row['prior']['loss_relevant'])}, filler "
                             f"{fmt(row['ntp']['loss_filler'])} -> {fmt(row['prior']['loss_filler'])})")
        L.append("- Data ablations (U, one seed, PRIOR's relative gain over NTP): " + '; '.join(parts) + '.')
        d = ab.get('default', {})
        if 'oracle' in d and 'ntp' in d:
            L.append(f"- Label oracle (weight 1 on the image-relevant tokens, 0 on every other token, end-of-text "
                     f"included): a ceiling for teacher-forced loss_relevant only; it never learns the filler words "
                     f"or when to stop, so its greedy captions do not parse (hallucination undefined, recall 0): "
                     f"relative gain {pct(d['oracle']['relative_gain_vs_ntp'])}, teacher-forced "
                     f"{pct(d['oracle']['relative_gain_tf_vs_ntp'])}, loss_relevant "
                     f"{fmt(d['oracle']['loss_relevant'])}, filler loss {fmt(d['oracle']['loss_filler'])}.")
    sc = agg['scaling']
    if all(f'fit_{MAIN_METRIC}' in sc.get(o, {}) for o in ('ntp', 'prior')):
        kn, kp = sc['ntp'][f'fit_{MAIN_METRIC}'], sc['prior'][f'fit_{MAIN_METRIC}']
        L.append(f"- Scaling (U, {len(preset['sizes'])} sizes x {len(preset['budgets'])} budgets, one seed): "
                 f"test {MAIN_METRIC} ~ FLOPs^-k with k = {kn['exponent']:.3f} (NTP, R² {kn['r2']:.2f}) and "
                 f"{kp['exponent']:.3f} (PRIOR, R² {kp['r2']:.2f}); PRIOR's exponent is "
                 f"{'steeper' if kp['exponent'] > kn['exponent'] else 'not steeper'}. With 1 - attr_acc: "
                 f"{sc['ntp']['fit_attr_err']['exponent']:.3f} (NTP) vs {sc['prior']['fit_attr_err']['exponent']:.3f} "
                 f"(PRIOR). Nine points from a tiny compute range, one seed each: read the exponents as indicative.")
    return '\n'.join(L)


def write_report(preset, preset_name, results_dir, runtime=None):
    runs = load_runs(os.path.join(results_dir, 'runs'))
    agg = aggregate(preset, runs)
    if runtime is not None:
        agg['runtime_seconds'] = runtime
    else:
        old = os.path.join(results_dir, 'study.json')
        if os.path.exists(old):
            agg['runtime_seconds'] = json.load(open(old)).get('runtime_seconds')
    agg['n_runs'] = len(runs)
    agg['train_seconds_total'] = sum(r['seconds'] for r in runs.values())
    agg['preset_name'] = preset_name
    with open(os.path.join(results_dir, 'study.json'), 'w') as f:
        json.dump(agg, f, indent=1)
    files = write_plots(agg, runs, preset, results_dir)
    summary = summary_text(agg, preset, preset_name)
    with open(os.path.join(results_dir, 'summary.md'), 'w') as f:
        f.write(summary + '\n')
    md = [f"# PRIOR vs NTP: replication study ({preset_name} preset)", '',
          f"Produced by `python study.py{'' if preset_name == 'full' else ' --' + preset_name}`; {len(runs)} runs, "
          f"{agg['train_seconds_total'] / 60:.0f} min of run time"
          + (f", {agg['runtime_seconds'] / 60:.0f} min wall for the last invocation" if agg.get('runtime_seconds') else '')
          + ". Every number below is in `study.json` or `runs/<run>.json`.", '', '## Summary', '', summary, '']
    for st in ('u', 'h'):
        cols = [o for o in OBJECTIVES + EXTRA_OBJECTIVES if f'{st}/{o}' in agg['main']]
        if not cols:
            continue
        md += [f"## {SETTING_NAMES[st]}: test metrics, mean ± std over seeds", '',
               '| metric | ' + ' | '.join(f"{o} (lr {agg['main'][f'{st}/{o}']['lr']:g}, n={agg['main'][f'{st}/{o}']['n_seeds']})"
                                       for o in cols) + ' |',
               '|---' * (len(cols) + 1) + '|']
        for k in REPORT_KEYS:
            arrow = '↓' if k in LOWER_BETTER else '↑'
            md.append(f'| {k} {arrow} | ' + ' | '.join(fmt(*agg['main'][f'{st}/{o}']['metrics'][k]) for o in cols) + ' |')
        for o in ('prior', 'prior_floor') + EXTRA_OBJECTIVES:
            g = agg['relative_gain'].get(f'{st}/{o}')
            if g:
                md.append(f"| relative gain vs NTP ({o}) | " + ' | '.join(
                    pct(g['mean'], g['std']) if c == o else '' for c in cols) + ' |')
                md.append(f"| relative gain vs NTP, teacher-forced ({o}) | " + ' | '.join(
                    pct(g['teacher_forced']['mean'], g['teacher_forced']['std']) if c == o else '' for c in cols) + ' |')
        md.append('')
    md += ['## Learning-rate sweep (val, first seed)', '', '| setting/objective | ' +
           ' | '.join(f'lr {lr:g}: val {MAIN_METRIC} / attr_acc' for lr in preset['lrs']) + ' | best |',
           '|---' * (len(preset['lrs']) + 2) + '|']
    for key, sw in agg['sweep'].items():
        md.append(f'| {key} | ' + ' | '.join(
            f"{fmt(sw[f'{lr:g}']['val_' + MAIN_METRIC])} / {fmt(sw[f'{lr:g}']['val_attr_acc'])}" if f'{lr:g}' in sw else 'n/a'
            for lr in preset['lrs']) + f" | {agg['best_lr'].get(key)} |")
    md += ['', '## Per-metric relative change vs NTP (mean ± std over seed pairs)', '',
           '| metric | ' + ' | '.join(agg['relative_gain']) + ' |', '|---' * (len(agg['relative_gain']) + 1) + '|']
    for k in REL_METRICS:
        md.append(f'| {k} | ' + ' | '.join(pct(*g['per_metric'][k]) if k in g['per_metric'] else 'n/a'
                                          for g in agg['relative_gain'].values()) + ' |')
    md += ['', '## Data ablations (U-LVLM, first seed, each objective at its U rate)', '',
           '| data | objective | epochs | loss | relevant | filler | noise | attr_acc | halluc. | recall | exact | rel. gain vs NTP | teacher-forced |',
           '|---' * 13 + '|']
    for label, row in agg['ablations'].items():
        for obj, r in row.items():
            md.append(f"| {label} | {obj} | {r['epochs']:.1f} | " + ' | '.join(fmt(r[k]) for k in (
                'loss', 'loss_relevant', 'loss_filler', 'loss_noise', 'attr_acc', 'hallucination', 'recall', 'exact'))
                + f" | {pct(r.get('relative_gain_vs_ntp', float('nan')))} | {pct(r.get('relative_gain_tf_vs_ntp', float('nan')))} |")
    md += ['', f'## Scaling (U-LVLM, first seed): test {MAIN_METRIC} vs training FLOPs', '',
           '| objective | n_layer x n_embd | params | iters | FLOPs | loss_relevant | 1 - attr_acc |', '|---' * 7 + '|']
    for obj, entry in agg['scaling'].items():
        for p in entry['points']:
            md.append(f"| {obj} | {p['n_layer']}x{p['n_embd']} | {p['n_params']:,} | {p['max_iters']} | "
                      f"{p['flops']:.3g} | {fmt(p[MAIN_METRIC])} | {fmt(p['attr_err'])} |")
    md.append('')
    for obj, entry in agg['scaling'].items():
        for key in (f'fit_{MAIN_METRIC}', 'fit_attr_err', 'fit_frontier'):
            if key in entry:
                e = entry[key]
                md.append(f"- {obj}, {key[4:]}{' (compute frontier: points better than every cheaper one, ' + MAIN_METRIC + ')' if key == 'fit_frontier' else ''}: "
                          f"exponent {e['exponent']:.3f}, R² {e['r2']:.2f}")
    md += ['', '## Plots', ''] + [f'![{f}]({f})' for f in files]
    md += ['', 'FLOPs = model.flops_per_sample(T) x max_iters x batch, T = mean padded caption length of a batch.']
    with open(os.path.join(results_dir, 'results.md'), 'w') as f:
        f.write('\n'.join(md) + '\n')
    return agg


def main(argv):
    args = dict(a[2:].split('=', 1) if '=' in a else (a[2:], '1') for a in argv)
    unknown = set(args) - {'quick', 'tiny', 'full', 'report', 'results', 'out', 'threads'}
    if unknown or any(not a.startswith('--') for a in argv):
        sys.exit("usage: python study.py [--quick|--tiny] [--report] [--results=DIR] [--out=DIR] [--threads=N]")
    preset_name = 'tiny' if 'tiny' in args else 'quick' if 'quick' in args else 'full'
    preset = PRESETS[preset_name]
    default_results = os.path.join(ROOT, 'results', *(() if preset_name == 'full' else (preset_name,)))
    results_dir = os.path.abspath(args.get('results', default_results))
    out_root = os.path.abspath(args.get('out', os.path.join(ROOT, 'out', 'study', preset_name)))
    runs_dir = os.path.join(results_dir, 'runs')
    os.makedirs(runs_dir, exist_ok=True)
    marker = os.path.join(results_dir, 'preset.txt')
    if os.path.exists(marker) and open(marker).read().strip() != preset_name and 'report' not in args:
        sys.exit(f"{results_dir} holds a {open(marker).read().strip()!r} study; use another --results=DIR")
    with open(marker, 'w') as f:
        f.write(preset_name + '\n')
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    import torch
    torch.set_num_threads(int(args.get('threads', 1)))

    def log_main(msg):
        print(msg, flush=True)

    runtime = None
    if 'report' not in args:
        runtime = run_study(preset, out_root, runs_dir, log_main)
        log_main(f"study done in {runtime / 60:.1f} min")
    agg = write_report(preset, preset_name, results_dir, runtime)
    log_main(f"wrote {results_dir}/results.md, summary.md, study.json and plots ({agg['n_runs']} runs)")
    return agg


if __name__ == '__main__':
    main(sys.argv[1:])
