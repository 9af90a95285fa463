"""
NTP vs PRIOR on real photos: configs/flickr_cpu.py (Flickr8k, H-LVLM) with several seeds.

    python -m study.flickr                       # seeds 1,2,3,4, into study/results/flickr/
    python -m study.flickr --seeds=1,2,3,4,5 --jobs=2 --results=DIR --config=configs/flickr_cpu.py

Each run is `python train.py CONFIG --loss=L --seed=S --out_dir=OUT/L_seedS`, in its own process
and in this directory (its caches go to ./out, as train.py's do).
Both objectives of one seed share the initialisation and batches, so they are compared in pairs.
The reference and the pretrained encoder depend on the data and recipe, not the seed: the first
run builds them, alone and on every core, and every other run reads them from the cache
(--jobs=2 --threads=1 then runs two at a time, one core each). Each run's test metrics
and wall time go to <results>/runs/<name>.json (an existing one is not re-run, so an interrupted
comparison resumes); the table, with paired differences, their bootstrap 95% intervals and
paired t, goes to <results>/summary.md.
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import time

from config import ConfigError, cli, parse_flags
from study import stats
from study.plan import ROOT

FLAGS = {'config': 'configs/flickr_cpu.py', 'seeds': '1,2,3,4', 'jobs': 2, 'threads': 1,
         'results': 'study/results/flickr', 'out': 'out/flickr_study'}
METRICS = ('retrieval_r1', 'retrieval_r5', 'loss_top_weight', 'loss', 'bleu4', 'cider', 'distinct')
LOWER_BETTER = {'loss_top_weight', 'loss'}


def run(config, loss, seed, out_root, runs_dir, threads):
    name = f"{loss}_seed{seed}"
    path = os.path.join(runs_dir, name + '.json')
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    out_dir = os.path.join(out_root, name)
    env = dict(os.environ, PYTHONUNBUFFERED='1', **({'OMP_NUM_THREADS': str(threads)} if threads else {}))
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), config, f'--loss={loss}', f'--seed={seed}',
           f'--out_dir={out_dir}'] + (['--resume=True'] if os.path.isfile(os.path.join(out_dir, 'ckpt.pt')) else [])
    t0 = time.time()
    os.makedirs(out_root, exist_ok=True)
    with open(os.path.join(out_root, name + '.log'), 'w') as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise ConfigError(f"run {name} failed (exit {done.returncode}); see {out_root}/{name}.log")
    with open(os.path.join(out_dir, 'eval_test.json')) as f:
        test = json.load(f)
    record = dict(name=name, loss=loss, seed=seed, command=' '.join(cmd[1:]), wall_s=round(time.time() - t0, 1),
                  test=test, commit=subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True,
                                                   text=True).stdout.strip())
    os.makedirs(runs_dir, exist_ok=True)
    with open(path, 'w') as f:
        json.dump(record, f, indent=1)
    print(f"{name}: {', '.join(f'{m} {test[m]:.4f}' for m in METRICS)} ({record['wall_s']:.0f} s)", flush=True)
    return record


def summary(records, config, jobs, threads):
    """The markdown table: per metric, each objective's mean ± std over seeds, and PRIOR - NTP paired."""
    by = {(r['loss'], r['seed']): r for r in records}
    seeds = sorted(s for (loss, s) in by if loss == 'ntp' and ('prior', s) in by)
    lines = [f"# NTP vs PRIOR on real photos ({config}, seeds {', '.join(map(str, seeds))})", '',
             '| metric | NTP | PRIOR | PRIOR - NTP [95% CI] | paired t | significant? |', '|---|---|---|---|---|---|']
    for m in METRICS:
        ntp, prior = [by['ntp', s]['test'][m] for s in seeds], [by['prior', s]['test'][m] for s in seeds]
        diffs = [p - n for p, n in zip(prior, ntp)]
        (mn, sn, _), (mp, sp, _) = stats.mean_std(ntp), stats.mean_std(prior)
        md, _, _ = stats.mean_std(diffs)
        lo, hi = stats.bootstrap_ci(diffs)
        t, _, significant = stats.paired_t(diffs)
        better = 'PRIOR' if (md < 0) == (m in LOWER_BETTER) else 'NTP'
        lines.append(f"| {m}{' (lower is better)' if m in LOWER_BETTER else ''} | {mn:.4f} ± {sn:.4f} | "
                     f"{mp:.4f} ± {sp:.4f} | {md:+.4f} [{lo:+.4f}, {hi:+.4f}] | {t:.2f} | "
                     f"{'yes, ' + better if significant else 'no'} |")
    walls = [r['wall_s'] for r in records]
    lines += ['', f"Wall time: the first run {walls[0] / 60:.1f} min, alone on every core and building the reference "
              f"and the encoder; the others {min(walls[1:]) / 60:.1f} to {max(walls[1:]) / 60:.1f} min each, {jobs} at a "
              f"time on {threads or 'all'} thread(s) each. Commit: {records[0]['commit']}. ± is the std over seeds; "
              f"intervals are percentile bootstraps over the seed pairs; t is the paired t over them (significant: "
              f"|t| above the two-sided 95% critical value)."]
    return '\n'.join(lines) + '\n'


def main(argv):
    args = parse_flags(argv, FLAGS)
    try:
        seeds = [int(s) for s in args['seeds'].split(',')]
    except ValueError:
        raise ConfigError(f"--seeds: a comma-separated list of integers, got {args['seeds']!r}") from None
    if len(seeds) < 2:
        raise ConfigError("--seeds: at least two seeds, for spreads and a paired test")
    results, out_root = args['results'], args['out']          # relative to here, like train.py's out/
    runs_dir = os.path.join(results, 'runs')
    todo = [(loss, seed) for seed in seeds for loss in ('ntp', 'prior')]
    first = run(args['config'], *todo[0], out_root, runs_dir, 0)      # alone, on every core: builds the caches
    with concurrent.futures.ThreadPoolExecutor(args['jobs']) as pool:
        rest = list(pool.map(lambda job: run(args['config'], *job, out_root, runs_dir, args['threads']), todo[1:]))
    text = summary([first] + rest, args['config'], args['jobs'], args['threads'])
    with open(os.path.join(results, 'summary.md'), 'w') as f:
        f.write(text)
    print(text)


if __name__ == '__main__':
    cli(main, sys.argv[1:], __doc__)
