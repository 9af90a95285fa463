"""
Debiased PRIOR on real photos: the PRIOR checkpoints of a finished study.flickr comparison, evaluated
with PRIOR's tilt divided out by each run's own reference (eval.py --debias; docs/beyond-prior.md),
beside PRIOR itself and the NTP run of the same seed. The design was fixed before the runs
(study/results/flickr_beam3/design.md):

  1. the floor w_min, per condition: each PRIOR checkpoint is evaluated debiased on val at every
     floor of FLOORS; the floor with the best mean val CIDEr-D over the condition's seeds wins (ties:
     the larger floor). Test is read at that floor only.
  2. test, for NTP, PRIOR and PRIOR + debias: BLEU-1..4, CIDEr-D, loss, R@1 plain and by likelihood
     ratio, and in the noisy condition the share of captions that carry an attribution (" Photo by
     <name>.") or a boilerplate prefix (study.noise_echo's patterns).
  3. PRIOR - NTP and PRIOR + debias - NTP paired by seed: t-based 95% intervals, Holm across every
     test of TESTED (and the attribution share where the condition has noise) in the conditions
     reported. PRIOR + debias - PRIOR is exploratory, outside the family.

    python -m study.photo_debias --results=study/results/flickr_beam3 --out=out/flickr_beam3
    python -m study.photo_debias ... --conditions=noisy --seeds=1,2,3

Only runs whose record is in <results>/runs count (a checkpoint of an unfinished run may be a mid-run
one). Each evaluation goes to <results>/debias/<run>_<split>[_floor<F>].json with its captions (an
existing one is reused, so an interrupted evaluation resumes), the tables to <results>/debias.md.
"""

import json
import os
import sys

import torch

import eval as evaluation
from runs.cli import cli, parse_flags
from runs.errors import ConfigError
from runs.files import atomic_write, checkpoint_path
from study import stats
from study.flickr import read_json, run_name
from study.noise_echo import noise_shares

FLAGS = {'seeds': '1,2,3,4,5', 'conditions': 'noisy,full', 'out': 'out/flickr_beam3',
         'results': 'study/results/flickr_beam3'}
FLOORS = (0.05, 0.2, 0.5)
METRICS = ('bleu1', 'bleu2', 'bleu3', 'bleu4', 'cider', 'loss', 'retrieval_r1', 'retrieval_ratio_r1')
TESTED = ('bleu4', 'cider', 'retrieval_r1', 'retrieval_ratio_r1')
NOISE = ('attribution', 'boilerplate')
ARMS = ('ntp', 'prior', 'prior + debias')


def scored(ckpt, split, path, floor=None):
    """One checkpoint's metrics on a split (debiased at `floor` unless None), with the share of its captions
    that carry each kind of alt-text noise, and its captions; cached at `path`."""
    if os.path.isfile(path):
        return read_json(path)
    flags = [f'--ckpt={ckpt}', f'--split={split}', '--device=cpu']
    if floor is not None:
        flags += ['--debias=True', f'--debias_min_weight={floor}']
    e = evaluation.evaluate_checkpoint(parse_flags(flags, evaluation.FLAGS), torch.device('cpu'), log=lambda *a: None)
    texts = [text for _, text in e.captions]
    record = {'ckpt': ckpt, 'split': split, 'floor': floor, **{m: e.metrics[m] for m in METRICS},
              **noise_shares(texts), 'beam': e.metrics['beam'], 'captions': e.captions}
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()))
    print(f"{os.path.basename(path)}: " + ', '.join(f"{m} {record[m]:.4f}" for m in ('bleu4', 'cider', 'attribution')),
          flush=True)
    return record


def condition_results(condition, seeds, out_root, results):
    """(chosen floor, the mean val CIDEr-D at each floor, the seeds, {(arm, seed): test record}) over the seeds
    where both runs finished; None when there is none."""
    finished = [s for s in seeds if all(os.path.isfile(os.path.join(results, 'runs', run_name(condition, loss, s)
                                                                     + '.json')) for loss in ('ntp', 'prior'))]
    if not finished:
        return None
    folder = os.path.join(results, 'debias')
    ckpt = lambda loss, s: checkpoint_path(os.path.join(out_root, run_name(condition, loss, s)))
    for s in finished:
        for loss in ('ntp', 'prior'):
            if not os.path.isfile(ckpt(loss, s)):
                raise ConfigError(f"{ckpt(loss, s)}: the checkpoint of the finished run "
                                  f"{run_name(condition, loss, s)} is not there (--out)")
    name = lambda loss, s, split, floor=None: os.path.join(
        folder, f"{run_name(condition, loss, s)}_{split}" + ('' if floor is None else f"_floor{floor}") + '.json')
    val = {f: stats.mean_std([scored(ckpt('prior', s), 'val', name('prior', s, 'val', f), f)['cider']
                              for s in finished])[0] for f in FLOORS}
    floor = max(FLOORS, key=lambda f: (val[f], f))
    test = {}
    for s in finished:
        test['ntp', s] = scored(ckpt('ntp', s), 'test', name('ntp', s, 'test'))
        test['prior', s] = scored(ckpt('prior', s), 'test', name('prior', s, 'test'))
        test['prior + debias', s] = scored(ckpt('prior', s), 'test', name('prior', s, 'test', floor), floor)
    return floor, val, finished, test


def report(found):
    """The markdown tables: per condition, each arm's mean ± std, the differences to NTP (Holm) and the
    exploratory difference of the correction to PRIOR itself."""
    tests = {}
    for cond, (_, _, seeds, test) in found.items():
        for metric in TESTED + (('attribution',) if cond == 'noisy' else ()):
            for arm in ARMS[1:]:
                tests[cond, arm, metric] = stats.t_test([test[arm, s][metric] - test['ntp', s][metric] for s in seeds])
    adjusted, significant = stats.holm([t['p'] for t in tests.values()])
    for key, p, ok in zip(tests, adjusted, significant):
        tests[key].update(p_holm=p, significant=ok)
    lines = ['# Debiased PRIOR on real photos', '']
    for cond, (floor, val, seeds, test) in found.items():
        metrics = METRICS + (NOISE if cond == 'noisy' else ())
        lines += [f"## {cond} (seeds {', '.join(map(str, seeds))}; test; beam {test['ntp', seeds[0]]['beam']})", '',
                  f"Floor chosen on val: {floor} (mean val CIDEr-D of PRIOR + debias: "
                  + ', '.join(f"{f}: {c:.4f}" for f, c in val.items()) + ').', '',
                  '| metric | ' + ' | '.join(ARMS) + ' | prior - ntp [95% CI], p, Holm p | prior + debias - ntp '
                  '[95% CI], p, Holm p | prior + debias - prior [95% CI], p (exploratory) |', '|---' * 7 + '|']
        for m in metrics:
            row = [f"{mean:.4f} ± {std:.4f}" for mean, std, _ in
                   (stats.mean_std([test[arm, s][m] for s in seeds]) for arm in ARMS)]
            for arm in ARMS[1:]:
                t = tests.get((cond, arm, m))
                row.append(interval(stats.t_test([test[arm, s][m] - test['ntp', s][m] for s in seeds])) +
                           (f", {t['p_holm']:.3f}" + ' **significant**' * t['significant'] if t else ' (not tested)'))
            row.append(interval(stats.t_test([test['prior + debias', s][m] - test['prior', s][m] for s in seeds])))
            lines.append(f"| {m} | " + ' | '.join(row) + ' |')
        lines.append('')
        lines += ['Per seed (BLEU-4 / CIDEr-D' + (' / attribution share' if cond == 'noisy' else '') + '):', '']
        for s in seeds:
            lines.append(f"- seed {s}: " + '; '.join(
                f"{arm} " + ' / '.join(f"{test[arm, s][m]:.3f}" for m in ('bleu4', 'cider') +
                                       (('attribution',) if cond == 'noisy' else ())) for arm in ARMS))
        lines.append('')
    lines += [f"Holm across all {len(tests)} tests above (the conditions reported); ± is the std over seeds; "
              "intervals are t-based over the seed pairs."]
    return '\n'.join(lines) + '\n'


def interval(t):
    if t is None or t['n'] < 2:
        return 'n/a'
    return f"{t['mean']:+.4f} [{t['ci'][0]:+.4f}, {t['ci'][1]:+.4f}], {t['p']:.3f}"


def main(argv):
    args = parse_flags(argv, FLAGS)
    seeds = [int(s) for s in str(args['seeds']).split(',') if s.strip()]
    conditions = [c for c in str(args['conditions']).split(',') if c]
    if set(conditions) - {'full', 'noisy'} or not conditions:
        raise ConfigError(f"--conditions: full and/or noisy (the conditions where the LM trains), got {args['conditions']!r}")
    found = {c: r for c in conditions if (r := condition_results(c, seeds, args['out'], args['results']))}
    if not found:
        raise ConfigError(f"no seed with finished ntp and prior runs of {', '.join(conditions)} in {args['results']}/runs")
    text = report(found)
    atomic_write(os.path.join(args['results'], 'debias.md'), lambda f: f.write(text.encode()))
    print(text)


if __name__ == '__main__':
    cli(main, sys.argv[1:], __doc__)
