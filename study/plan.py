"""
The study's run plan: presets, run specs, the phases of the protocol, and one run (train.py's
train(), then eval.py's metrics on the test split) written as a JSON record.

A spec is a small dict; its name is derived from it, so a run asked for by two phases (a main
run that is also the top scaling point) runs once, and a run whose JSON exists is never rerun:
an interrupted study resumes where it stopped.
"""

import dataclasses
import json
import multiprocessing
import os
import subprocess
import time

import numpy as np
import torch

import config as config_mod
from data import global_batch, load_splits
import eval as evaluation
from prior_loss import IGNORE, gain_weights, token_nll, token_weights
from runs.errors import ConfigError
from runs.files import checkpoint_path
from runs.progress import train_flops
from runs.reference_files import load_cache
from sources.shapes import CLASS_NAMES
from train import target_weights_source, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {'u': 'configs/shapes_u.py', 'h': 'configs/shapes_h.py'}
# Each objective of the study is a loss with its settings. prior_floor: PRIOR + the preset's weight floor;
# prior_a05: PRIOR at alpha 0.5; label: the label-informed ceiling; gain, prior_gain: prior_loss.py.
OBJECTIVES = {'ntp': {'loss': 'ntp'}, 'prior': {'loss': 'prior'}, 'prior_floor': {'loss': 'prior'},
              'prior_a05': {'loss': 'prior', 'alpha': 0.5}, 'label': {'loss': 'label'}, 'gain': {'loss': 'gain'},
              'prior_gain': {'loss': 'prior_gain'}}
STATIC_WEIGHTS = ('prior', 'prior_floor', 'prior_a05', 'label')     # weights fixed before training (else: the model's)
DYNAMIC_WEIGHT_ROWS = 2000                       # the training captions whose weights the gain weightings report
SELECT_METRIC = 'attr_acc'                       # chosen on val, teacher-forced, higher is better
CONDITIONS = ('clean', 'noisy')                  # training captions as drawn, or with caption noise
SPEC_KEYS = ('caption_noise', 'n_train', 'max_iters', 'freeze_lm')    # what a spec may change beyond the preset

PRESETS = {
    # The protocol's main preset: every number in docs/results.md comes from it.
    'full': dict(
        base=dict(),                             # configs/shapes_u.py and configs/shapes_h.py as they are
        objectives=('ntp', 'prior', 'prior_floor'), noisy_objectives=('ntp', 'prior'),
        lrs=[2e-3, 4e-3, 8e-3], seeds=[1, 2, 3, 4, 5], floor=0.2, n_generate=200, caption_noise=0.4,
        compute_fractions=[1 / 16, 1 / 8, 1 / 4, 1 / 2], data_fractions=[1 / 4, 1 / 2], scaling_seeds=2,
        frozen_lm_seeds=2),
    # Beyond PRIOR (the weightings of prior_loss.py against NTP, PRIOR and the label ceiling), fixed
    # before its first run: a finer rate grid (factor sqrt 2) chosen on val averaged over 2 seeds, every
    # objective on clean and noisy captions, no scaling or frozen-LM phases.
    'beyond': dict(
        base=dict(), objectives=('ntp', 'prior', 'label', 'gain', 'prior_gain'),
        noisy_objectives=('ntp', 'prior', 'label', 'gain', 'prior_gain'),
        lrs=[2e-3, 2.83e-3, 4e-3, 5.66e-3], lr_step=2 ** 0.5, select_seeds=2, seeds=[1, 2, 3, 4, 5], floor=0.2,
        n_generate=200, caption_noise=0.4, compute_fractions=[], data_fractions=[], scaling_seeds=0,
        frozen_lm_seeds=0),
    # For tests: the same phases at a size that runs in about a minute.
    'tiny': dict(
        base=dict(n_train=96, n_val=32, n_test=32, n_layer=1, n_head=2, n_embd=16, vit_layer=1, vit_embd=16,
                  max_iters=8, warmup_iters=2, batch_size=8, eval_interval=2, eval_batches=1, log_interval=4,
                  ckpt_interval=0, ref_max_iters=4, ref_batch_size=16, enc_max_iters=4, enc_batch_size=16),
        objectives=('ntp', 'prior', 'prior_floor', 'label', 'gain'), noisy_objectives=('ntp', 'prior'),
        lrs=[2e-3, 4e-3, 8e-3], seeds=[1, 2], floor=0.2, n_generate=4, caption_noise=0.3,
        compute_fractions=[1 / 2], data_fractions=[1 / 2], scaling_seeds=2, frozen_lm_seeds=1),
}


def spec(setting, objective, lr, seed, **extra):
    unknown = set(extra) - set(SPEC_KEYS)
    assert not unknown, f"spec keys {unknown} are not study variables"
    return dict(setting=setting, objective=objective, lr=lr, seed=seed, **extra)


def results_folder(preset_name, data_seed=1234, seeds=None):
    """The default results folder: it names what differs from the protocol's own runs (the preset, a data
    seed, seeds), so re-runs on other seeds or data never mix with them."""
    name = 'results' if preset_name == 'full' else f"results_{preset_name}"
    name += f"_data{data_seed}" * (data_seed != 1234) + (f"_seeds{'-'.join(map(str, seeds))}" if seeds else '')
    return os.path.join(ROOT, 'study', name)


def code_state():
    """The commit checked out and the tracked files changed since: the code a run starts with."""
    def git(*args):                              # porcelain lines start with a status column: keep its spaces
        return subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True).stdout.rstrip()
    return git('rev-parse', 'HEAD'), [line[3:] for line in git('status', '--porcelain', '--untracked-files=no').splitlines()]


def run_name(s):
    parts = [s['setting'], s['objective'], f"lr{s['lr']:g}", f"s{s['seed']}"]
    parts += [f"{k}{s[k]:g}" if isinstance(s[k], float) else f"{k}{s[k]}" for k in SPEC_KEYS if k in s]
    return '_'.join(parts).replace('.', 'p')


def make_config(s, preset, out_root, data_seed):
    """The train.py Config of a spec: the setting's preset file, the study's base, then the spec."""
    cfg = config_mod.load_config([os.path.join(ROOT, SETTINGS[s['setting']])])
    fields = dict(preset['base'], learning_rate=s['lr'], seed=s['seed'], data_seed=data_seed, device='cpu',
                  final_eval=False, compile=False, out_dir=os.path.join(out_root, run_name(s)),
                  weight_floor=preset['floor'] if s['objective'] == 'prior_floor' else 0.0, **OBJECTIVES[s['objective']])
    fields.update({k: s[k] for k in SPEC_KEYS if k in s})
    if 'max_iters' in s:                         # keep the same number of val points on every curve
        fields['eval_interval'] = fields['log_interval'] = max(1, s['max_iters'] // 16)
    cfg = dataclasses.replace(cfg, **fields)
    config_mod.check(cfg)
    return cfg


def execute(s, preset, out_root, runs_dir, data_seed):
    """Train and evaluate one spec unless its JSON exists; returns its record."""
    name = run_name(s)
    path = os.path.join(runs_dir, name + '.json')
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    cfg = make_config(s, preset, out_root, data_seed)
    # a checkpoint without a record: the run was interrupted, and continues where it stopped
    cfg = dataclasses.replace(cfg, resume=os.path.exists(checkpoint_path(cfg.out_dir)))
    os.makedirs(cfg.out_dir, exist_ok=True)
    commit, uncommitted = code_state()
    t0 = time.time()
    with open(os.path.join(cfg.out_dir, 'train.log'), 'w') as logf:
        train(cfg, log=lambda *a, **k: print(*a, file=logf, flush=True))
    train_seconds = time.time() - t0
    model, vocab, _, ckpt = evaluation.load_trained(checkpoint_path(cfg.out_dir), 'cpu')
    model.lm.requires_grad_(not cfg.freeze_lm)   # as trained: FLOPs depend on what trains
    model.vision.requires_grad_(not cfg.freeze_vision)
    splits = load_splits(cfg, names=('train', 'test'))
    test, train_data = splits['test'].encode(vocab), splits['train'].encode(vocab)
    torch.manual_seed(0)
    metrics, captions = evaluation.evaluate(model, test, vocab, 'cpu', n_generate=preset['n_generate'])
    lengths = (train_data.targets != IGNORE).sum(1).float()
    flops_per_sample = float(np.mean([train_flops(model, int(n)) for n in lengths[:2000].tolist()]))
    rows = [json.loads(line) for line in open(os.path.join(cfg.out_dir, 'log.jsonl'))]
    curve = [{k[4:] if k.startswith('val_') else k: v for k, v in r.items()} for r in rows if 'val_loss' in r]
    weights = class_weights(s['objective'], cfg, model, train_data, vocab, ckpt) if s['objective'] != 'ntp' else None
    record = dict(name=name, spec=s, config=config_mod.as_dict(cfg), test=metrics, val=curve[-1], curve=curve,
                  flops=flops_per_sample * cfg.max_iters * global_batch(cfg),
                  n_params=sum(p.numel() for p in model.parameters()),
                  n_trained=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  class_weights=weights, sample_captions=captions[:3], train_seconds=train_seconds,
                  seconds=time.time() - t0, commit=commit, uncommitted=uncommitted)
    os.makedirs(runs_dir, exist_ok=True)
    with open(path + f'.tmp{os.getpid()}', 'w') as f:
        json.dump(record, f, indent=1)
    os.replace(path + f'.tmp{os.getpid()}', path)
    return record


def class_weights(objective, cfg, model, data, vocab, ckpt, n_rows=DYNAMIC_WEIGHT_ROWS):
    """The objective's mean training weight per true token class (1 = NTP). Weights fixed before training
    (PRIOR, the label ceiling) over every training caption; the gain weightings', which move with the
    model, as the trained model gives them on the first n_rows training captions."""
    rows = torch.arange(len(data))
    ref_probs = np.asarray(load_cache(ckpt['ref_ckpt'], data, vocab)) if cfg.loss != 'label' else None
    if objective not in STATIC_WEIGHTS:
        rows = rows[:n_rows]
    w, classes = objective_weights(objective, cfg, model, data, rows, ref_probs)
    return {c: float(w[classes == k].mean()) for k, c in enumerate(CLASS_NAMES)}


def objective_weights(objective, cfg, model, data, rows, ref_probs):
    """(weights [len(rows), T] the objective gives the rows of `data`, their true token classes). ref_probs:
    P_r [len(data), T] of every row (None for the label ceiling); the gain weightings also run `model`."""
    _, idx, targets, classes = data.batch(rows, 'cpu')
    p_r = target_weights_source(cfg, ref_probs, 'cpu')(rows, idx, targets, classes)
    if objective in STATIC_WEIGHTS:
        return token_weights(p_r, targets, cfg.alpha, cfg.weight_floor), classes
    with torch.no_grad():
        nll = torch.cat([token_nll(model(*data.batch(rows[i:i + 256], 'cpu')[:2]), targets[i:i + 256])
                         for i in range(0, len(rows), 256)])
    return gain_weights(nll, targets, p_r, cfg.loss, cfg.alpha), classes


def check_runs(runs, preset, out_root, data_seed):
    """Refuse a finished run made with other settings (another --data_seed, preset or config file) than
    this study would use for its spec: reusing it would mix two experiments. Compares the settings both
    know, except where the run's files went."""
    for name, r in runs.items():
        want = json.loads(json.dumps(config_mod.as_dict(make_config(r['spec'], preset, out_root, data_seed))))
        diff = sorted(k for k in set(want) & set(r['config']) - {'out_dir', 'resume'} if want[k] != r['config'][k])
        if diff:
            shown = ', '.join(f"{k}={r['config'][k]!r} (here {want[k]!r})" for k in diff[:3])
            raise ConfigError(f"run {name} was made with other settings than this study's: {shown}; "
                                         f"pass another --results")


def load_runs(runs_dir):
    out = {}
    for fn in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        if fn.endswith('.json'):
            with open(os.path.join(runs_dir, fn)) as f:
                r = json.load(f)
            out[r['name']] = r
    return out


def condition_extra(preset, condition):
    """The spec keys that make a run of `condition` (clean: none)."""
    return {'caption_noise': preset['caption_noise']} if condition == 'noisy' else {}


def by_seed(runs, setting, objective, lr, seeds, **extra):
    """{seed: run JSON} of one condition's runs that have finished."""
    out = {}
    for sd in seeds:
        r = runs.get(run_name(spec(setting, objective, lr, sd, **extra)))
        if r is not None:
            out[sd] = r
    return out


# ---------------------------------------------------------------------------------------------
# The protocol, phase by phase; a phase may read the results of the phases before it.

def select_seeds(preset):
    """The seeds whose val scores choose the learning rate (their mean)."""
    return preset['seeds'][:preset.get('select_seeds', 1)]


def val_score(runs, setting, objective, lr, preset):
    """Mean val SELECT_METRIC of the rate over the selection seeds, or None if one has not run."""
    found = [runs.get(run_name(spec(setting, objective, lr, sd))) for sd in select_seeds(preset)]
    return None if any(r is None for r in found) else float(np.mean([r['val'][SELECT_METRIC] for r in found]))


def sweep_lrs(runs, setting, objective, preset):
    """The rates to sweep: the preset's, extended by its lr_step (default 2) past an edge that wins (up to
    twice each way), so the chosen rate has a tried neighbour on both sides unless it lies beyond both extensions."""
    lrs, step = list(preset['lrs']), preset.get('lr_step', 2)
    for _ in range(4):
        scores = {lr: val_score(runs, setting, objective, lr, preset) for lr in lrs}
        if any(v is None for v in scores.values()):
            return lrs
        best = max(lrs, key=scores.get)
        if best == lrs[0] and lrs[0] > preset['lrs'][0] / step ** 2 * 1.01:
            lrs.insert(0, lrs[0] / step)
        elif best == lrs[-1] and lrs[-1] < preset['lrs'][-1] * step ** 2 / 1.01:
            lrs.append(lrs[-1] * step)
        else:
            return lrs
    return lrs


def best_lr(runs, setting, objective, preset):
    lrs = sweep_lrs(runs, setting, objective, preset)
    return max(lrs, key=lambda lr: val_score(runs, setting, objective, lr, preset))


def phases(preset, runs):
    """(phase name, specs) in order. Yields the sweep until every objective's best rate is inside
    its sweep; the later phases use those rates."""
    seeds, objectives = preset['seeds'], preset['objectives']
    sweep = [spec(st, obj, lr, sd) for st in SETTINGS for obj in objectives
             for lr in sweep_lrs(runs, st, obj, preset) for sd in select_seeds(preset)]
    yield 'sweep', sweep
    if any(run_name(s) not in runs for s in sweep):
        return
    best = {(st, obj): best_lr(runs, st, obj, preset) for st in SETTINGS for obj in objectives}
    yield 'main', [spec(st, obj, best[st, obj], sd) for st in SETTINGS for obj in objectives for sd in seeds]
    yield 'caption noise', [spec(st, obj, best[st, obj], sd, **condition_extra(preset, 'noisy'))
                            for st in SETTINGS for obj in preset['noisy_objectives'] for sd in seeds]
    scaling = []
    for obj in ('ntp', 'prior'):
        for sd in seeds[:preset['scaling_seeds']]:
            for f in preset['compute_fractions']:
                scaling.append(spec('u', obj, best['u', obj], sd, max_iters=round(setting_value(preset, 'max_iters') * f)))
            for f in preset['data_fractions']:
                scaling.append(spec('u', obj, best['u', obj], sd, n_train=round(setting_value(preset, 'n_train') * f)))
    if scaling:
        yield 'scaling', scaling
    if preset['frozen_lm_seeds']:
        yield 'H with the LM frozen', [spec('h', obj, best['h', obj], sd, freeze_lm=True)
                                       for obj in ('ntp', 'prior') for sd in seeds[:preset['frozen_lm_seeds']]]


def setting_value(preset, key, setting='u'):
    """A Config value of the preset's runs of `setting` before any spec changes it."""
    return preset['base'].get(key, getattr(config_mod.load_config([os.path.join(ROOT, SETTINGS[setting])]), key))


def _worker_init(threads):
    torch.set_num_threads(threads)


def _execute(args):
    return execute(*args)


def run_protocol(preset, out_root, runs_dir, data_seed, jobs=1, threads=1, log=print):
    """Run every phase (skipping finished runs), `jobs` runs at a time with `threads` each."""
    t0 = time.time()
    done = load_runs(runs_dir)
    phase_i = 0
    while True:
        plan = list(phases(preset, done))
        if phase_i >= len(plan):
            return time.time() - t0
        name, specs = plan[phase_i]
        todo = [s for s in specs if run_name(s) not in done]
        log(f"[{time.time() - t0:6.0f}s] phase {name}: {len(specs)} runs, {len(todo)} to do")
        args = [(s, preset, out_root, runs_dir, data_seed) for s in todo]
        pool = multiprocessing.get_context('spawn').Pool(jobs, _worker_init, (threads,)) if jobs > 1 else None
        if pool is None:
            _worker_init(threads)
        for r in pool.imap_unordered(_execute, args) if pool else map(_execute, args):
            done[r['name']] = r
            log(f"[{time.time() - t0:6.0f}s]   {r['name']}: {r['seconds']:.0f}s, test attr_acc "
                f"{r['test']['attr_acc']:.3f}, hallucination {r['test']['hallucination']:.3f}")
        if pool:
            pool.close()
            pool.join()
        if phase_i == 0 and any(run_name(s) not in done for s in list(phases(preset, done))[0][1]):
            continue                             # the sweep grew past an edge: run its new rates first
        phase_i += 1
