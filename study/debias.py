"""
Does debiased PRIOR beat NTP on the shapes data (issue 31)? The design, fixed in this file before
its first run:

- Settings U (configs/shapes_u.py) then H (configs/shapes_h.py), data seed 1234; training captions
  clean, or with caption noise 0.4 (the study's `noisy`); seeds 1-5. Runs go U clean, U noisy, H clean,
  H noisy, seed by seed: a condition not reached in the time there was is reported as not run.
- Objectives, each at the study's learning rate chosen on val (study/results/summary.md: U 0.004,
  H 0.002 for both NTP and PRIOR): ntp, prior (the paper's), prior_batch (PRIOR scaled per batch,
  where the correction is exact), at PRIOR's rate. PRIOR + debias and prior_batch + debias are the
  same checkpoints evaluated with reference.Debias, so they pair with their uncorrected selves.
- The correction's floor w_min, chosen on val: each of FLOORS on every seed's val split; per setting
  and objective, the floor with the highest val attr_acc averaged over seeds and both conditions.
- Evaluation (eval.evaluate): val and test splits, teacher-forced metrics on every caption and 200
  greedy captions, as the study's; debiased at every floor (test values at the unchosen floors are
  kept in the records, never used to choose).
- Headline: relative test attr_acc change vs NTP, paired by seed, 95% t-based interval, two-sided
  paired t-test; Holm's correction over the family of every (setting, condition, variant) headline
  test, variant in (prior, prior + debias, prior_batch, prior_batch + debias): 16 tests, fixed in
  advance whatever runs. Also shown: hallucination, recall, exact (points) and loss per token class.

    python -m study.debias                 # run what is missing, in order, then write the report
    python -m study.debias --report=True   # only the report (study/results_debias/report.md)
    python -m study.debias --settings=h --conditions=noisy     # a part of it (two processes: one condition each)
"""

import dataclasses
import json
import os
import sys
import time

os.environ.setdefault('OMP_NUM_THREADS', '1')

import torch  # noqa: E402

import eval as evaluation  # noqa: E402
from data import load_splits  # noqa: E402
from prior_loss import IGNORE, TILTED, prior_weight  # noqa: E402
from reference import debias_for  # noqa: E402
from runs.cli import cli, parse_flags  # noqa: E402
from runs.files import atomic_write, checkpoint_path  # noqa: E402
from runs.reference_files import load_cache, reference_of  # noqa: E402
from sources.shapes import CLASS_NAMES  # noqa: E402
from study.plan import PRESETS, ROOT, code_state, make_config, run_name, spec  # noqa: E402
from study.stats import holm, mean_std, relative_change, t_test  # noqa: E402
from train import train  # noqa: E402

FLAGS = {'results': os.path.join(ROOT, 'study', 'results_debias'), 'out': 'out/debias', 'report': False,
         'settings': 'u,h', 'conditions': 'clean,noisy'}      # two processes may split the work by condition
LR = {'u': 4e-3, 'h': 2e-3}
CONDITIONS = {'clean': {}, 'noisy': {'caption_noise': 0.4}}
SEEDS = [1, 2, 3, 4, 5]
OBJECTIVES = ('ntp', 'prior', 'prior_batch')
FLOORS = (0.02, 0.05, 0.1, 0.2, 0.5)
VARIANTS = ('prior', 'prior+debias', 'prior_batch', 'prior_batch+debias')
N_GENERATE = 200
SHOWN = ('attr_acc', 'hallucination', 'recall', 'exact', 'loss_relevant', 'loss_filler', 'loss_noise')


def split_metrics(model, data, vocab, debias=None):
    torch.manual_seed(0)
    return evaluation.evaluate(model, data, vocab, 'cpu', n_generate=N_GENERATE, debias=debias)[0]


def execute(setting, condition, objective, seed, args):
    """Train one run unless its record exists, evaluate it on val and test (every floor if tilted)."""
    s = spec(setting, objective, LR[setting], seed, **CONDITIONS[condition])
    path = os.path.join(args['results'], 'runs', run_name(s) + '.json')
    if os.path.exists(path):
        return
    cfg = make_config(dict(s, objective='ntp'), PRESETS['full'], args['out'], 1234)
    cfg = dataclasses.replace(cfg, loss=objective, out_dir=os.path.join(args['out'], run_name(s)))
    # a checkpoint without a record: the run was interrupted, and continues where it stopped
    cfg = dataclasses.replace(cfg, resume=os.path.exists(checkpoint_path(cfg.out_dir)))
    commit, uncommitted = code_state()
    t0 = time.time()
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, 'train.log'), 'a') as logf:
        train(cfg, log=lambda *a, **k: print(*a, file=logf, flush=True))
    train_seconds = time.time() - t0
    ckpt_path = checkpoint_path(cfg.out_dir)
    model, vocab, _, ckpt = evaluation.load_trained(ckpt_path, 'cpu')
    splits = load_splits(cfg, names=('val', 'test'), log=lambda *a: None)
    record = dict(name=run_name(s), spec=s, objective=objective, condition=condition, commit=commit,
                  uncommitted=uncommitted, train_seconds=train_seconds)
    for name, data in splits.items():
        data = data.encode(vocab)
        record[name] = {'plain': split_metrics(model, data, vocab)}
        if objective in TILTED:
            reference = reference_of(ckpt, ckpt_path, vocab.gpt2_ids)
            record[name]['debias'] = {str(f): split_metrics(model, data, vocab, debias_for(cfg, reference, 'cpu', f))
                                      for f in FLOORS}
    record['seconds'] = time.time() - t0
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()))
    print(f"{record['name']} ({objective}): test attr_acc {record['test']['plain']['attr_acc']:.4f}"
          + (f", debiased at {FLOORS}: " + ', '.join(f"{m['attr_acc']:.4f}" for m in record['test']['debias'].values())
             if objective in TILTED else '') + f" ({record['seconds']:.0f} s)", flush=True)


def caption_factor(run_dir):
    """PRIOR's per-caption factor c = k / sum_j w_j over the run's training captions (its cached P_r,
    alpha 1, no floor): its spread, and per token class the mean c of the captions holding that class's
    tokens over the mean c of all caption tokens (a class-level stand-in for E[c | h, v] / E[c | h],
    the correction's residual tilt; 1 = none)."""
    model, vocab, cfg, ckpt = evaluation.load_trained(checkpoint_path(run_dir), 'cpu')
    train_data = load_splits(cfg, names=('train',), log=lambda *a: None)['train'].encode(vocab)
    p_r = torch.from_numpy(load_cache(ckpt['ref_ckpt'], train_data, vocab)[:].copy())
    _, _, targets, classes = train_data.batch(torch.arange(len(train_data)), 'cpu')
    mask = targets != IGNORE
    c = mask.sum(1) / (prior_weight(p_r) * mask).sum(1)
    per_token = c[:, None].expand_as(targets)[mask]
    out = {'mean': c.mean().item(), 'cv': (c.std() / c.mean()).item(),
           'p5': c.quantile(0.05).item(), 'p95': c.quantile(0.95).item()}
    for k, name in enumerate(CLASS_NAMES):
        out[f'tilt_{name}'] = (c[:, None].expand_as(targets)[classes == k].mean() / per_token.mean()).item()
    return out


def load(results):
    where = os.path.join(results, 'runs')
    records = [json.load(open(os.path.join(where, f))) for f in sorted(os.listdir(where)) if f.endswith('.json')] \
        if os.path.isdir(where) else []
    return {(r['spec']['setting'], r['condition'], r['objective'], r['spec']['seed']): r for r in records}


def chosen_floor(runs, setting, objective):
    """The floor with the best val attr_acc, averaged over the seeds and conditions that ran."""
    def val(floor):
        return mean_std([r['val']['debias'][str(floor)]['attr_acc'] for (st, _, o, _), r in runs.items()
                         if st == setting and o == objective])[0]
    scores = {f: val(f) for f in FLOORS}
    return max(scores, key=lambda f: scores[f]), scores


def variant_metrics(r, variant, floors):
    objective, _, debiased = variant.partition('+')
    return r['test']['debias'][str(floors[objective])] if debiased else r['test']['plain']


def comparisons(runs, floors):
    """{(setting, condition, variant): test result vs NTP, paired by seed}, the whole Holm family."""
    out = {}
    for setting in LR:
        for condition in CONDITIONS:
            for variant in VARIANTS:
                pairs = [(runs[(setting, condition, 'ntp', s)]['test']['plain'],
                          variant_metrics(runs[(setting, condition, variant.partition('+')[0], s)], variant,
                                          floors[setting]))
                         for s in SEEDS if (setting, condition, 'ntp', s) in runs
                         and (setting, condition, variant.partition('+')[0], s) in runs]
                rel = t_test([relative_change(v['attr_acc'], n['attr_acc'], True) for n, v in pairs])
                out[(setting, condition, variant)] = dict(
                    pairs=pairs, rel=rel,
                    **{k: t_test([v[k] - n[k] for n, v in pairs]) for k in SHOWN})
    adjusted, significant = holm([c['rel']['p'] for c in out.values()])
    for c, a, sig in zip(out.values(), adjusted, significant):
        c['holm'], c['significant'] = a, sig
    return out


def ci(r, scale=1.0, digits=1):
    return f"{scale * r['mean']:+.{digits}f} [{scale * r['ci'][0]:+.{digits}f}, {scale * r['ci'][1]:+.{digits}f}]"


def exploratory_lines(table):
    """Each debiased variant against its own uncorrected checkpoints (outside the design's Holm family)."""
    lines = ['', 'Outside the design (exploratory, no correction): each debiased variant against its own uncorrected '
             'checkpoints, test attr_acc, paired by seed.', '', '| setting, condition | variant | seeds better / all | '
             'change, points | t, p |', '|---' * 5 + '|']
    for (setting, condition, variant), c in table.items():
        plain = table[(setting, condition, variant.partition('+')[0])]
        if variant.endswith('+debias') and c['pairs']:
            d = [v['attr_acc'] - u['attr_acc'] for (_, v), (_, u) in zip(c['pairs'], plain['pairs'])]
            r = t_test(d)
            lines.append(f"| {setting.upper()}, {condition} | {variant} | {sum(x > 0 for x in d)} / {len(d)} | "
                         f"{ci(r, 100, 2)} | {r['t']:.2f}, {r['p']:.3f} |")
    return lines


def factor_lines(runs, out):
    """The per-caption factor's spread and residual tilt, from each condition's first PRIOR run."""
    lines = ['', "## PRIOR's per-caption factor c = k / sum_j w_j on the training captions", '',
             'Its spread, and per token class the residual tilt the correction leaves (mean c of the captions '
             "holding the class's tokens / mean c over all tokens; 1 = none, < 1: the corrected model still "
             'under-predicts that class):', '', '| setting, condition | mean c | CV | 5-95% | '
             + ' | '.join(f'tilt {n}' for n in CLASS_NAMES) + ' |', '|---' * (4 + len(CLASS_NAMES)) + '|']
    for setting in LR:
        for condition in CONDITIONS:
            if (setting, condition, 'prior', SEEDS[0]) in runs:
                f = caption_factor(os.path.join(out, runs[(setting, condition, 'prior', SEEDS[0])]['name']))
                lines.append(f"| {setting.upper()}, {condition} | {f['mean']:.3f} | {f['cv']:.3f} | {f['p5']:.2f}-"
                             f"{f['p95']:.2f} | " + ' | '.join(f"{f[f'tilt_{n}']:.3f}" for n in CLASS_NAMES) + ' |')
    return lines


def report(results, out):
    runs = load(results)
    floors, lines = {}, ['# Debiased PRIOR vs NTP on the shapes data (study/debias.py)', '',
                         f"{len(runs)} runs; test split, teacher-forced metrics on every caption, {N_GENERATE} greedy "
                         "captions; relative attr_acc change vs NTP paired by seed (+ is better), 95% t-based "
                         "intervals, paired t-test, Holm over all 16 (setting, condition, variant) tests. Points for "
                         "hallucination (lower is better), recall and exact.", '']
    for setting in LR:
        floors[setting] = {}
        for objective in TILTED:
            if any(k[0] == setting and k[2] == objective for k in runs):
                floors[setting][objective], scores = chosen_floor(runs, setting, objective)
                lines.append(f"- {setting.upper()} {objective}: floor w_min {floors[setting][objective]} chosen on val "
                             "attr_acc (" + ', '.join(f"{f}: {v:.4f}" for f, v in scores.items()) + ")")
    lines += ['', '| setting, condition | variant | seeds | test attr_acc (NTP -> it) | relative change, % | t, p, Holm p |'
              ' hallucination, pts | recall, pts | exact, pts | loss relevant / filler / noise, nats |', '|---' * 10 + '|']
    table = comparisons(runs, floors)
    for (setting, condition, variant), c in table.items():
        if not c['pairs']:
            lines.append(f"| {setting.upper()}, {condition} | {variant} | 0 | not run | | | | | | |")
            continue
        ntp, it = (mean_std([p[i]['attr_acc'] for p in c['pairs']])[0] for i in (0, 1))
        rel = c['rel']
        mark = ' **sig.**' if c['significant'] else ''
        lines.append(f"| {setting.upper()}, {condition} | {variant} | {rel['n']} | {ntp:.4f} -> {it:.4f} | "
                     f"{ci(rel, 100)} | {rel['t']:.2f}, {rel['p']:.3f}, {c['holm']:.3f}{mark} | "
                     f"{ci(c['hallucination'], 100)} | {ci(c['recall'], 100)} | {ci(c['exact'], 100)} | "
                     + ' / '.join(f"{c[k]['mean']:+.3f}" for k in ('loss_relevant', 'loss_filler', 'loss_noise')) + ' |')
    lines += exploratory_lines(table)
    lines += ['', '## Per seed: test attr_acc', '', '| setting, condition | seed | ntp | ' + ' | '.join(VARIANTS) + ' |',
              '|---' * (3 + len(VARIANTS)) + '|']
    for setting in LR:
        for condition in CONDITIONS:
            for s in SEEDS:
                if (setting, condition, 'ntp', s) not in runs:
                    continue
                cells = [runs[(setting, condition, 'ntp', s)]['test']['plain']['attr_acc']]
                for v in VARIANTS:
                    r = runs.get((setting, condition, v.partition('+')[0], s))
                    cells.append(variant_metrics(r, v, floors[setting])['attr_acc'] if r else float('nan'))
                lines.append(f"| {setting.upper()}, {condition} | {s} | " + ' | '.join(f"{x:.4f}" for x in cells) + ' |')
    lines += factor_lines(runs, out)
    commits = sorted({r['commit'][:7] for r in runs.values()})
    lines += ['', f"Commits the runs started at: {', '.join(commits)}; train wall time per run "
              f"{mean_std([r['train_seconds'] for r in runs.values()])[0]:.0f} s on average (1 thread)."]
    text = '\n'.join(lines) + '\n'
    atomic_write(os.path.join(results, 'report.md'), lambda f: f.write(text.encode()))
    print(text)


def main(argv):
    args = parse_flags(argv, FLAGS)
    settings = [s for s in args['settings'].split(',') if s]
    for setting in [] if args['report'] else settings:
        for condition in args['conditions'].split(','):
            for seed in SEEDS:
                for objective in OBJECTIVES:
                    execute(setting, condition, objective, seed, args)
    report(args['results'], args['out'])


if __name__ == '__main__':
    cli(main, sys.argv[1:], __doc__)
