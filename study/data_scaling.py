"""
Does PRIOR scale better with data? NTP and PRIOR on two ladders of training-set sizes, every run
trained until its val metric stops improving (train.py --patience and --stop_on; best.pt is tested), and the data
exponent b of error(D) = a D^(-b) per objective with bootstrap intervals. The design was fixed
before any run: study/results/data_scaling/design.md.

  shapes  configs/shapes_u.py and shapes_h.py, clean captions, n_train 1,250 ... 40,000;
          test 1 - attr_acc and loss_relevant (PRIOR also debiased, eval's --debias)
  flickr  configs/flickr_cpu.py with 1/8, 1/4, 1/2 and all of its training photos (nested; val and
          test unchanged); test 1 - ratio-R@1, loss and CIDEr-D
  Each run stops on the val twin of its ladder's headline metric (design.md, amendments 1 and 2).

    python -m study.data_scaling                          # both ladders, then the report
    python -m study.data_scaling --ladders=shapes --seeds=1,2 --results=DIR --out=DIR
    python -m study.data_scaling --report=True            # the fits of the runs finished so far

Each run is `python train.py CONFIG ...` in its own process, --jobs at a time with --threads each
(the first of a ladder alone, on every core: it builds the shared caches). Its record goes to
<results>/runs/<name>.json (an existing one is not re-run; one made with other settings or another
version of the config file is refused):
ladder, setting, objective, seed, n_train (the captions it trained on, from its log), the test
metrics of best.pt, best_step, last_step, capped (reached max_iters before stopping), wall time and
the commit it started at. The report: <results>/summary.md and <results>/<ladder>.png.
"""

import concurrent.futures
import csv
import json
import os
import random
import re
import sys

import torch

import eval as evaluation
from config import load_config
from runs.caches import content_key
from runs.cli import cli, parse_flags
from runs.errors import ConfigError
from runs.files import atomic_write, checkpoint_path, file_sha256, load_checkpoint
from sources.captions import split_of
from study import scaling_report
from study.flickr import check_record, csv_source, launch, read_json, write_copy
from study.plan import ROOT

FLAGS = {'ladders': 'shapes,flickr', 'seeds': '1,2,3', 'objectives': 'ntp,prior', 'preset': 'full', 'jobs': 2,
         'threads': 1, 'flickr_config': 'configs/flickr_cpu.py', 'results': 'study/results/data_scaling',
         'out': 'out/data_scaling', 'report': False}

# The ladders as designed; `tiny` runs the same machinery in seconds (tests).
PRESETS = {
    'full': {
        'shapes': dict(settings={'u': ('configs/shapes_u.py', ['--learning_rate=0.004']),
                                 'h': ('configs/shapes_h.py', ['--learning_rate=0.002'])},   # study.json's best_lr
                       sizes=(1250, 2500, 5000, 10000, 20000, 40000),
                       flags=['--eval_interval=100', '--eval_batches=16', '--patience=5', '--stop_on=attr_acc',
                              '--max_iters=6000', '--ckpt_interval=500', '--min_lr_ratio=1.0']),
        'flickr': dict(fractions=(0.125, 0.25, 0.5, 1.0),
                       flags=['--eval_interval=250', '--eval_batches=16', '--patience=4',
                              '--stop_on=retrieval_ratio_r1', '--max_iters=4000', '--ckpt_interval=500',
                              '--min_lr_ratio=1.0'])},
    'tiny': {
        'shapes': dict(settings={'u': ('configs/shapes_u.py', ['--learning_rate=0.004'])}, sizes=(64, 128),
                       flags=['--eval_interval=2', '--eval_batches=1', '--patience=2', '--stop_on=attr_acc',
                              '--max_iters=8', '--ckpt_interval=4', '--min_lr_ratio=1.0', '--n_val=32', '--n_test=32',
                              '--n_layer=1', '--n_head=2', '--n_embd=16', '--vit_layer=1', '--vit_embd=16', '--ref_max_iters=4',
                              '--enc_max_iters=4', '--batch_size=8', '--warmup_iters=1', '--log_interval=2',
                              '--device=cpu']),
        'flickr': dict(fractions=(0.5, 1.0), flags=['--eval_interval=2', '--patience=2',
                                                     '--stop_on=retrieval_ratio_r1', '--max_iters=6',
                                                     '--ckpt_interval=2', '--min_lr_ratio=1.0'])},
}
METRICS = {'shapes': ('attr_acc', 'loss_relevant'), 'flickr': ('retrieval_ratio_r1', 'loss', 'cider')}


def photo_subset(config, out_root, fraction):
    """A copy of the config's captions.csv with `fraction` of its training photos (a fixed random order of
    them, so each rung holds the smaller ones) and every val and test row; remade when its source changes."""
    cfg, source, images = csv_source(config, 'the flickr ladder')
    folder = os.path.join(out_root, f'photos_{fraction:g}')
    path, made_path = os.path.join(folder, 'captions.csv'), os.path.join(folder, 'made_from.json')
    made_from = content_key([file_sha256(source), cfg.val_frac, cfg.test_frac, fraction])
    if os.path.isfile(made_path) and read_json(made_path).get('made_from') == made_from:
        return folder, images
    with open(source, newline='') as f:
        rows = list(csv.DictReader(f))
    train = sorted({os.path.normpath(r['image']) for r in rows
                    if split_of(os.path.normpath(r['image']), cfg.val_frac, cfg.test_frac) == 'train'})
    random.Random(0).shuffle(train)
    kept = set(train[:round(fraction * len(train))])
    write_copy(path, [(r['image'], r['caption']) for r in rows if os.path.normpath(r['image']) in kept or
                      split_of(os.path.normpath(r['image']), cfg.val_frac, cfg.test_frac) != 'train'],
               made_path, {'made_from': made_from})
    return folder, images


def plan(preset, ladders, objectives, seeds, out_root, flickr_config):
    """The runs, in order: [(ladder, name, config, train.py flags, run facts)]."""
    jobs = []
    if 'shapes' in ladders:
        ladder = PRESETS[preset]['shapes']
        for setting, (config, own) in ladder['settings'].items():
            for n in ladder['sizes']:
                for seed in seeds:
                    for obj in objectives:
                        facts = dict(ladder='shapes', setting=setting, objective=obj, seed=seed, size=n)
                        jobs.append((f"shapes_{setting}_{obj}_n{n}_seed{seed}", config,
                                     [f'--n_train={n}', *own, *ladder['flags']], facts))
    if 'flickr' in ladders:
        ladder = PRESETS[preset]['flickr']
        rungs = {f: photo_subset(flickr_config, out_root, f) for f in ladder['fractions']}
        for seed in seeds:                  # seed by seed: a ladder stopped part-way still spans every rung
            for fraction, (folder, images) in rungs.items():
                for obj in objectives:
                    facts = dict(ladder='flickr', setting='photos', objective=obj, seed=seed, size=fraction)
                    jobs.append((f"flickr_{obj}_f{fraction:g}_seed{seed}", flickr_config,
                                 [f'--dataset={folder}', f'--image_root={images}', *ladder['flags']], facts))
    return jobs


def command(name, config, flags, facts, out_root):
    return [sys.executable, os.path.join(ROOT, 'train.py'), config, f"--loss={facts['objective']}",
            f"--seed={facts['seed']}", *flags, f'--out_dir={os.path.join(out_root, name)}']


def execute(job, out_root, runs_dir, threads):
    """Train one run unless its record exists, then write its record: facts, test metrics of best.pt (and,
    for PRIOR on shapes, of best.pt debiased), where it stopped."""
    name, config, flags, facts = job
    path = os.path.join(runs_dir, name + '.json')
    cmd = command(name, config, flags, facts, out_root)
    if os.path.isfile(path):
        record = read_json(path)
        check_record(path, record, cmd, config)
        return record
    out_dir = os.path.join(out_root, name)
    done = launch(cmd, name, out_root, threads)     # resumes, times its parts, refuses a failed run
    log = open(os.path.join(out_root, name + '.log')).read()
    n_train = int(re.findall(r'^data: train (\d+),', log, re.M)[-1])
    ckpt = load_checkpoint(checkpoint_path(out_dir))
    early = ckpt.get('early_stop') or {}
    test = read_json(os.path.join(out_dir, 'eval_test.json'))
    record = dict(name=name, **facts, n_train=n_train, command=done['command'], config_sha256=file_sha256(config),
                  test=test, best_step=early.get('best_step'), last_step=ckpt['step'],
                  capped=early.get('evals_since', 0) < load_config([config] + flags).patience,
                  wall_s=done['wall_s'], wall_parts_s=done['wall_parts_s'], commit=done['commit'],
                  uncommitted=done['uncommitted'])
    if facts['ladder'] == 'shapes' and facts['objective'] == 'prior':
        args = parse_flags([f"--ckpt={os.path.join(out_dir, 'best.pt')}", '--debias=True', '--device=cpu'],
                           evaluation.FLAGS)
        record['test_debias'] = evaluation.evaluate_checkpoint(args, torch.device('cpu'), log=lambda *a: None).metrics
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()))
    print(f"{name}: n_train {n_train}, best step {record['best_step']} of {record['last_step']}"
          f"{' (capped)' if record['capped'] else ''}, " +
          ', '.join(f"{m} {test[m]:.4f}" for m in METRICS[facts['ladder']]), flush=True)
    return record


def main(argv):
    args = parse_flags(argv, FLAGS)
    ladders = [s for s in str(args['ladders']).split(',') if s]
    objectives = [s for s in str(args['objectives']).split(',') if s]
    seeds = [int(s) for s in str(args['seeds']).split(',') if s.strip()]
    if set(ladders) - {'shapes', 'flickr'} or not ladders or args['preset'] not in PRESETS:
        raise ConfigError(f"--ladders: shapes and/or flickr; --preset: one of {', '.join(PRESETS)}")
    if objectives[:1] != ['ntp'] or len(objectives) < 2 or len(seeds) < 2:
        raise ConfigError("--objectives: ntp first (the baseline), then others; --seeds: two or more")
    runs_dir = os.path.join(args['results'], 'runs')
    jobs = plan(args['preset'], ladders, objectives, seeds, args['out'], args['flickr_config'])
    if not args['report']:
        for ladder in ladders:
            mine = [j for j in jobs if j[3]['ladder'] == ladder]
            execute(mine[0], args['out'], runs_dir, 0)                  # alone: builds the ladder's caches
            with concurrent.futures.ThreadPoolExecutor(args['jobs']) as pool:
                list(pool.map(lambda job: execute(job, args['out'], runs_dir, args['threads']), mine[1:]))
    records = [read_json(os.path.join(runs_dir, j[0] + '.json')) for j in jobs
               if os.path.isfile(os.path.join(runs_dir, j[0] + '.json'))]
    if not records:
        raise ConfigError(f"--report: no finished run in {runs_dir}")
    text = scaling_report.write(records, args['results'])
    print(text)


if __name__ == '__main__':
    cli(main, sys.argv[1:], __doc__)
