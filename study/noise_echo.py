"""
Post hoc (measured after the noisy condition ran; not in the comparison's design, commit 4a26369):
do the noisy condition's models write the training captions' alt-text noise into captions of clean
test photos? For each noisy run's checkpoint, eval.py's own test evaluation (on the run's cached
encoder features, as train.py's) gives the greedy captions it scores (one per test image, the first
200); this counts those that carry an attribution
(" Photo by <name>.") or a boilerplate prefix, re-scores BLEU-4 and CIDEr-D with those spans cut
out, and pairs each objective with NTP over seeds (t-based 95% interval, paired t-test).

    python -m study.noise_echo                      # out/flickr_study/noisy_{ntp,prior}_seed{1..5}
    python -m study.noise_echo --losses=ntp,prior,gain --seeds=1,2,3

Each run's figures go to <results>/noise_echo/<run>.json (an existing one is reused) and the table
to <results>/noise_echo.md.
"""

import json
import os
import re
import sys

import torch

from data import load_splits
from eval import evaluate, load_trained
from metrics.caption_scores import bleu, caption_refs, cider_d, words
from pretrained.features import caches_features, use_cached_features
from runs.caches import cache_root
from runs.cli import cli, parse_flags
from runs.errors import ConfigError
from runs.files import atomic_write, checkpoint_path
from study import stats
from study.flickr import BOILERPLATE, read_json, run_name

FLAGS = {'seeds': '1,2,3,4,5', 'losses': 'ntp,prior', 'out': 'out/flickr_study', 'results': 'study/results/flickr',
         'n_generate': 200}
ATTRIBUTION = re.compile(r'\s*Photo by .*$')
PREFIX = re.compile('^(' + '|'.join(re.escape(b) for b in BOILERPLATE) + r')\s*')
METRICS = ('attribution', 'boilerplate', 'bleu4', 'cider', 'bleu4_cut', 'cider_cut')


def strip_noise(text):
    """A caption without the noisy condition's boilerplate prefix and attribution."""
    return PREFIX.sub('', ATTRIBUTION.sub('', text))


def noise_shares(texts):
    """The share of captions that carry an attribution, and the share that start with a boilerplate prefix."""
    return {'attribution': sum(bool(ATTRIBUTION.search(t)) for t in texts) / len(texts),
            'boilerplate': sum(bool(PREFIX.match(t)) for t in texts) / len(texts)}


def echo(ckpt_path, n_generate):
    """The figures of one checkpoint on its test split, and three of its captions."""
    model, vocab, cfg, _ = load_trained(ckpt_path, torch.device('cpu'))
    data = load_splits(cfg, names=('test',), log=lambda *a: None)['test'].encode(vocab)
    if caches_features(cfg):
        use_cached_features({'test': data}, model.vision, torch.device('cpu'), cache_root(cfg), log=lambda *a: None)
    metrics, captions = evaluate(model, data, vocab, torch.device('cpu'), n_generate=n_generate)
    refs = caption_refs(data, [row for row, _ in captions])
    texts = [text for _, text in captions]
    cut = [strip_noise(t) for t in texts]
    return {**noise_shares(texts), 'bleu4': metrics['bleu4'], 'cider': metrics['cider'],
            'bleu4_cut': bleu([words(t) for t in cut], refs)[3], 'cider_cut': cider_d([words(t) for t in cut], refs),
            'examples': texts[:3]}


def main(argv):
    args = parse_flags(argv, FLAGS)
    seeds = [int(s) for s in str(args['seeds']).split(',') if s]
    losses = [s for s in args['losses'].split(',') if s]
    if losses[:1] != ['ntp'] or len(losses) < 2:
        raise ConfigError("--losses: ntp first (the baseline), then what to compare with it")
    folder = os.path.join(args['results'], 'noise_echo')
    found = {}
    for loss in losses:
        for seed in seeds:
            name = run_name('noisy', loss, seed)
            path, ckpt = os.path.join(folder, name + '.json'), checkpoint_path(os.path.join(args['out'], name))
            if not os.path.isfile(path):
                if not os.path.isfile(os.path.join(args['results'], 'runs', name + '.json')):
                    continue                     # not finished (yet): its checkpoint may be a mid-run one
                if not os.path.isfile(ckpt):
                    raise ConfigError(f"{ckpt}: the checkpoint of the finished run {name} is not there (--out)")
                record = {'name': name, 'ckpt': ckpt, **echo(ckpt, args['n_generate'])}
                atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()))
                print(f"{name}: {', '.join(f'{m} {record[m]:.3f}' for m in METRICS)}", flush=True)
            found[loss, seed] = read_json(path)
    paired = [s for s in seeds if all((loss, s) in found for loss in losses)]
    if not paired:
        raise ConfigError(f"no seed with a finished noisy run of every objective under {args['out']}")
    lines = ['# Alt-text noise in greedy captions of clean test photos (noisy condition; post hoc)', '',
             f"Seeds {', '.join(map(str, paired))}; {args['n_generate']} test photos each. attribution / boilerplate: "
             "share of captions that carry it; *_cut: scored with those spans cut out.", '',
             '| metric | ' + ' | '.join(losses) + ' | ' +
             ' | '.join(f'{loss} - ntp [95% CI], p' for loss in losses[1:]) + ' |', '|---' * (2 * len(losses)) + '|']
    for m in METRICS:
        cells = [f"{mean:.3f} ± {std:.3f}" for mean, std, _ in
                 (stats.mean_std([found[loss, s][m] for s in paired]) for loss in losses)]
        for loss in losses[1:]:
            t = stats.t_test([found[loss, s][m] - found['ntp', s][m] for s in paired])
            cells.append(f"{t['mean']:+.3f} [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}], {t['p']:.3f}" if t['n'] > 1
                         else 'n/a')
        lines.append(f"| {m} | " + ' | '.join(cells) + ' |')
    lines += ['', f"Greedy captions of the first 3 test photos (seed {paired[0]}):", '']
    lines += [f"- {loss}: " + ' / '.join(found[loss, paired[0]]['examples']) for loss in losses]
    text = '\n'.join(lines) + '\n'
    atomic_write(os.path.join(args['results'], 'noise_echo.md'), lambda f: f.write(text.encode()))
    print(text)


if __name__ == '__main__':
    cli(main, sys.argv[1:], __doc__)
