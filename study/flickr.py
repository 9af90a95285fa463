"""
NTP vs PRIOR (and other objectives) on real photos: configs/flickr_cpu.py (Flickr8k, a frozen ImageNet
EfficientNet-Lite: Lite1 since 9241524, Lite0 before) with several seeds, in three conditions:

  frozen   the paper's first stage: encoder and LM frozen (the LM is the text-only reference),
           only the projector trains
  full     projector and LM train
  noisy    as full, on training captions of which a share carries web alt-text noise: boilerplate
           that the text predicts ("Stock photo: ...") and attributions that nothing predicts
           ("... Photo by Ana Silva."); val and test captions stay clean

    python -m study.flickr                                   # all three, ntp and prior, seeds 1-5
    python -m study.flickr --conditions=full --losses=ntp,prior,gain --seeds=1,2,3 --results=DIR
    python -m study.flickr --report=True                     # the tables of the runs finished so far (no LVLM
                                                             # trains; the noisy captions' reference may)

Each run is `python train.py CONFIG --loss=L --seed=S ...` in its own process, in this directory;
all runs share the cache folder beside their out_dirs (<out>/cache: the references, the features).
All objectives of one seed share the initialisation and batches, so they are compared in pairs. The
first run builds the reference and the encoder's features alone on every core; the rest run --jobs at
a time with --threads each. Each run's test metrics, command, wall time, and the commit (with any
uncommitted files) as it started go to <results>/runs/<name>.json (an existing one is not re-run, so an
interrupted comparison resumes; one made by another config file or other settings is refused);
<results>/summary.md (NTP vs PRIOR; other objectives: summary_ntp-gain.md and so on) holds the tables
over the seeds where every objective finished: mean ± std per objective, the paired difference to NTP
with its t-based 95% interval and p-value, and Holm's correction across every test of the summary. For
the noisy condition it also gives PRIOR's mean training weight on the real caption tokens and on
each kind of added noise (from the noisy captions' reference: it needs no noisy run).
"""

import collections
import concurrent.futures
import contextlib
import csv
import io
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import torch

from config import load_config
from data import load_splits, make_vocab
from prior_loss import IGNORE, token_weights
from reference import ensure_reference
from runs.caches import content_key
from runs.cli import cli, parse_flags
from runs.errors import ConfigError
from runs.files import atomic_write, checkpoint_path, file_sha256
from sources.captions import detect, split_of
from sources.tokenizer import get_tokenizer
from study import stats
from study.plan import ROOT, code_state

FLAGS = {'config': 'configs/flickr_cpu.py', 'seeds': '1,2,3,4,5', 'conditions': 'frozen,full,noisy',
         'losses': 'ntp,prior', 'jobs': 2, 'threads': 1, 'results': 'study/results/flickr', 'out': 'out/flickr_study',
         'report': False}
CONDITIONS = {'frozen': ['--freeze_lm=True'], 'full': [], 'noisy': []}
METRICS = ('retrieval_r1', 'retrieval_r5', 'retrieval_ratio_r1', 'retrieval_ratio_r5', 'bleu4', 'cider', 'distinct',
           'loss', 'loss_top_weight')
LOWER_BETTER = {'loss_top_weight', 'loss'}
DESCRIBED = ('bleu1', 'bleu2', 'bleu3')          # shown where every run has them (since beam search), not tested

# The noisy condition's alt-text, fixed before any run (seeded; a share of training captions each).
BOILERPLATE = ('Stock photo:', 'Image of', 'Photo:', 'Free stock photo:', 'High resolution image:')
FIRST = ('Ana', 'Ben', 'Chen', 'Dara', 'Eli', 'Farah', 'Goran', 'Hana', 'Ivo', 'Jun', 'Kofi', 'Lena', 'Mateo',
         'Nia', 'Omar', 'Pia', 'Quinn', 'Ravi', 'Sofia', 'Tomas', 'Uma', 'Viktor', 'Wen', 'Xavi', 'Yara', 'Zane')
LAST = ('Silva', 'Novak', 'Okafor', 'Tanaka', 'Berg', 'Haddad', 'Kowalski', 'Moreau', 'Petrov', 'Quispe', 'Rossi',
        'Sato', 'Weber', 'Yilmaz', 'Zhou', 'Dubois', 'Garcia', 'Ivanova', 'Jensen', 'Larsen')
NOISE_SHARE = {'boilerplate': 0.3, 'attribution': 0.3}     # of training captions, independently


def noisy_dataset(config, out_root):
    """A copy of the recipe's captions.csv where a share of the training split's captions carry alt-text
    noise (val and test rows unchanged, rows repeating an earlier image and caption dropped as data does),
    pointing at the same images; and its noise spans per row. Remade when its source or recipe changes."""
    cfg, source, images = csv_source(config, 'the noisy condition')
    folder = os.path.join(out_root, 'noisy_data')
    path, spans_path = os.path.join(folder, 'captions.csv'), os.path.join(folder, 'noise.json')
    made_from = content_key([file_sha256(source), cfg.val_frac, cfg.test_frac, NOISE_SHARE, BOILERPLATE, FIRST, LAST])
    if os.path.isfile(spans_path) and read_json(spans_path).get('made_from') == made_from:
        return folder, images
    rng, rows, spans, seen = random.Random(0), [], {}, set()
    with open(source, newline='') as f:
        for row in csv.DictReader(f):
            image, caption = os.path.normpath(row['image']), (row['caption'] or '').strip()
            if (image, caption) in seen:
                continue
            seen.add((image, caption))
            prefix = suffix = ''
            if split_of(image, cfg.val_frac, cfg.test_frac) == 'train':
                if rng.random() < NOISE_SHARE['boilerplate']:
                    prefix = rng.choice(BOILERPLATE) + ' '
                if rng.random() < NOISE_SHARE['attribution']:
                    suffix = f" Photo by {rng.choice(FIRST)} {rng.choice(LAST)}."
            spans[f"{image}\t{prefix}{caption}{suffix}"] = [prefix.strip(), suffix.strip()]
            rows.append((row['image'], prefix + caption + suffix))
    write_copy(path, rows, spans_path, {'made_from': made_from, 'spans': spans})
    return folder, images


def csv_source(config, purpose):
    """(cfg, its captions.csv, its image folder) for a copy of a config's captions; other formats are refused."""
    cfg = load_config([config])
    kind, source, images = detect(cfg.dataset, cfg.image_root)
    if kind != 'csv':
        raise ConfigError(f"{purpose} copies a captions.csv; {cfg.dataset!r} is {kind}")
    return cfg, source, images


def write_copy(path, rows, made_path, made):
    """A copy's captions.csv of (image, caption) rows, then its `made` record (last: a copy without one is remade)."""
    text = io.StringIO()
    csv.writer(text).writerows([('image', 'caption')] + rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))
    atomic_write(made_path, lambda f: f.write(json.dumps(made).encode()))


def run_name(condition, loss, seed):
    return f"{condition}_{loss}_seed{seed}"


def read_json(path):
    with open(path) as f:
        return json.load(f)


def settings(command):
    """What decides a run's result in its command: train.py's arguments, not where train.py is or --resume."""
    return [a for a in command.split()[1:] if a != '--resume=True']


def command(config, condition, loss, seed, out_root, extra):
    return [sys.executable, os.path.join(ROOT, 'train.py'), config, f'--loss={loss}', f'--seed={seed}',
            f'--out_dir={os.path.join(out_root, run_name(condition, loss, seed))}'] + CONDITIONS[condition] + extra


def finished(config, condition, loss, seed, out_root, runs_dir, extra, same_config=True):
    """The record of a run that finished before, or None; one made by other settings is refused (with
    same_config=False, as a report of finished runs reads them, an edit of the config file since is not)."""
    path = os.path.join(runs_dir, run_name(condition, loss, seed) + '.json')
    if not os.path.isfile(path):
        return None
    record = read_json(path)
    check_record(path, record, command(config, condition, loss, seed, out_root, extra), config, same_config)
    return record


def check_record(path, record, cmd, config, same_config=True):
    """Refuse a finished run's record (at `path`) that train.py's command `cmd` would not remake: other
    settings, or (same_config) another version of the config file than the one there now."""
    if settings(record['command']) != settings(' '.join(cmd[1:])) or (same_config and
            record.get('config_sha256', file_sha256(config)) != file_sha256(config)):
        raise ConfigError(f"{path} was made by `{record['command']}` with another {config} or other settings than "
                          f"this study's; move it away or pass another --results")


@contextlib.contextmanager
def timed_part(base, resuming):
    """The seconds of each part of a run (its start, then each resume), ending with the part run inside:
    BASE.parts.json records each part's start and end as it goes. A part whose end is missing (the study
    itself was killed) ended when its log BASE.log was last written. A run started afresh starts the list anew."""
    path, log = base + '.parts.json', base + '.log'
    parts = read_json(path) if resuming and os.path.isfile(path) else []
    parts = [p if p[1] is not None else [p[0], os.path.getmtime(log) if os.path.isfile(log) else p[0]] for p in parts]
    parts.append([time.time(), None])
    save = lambda: atomic_write(path, lambda f: f.write(json.dumps(parts).encode()))
    save()
    seconds = []
    try:
        yield seconds
    finally:
        parts[-1][1] = time.time()
        save()
        seconds += [end - start for start, end in parts]


def launch(cmd, name, out_root, threads):
    """Run train.py's command `cmd` (out_dir <out_root>/<name>) in its own process, resumed if it has a
    checkpoint, its output in <out_root>/<name>.log: {command, wall_s, wall_parts_s, commit, uncommitted}."""
    resuming = os.path.isfile(checkpoint_path(os.path.join(out_root, name)))
    cmd = list(cmd) + ['--resume=True'] * resuming
    env = dict(os.environ, PYTHONUNBUFFERED='1', **({'OMP_NUM_THREADS': str(threads)} if threads else {}))
    commit, uncommitted = code_state()
    os.makedirs(out_root, exist_ok=True)
    with timed_part(os.path.join(out_root, name), resuming) as parts:
        with open(os.path.join(out_root, name + '.log'), 'w') as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise ConfigError(f"run {name} failed (exit {done.returncode}); see {out_root}/{name}.log")
    return dict(command=' '.join(cmd[1:]), wall_s=round(sum(parts), 1), wall_parts_s=[round(p, 1) for p in parts],
                commit=commit, uncommitted=uncommitted)      # the code as the run started


def run(config, condition, loss, seed, out_root, runs_dir, threads, extra):
    record = finished(config, condition, loss, seed, out_root, runs_dir, extra)
    if record:
        return record
    name = run_name(condition, loss, seed)
    done = launch(command(config, condition, loss, seed, out_root, extra), name, out_root, threads)
    with open(os.path.join(out_root, name, 'eval_test.json')) as f:
        test = json.load(f)
    record = dict(name=name, condition=condition, loss=loss, seed=seed, command=done['command'],
                  config_sha256=file_sha256(config), wall_s=done['wall_s'], wall_parts_s=done['wall_parts_s'],
                  test=test, commit=done['commit'], uncommitted=done['uncommitted'])
    atomic_write(os.path.join(runs_dir, name + '.json'), lambda f: f.write(json.dumps(record, indent=1).encode()))
    print(f"{name}: {', '.join(f'{m} {test[m]:.4f}' for m in METRICS)} ({record['wall_s']:.0f} s)", flush=True)
    return record


def noise_weights(config, out_root, noisy_folder, images, seed):
    """PRIOR's mean training weight (the recipe's alpha; mean 1 per caption) on real caption tokens and on
    each kind of added noise, the name's tokens also split into word starts and the rest of each word. It
    depends on the reference alone: the one the noisy runs of `seed` train with (the same cache; trained
    here first if no run has made it yet)."""
    cfg = load_config([config, f'--dataset={noisy_folder}', f'--image_root={images}', f'--seed={seed}',
                       f'--out_dir={os.path.join(out_root, f"noisy_prior_seed{seed}")}', '--device=cpu'])
    train = load_splits(cfg, names=('train',), log=lambda *a: None)['train']
    vocab = make_vocab(cfg, train)
    train.encode(vocab)
    _, ref_probs = ensure_reference(cfg, train, vocab, torch.device('cpu'), log=lambda *a: None)
    weights = token_weights(torch.from_numpy(np.array(ref_probs)), train.targets,      # a copy: the cache is read-only
                            cfg.alpha, cfg.weight_floor)
    spans = read_json(os.path.join(noisy_folder, 'noise.json'))['spans']
    enc = get_tokenizer()
    frame, stop = enc.encode(' Photo by'), enc.encode('.')          # an attribution: frame + name + stop
    kinds = ('caption', 'boilerplate', 'attribution name', 'attribution frame', 'name: word starts', 'name: word rest')
    sums = {kind: [0.0, 0] for kind in kinds}
    for row, text in enumerate(train.texts):
        prefix, suffix = spans[f"{os.path.relpath(train.images.paths[int(train.image_index[row])], images)}\t{text}"]
        tokens, pre, suf = enc.encode(text), enc.encode(prefix), enc.encode(' ' + suffix) if suffix else []
        n = int((train.targets[row] != IGNORE).sum()) - 1          # caption tokens before the closing EOT
        if n != len(tokens) or tokens[:len(pre)] != pre or tokens[n - len(suf):] != suf or \
                (suf and (suf[:len(frame)] != frame or suf[-1:] != stop)):
            continue                             # truncated to block_size, or a merge across a seam: not counted
        n_pre, n_suf = len(pre), len(suf)
        w = weights[row, :n].tolist()
        name = w[n - n_suf + len(frame):n - 1] if suf else []
        frame_w = w[n - n_suf:n - n_suf + len(frame)] + w[n - 1:n] if suf else []
        starts = [enc.decode([t]).startswith(' ') for t in tokens[n - n_suf + len(frame):n - 1]] if suf else []
        word_starts = [x for x, s in zip(name, starts) if s]
        word_rest = [x for x, s in zip(name, starts) if not s]
        for kind, part in (('boilerplate', w[:n_pre]), ('caption', w[n_pre:n - n_suf]), ('attribution name', name),
                           ('attribution frame', frame_w), ('name: word starts', word_starts),
                           ('name: word rest', word_rest)):
            sums[kind][0] += sum(part)
            sums[kind][1] += len(part)
    return {'seed': seed, 'kinds': {k: (s / c if c else float('nan'), c) for k, (s, c) in sums.items()}}


def summary(records, conditions, losses, config, weights=None):
    """The tables: per condition and metric, each objective's mean ± std and its paired difference to NTP."""
    by = {(r['condition'], r['loss'], r['seed']): r for r in records}
    # A condition's columns and tests all use the seeds where every objective finished.
    complete = {cond: sorted({s for (c, _, s) in by if c == cond and all((cond, loss, s) in by for loss in losses)})
                for cond in conditions}
    tests = {}
    for cond in conditions:
        seeds = complete[cond]
        for loss in losses[1:]:
            for m in METRICS:
                tests[cond, loss, m] = stats.t_test([by[cond, loss, s]['test'][m] - by[cond, losses[0], s]['test'][m]
                                                     for s in seeds])
    tests = {key: t for key, t in tests.items() if t['n'] > 1}        # the family Holm corrects for
    adjusted, survives = stats.holm([t['p'] for t in tests.values()]) if tests else ([], [])
    for key, p, ok in zip(tests, adjusted, survives):
        tests[key].update(p_holm=p, significant=ok)
    lines = [f"# {' vs '.join(losses)} on real photos ({config})", '']
    for cond in conditions:
        seeds = complete[cond]
        partial = sorted({s for (c, _, s) in by if c == cond} - set(seeds))
        if not seeds:
            lines += [f"## {cond}: no seed where every objective finished", '']
            continue
        lines += [f"## {cond} ({', '.join(f'seed {s}' for s in seeds)})", '',
                  *([f"Not counted: seed {', '.join(map(str, partial))} (not every objective finished).", '']
                    if partial else []),
                  '| metric | ' + ' | '.join(losses) + ' | ' + ' | '.join(
                      f'{loss} - {losses[0]} [95% CI], p, Holm p' for loss in losses[1:]) + ' |',
                  '|---' * (2 * len(losses)) + '|']
        for m in METRICS:
            cells = [stats.mean_std([by[cond, loss, s]['test'][m] for s in seeds]) for loss in losses]
            row = [f"{mean:.4f} ± {std:.4f}" for mean, std, _ in cells]
            for loss in losses[1:]:
                t = tests.get((cond, loss, m))
                if t is None:                    # fewer than two seed pairs
                    row.append('n/a')
                    continue
                better = loss if (t['mean'] < 0) == (m in LOWER_BETTER) else losses[0]
                row.append(f"{t['mean']:+.4f} [{t['ci'][0]:+.4f}, {t['ci'][1]:+.4f}], {t['p']:.3f}, {t['p_holm']:.3f}"
                           + (f" (**{better}**)" if t['significant'] else ''))
            lines.append(f"| {m}{' (lower is better)' if m in LOWER_BETTER else ''} | " + ' | '.join(row) + ' |')
        for m in (m for m in DESCRIBED if all(m in by[cond, loss, s]['test'] for loss in losses for s in seeds)):
            cells = [stats.mean_std([by[cond, loss, s]['test'][m] for s in seeds]) for loss in losses]
            diffs = [stats.t_test([by[cond, loss, s]['test'][m] - by[cond, losses[0], s]['test'][m] for s in seeds])
                     for loss in losses[1:]]
            lines.append(f"| {m} (not tested) | " + ' | '.join(f"{mean:.4f} ± {std:.4f}" for mean, std, _ in cells) +
                         ' | ' + ' | '.join(f"{t['mean']:+.4f} [{t['ci'][0]:+.4f}, {t['ci'][1]:+.4f}], {t['p']:.3f}, -"
                                            if t['n'] > 1 else 'n/a' for t in diffs) + ' |')
        lines.append('')
    if weights:
        lines += [f"PRIOR's mean training weight per token kind on the noisy training captions (1 = NTP; from the "
                  f"reference of seed {weights['seed']}; an attribution's frame is ' Photo by' and its final '.'): " +
                  ', '.join(f"{k} {w:.2f} ({n:,} tokens)" for k, (w, n) in weights['kinds'].items()) + '.', '']
    walls = sorted(r['wall_s'] for r in records)
    commits = ', '.join(f"{c[:7]} ({n} run{'s' * (n > 1)})"
                        for c, n in collections.Counter(r['commit'] for r in records).items())
    resumed = ("the sum of its parts, listed in its record's wall_parts_s" if all('wall_parts_s' in r for r in records)
               else "its last part")             # records made before wall_parts_s was kept
    lines += [f"{len(records)} runs; wall time {walls[0] / 60:.1f} to {walls[-1] / 60:.1f} min each (a resumed run: "
              f"{resumed}; the first run also builds the caches). "
              f"Commits as the runs started: {commits}. "
              f"± is the std over seeds; intervals are t-based over the seed pairs; p is the paired t-test's; Holm p "
              f"is corrected across all {len(tests)} tests above; bold: significant after that correction (and which "
              f"side is better)."]
    return '\n'.join(lines) + '\n'


def as_list(args, key, cast=str, allowed=None):
    try:
        values = [cast(s) for s in str(args[key]).split(',') if s]
    except ValueError:
        raise ConfigError(f"--{key}: a comma-separated list, got {args[key]!r}") from None
    bad = [v for v in values if allowed is not None and v not in allowed]
    if bad or not values:
        raise ConfigError(f"--{key}: each one of {allowed}, got {args[key]!r}")
    return values


def summary_path(results, losses):
    """summary.md holds the NTP-vs-PRIOR comparison; any other set of objectives gets its own file
    (summary_ntp-gain.md), so that comparing a new weighting on the same runs does not replace it."""
    default = losses == FLAGS['losses'].split(',')
    return os.path.join(results, 'summary.md' if default else f"summary_{'-'.join(losses)}.md")


def main(argv):
    args = parse_flags(argv, FLAGS)
    seeds = as_list(args, 'seeds', int)
    conditions = as_list(args, 'conditions', allowed=tuple(CONDITIONS))
    losses = as_list(args, 'losses')
    if len(seeds) < 2 or losses[0] != 'ntp' or len(losses) < 2:
        raise ConfigError("--seeds: two or more; --losses: ntp first (the baseline), then what to compare with it")
    results, out_root = args['results'], args['out']          # relative to here, like train.py's out/
    runs_dir = os.path.join(results, 'runs')
    extra = {c: [] for c in conditions}
    noisy = images = None
    if 'noisy' in conditions:
        noisy, images = noisy_dataset(args['config'], out_root)
        extra['noisy'] = [f'--dataset={noisy}', f'--image_root={images}']
    todo = [(c, loss, s) for c in conditions for s in seeds for loss in losses]
    done = [finished(args['config'], *job, out_root, runs_dir, extra[job[0]], not args['report'])
            for job in todo]                     # checked first
    if args['report']:                           # an interrupted comparison: the finished runs only, none started
        records = [r for r in done if r]
        if not records:
            raise ConfigError(f"--report: no finished run in {runs_dir}")
        conditions = [c for c in conditions if any(r['condition'] == c for r in records)]
    else:
        first = run(args['config'], *todo[0], out_root, runs_dir, 0, extra[todo[0][0]])    # alone: builds the caches
        with concurrent.futures.ThreadPoolExecutor(args['jobs']) as pool:
            records = [first] + list(pool.map(
                lambda job: run(args['config'], *job, out_root, runs_dir, args['threads'], extra[job[0]]), todo[1:]))
    weights = noise_weights(args['config'], out_root, noisy, images, seeds[0]) if noisy and 'prior' in losses else None
    text = summary(records, conditions, losses, args['config'], weights)
    with open(summary_path(results, losses), 'w') as f:
        f.write(text)
    print(text)


if __name__ == '__main__':
    cli(main, sys.argv[1:], __doc__)
