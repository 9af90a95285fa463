"""
Post hoc: where each weighting puts the weight, per group of tokens, on training captions and on
val captions, from the finished runs' checkpoints (not part of the fixed protocol). Groups: the
image-relevant tokens, filler, names and cities (nothing predicts them) and, with noisy training
captions, the wrong shape words (noise the text predicts; val captions have none).

Why both splits: a gain weighting reads the LVLM's own loss, and on training captions the LVLM
may have learnt a name by heart (each caption comes round a few times), which looks like a gain
from the image. Val captions it never trained on: a high weight on their names comes from the
weighting, not from memory.

    python -m study.token_weights                                    # preset beyond: study/results_beyond
    python -m study.token_weights --preset=full --objectives=prior   # the main study's PRIOR runs

Each run at its setting's chosen rate, every seed and condition whose checkpoint is still on disk
(a counted skip otherwise); cells are the mean over seeds of the mean weight (1 = NTP) and, in
brackets, the reference's mean P_r. Writes <results>/token_weights.md.
"""

import os
import sys

import numpy as np
import torch

from data import load_splits
from eval import load_trained, reference_probs
from runs.cli import cli, parse_flags
from runs.errors import ConfigError
from runs.files import atomic_write, checkpoint_path
from runs.reference_files import reference_of
from sources.shapes import FILLER, NOISE, RELEVANT, SHAPES
from study.plan import (CONDITIONS, DYNAMIC_WEIGHT_ROWS, PRESETS, SETTINGS, best_lr, by_seed, condition_extra,
                        load_runs, objective_weights, results_folder)
from sources.tokenizer import get_tokenizer

FLAGS = {'preset': 'beyond', 'results': '', 'objectives': '', 'rows': DYNAMIC_WEIGHT_ROWS}
GROUPS = ('relevant', 'filler', 'names and cities', 'wrong shape words')


def groups(data, vocab):
    """Boolean masks [N, T] of each group's caption tokens."""
    shape_ids = torch.as_tensor(vocab.encode([get_tokenizer().encode(' ' + s)[0] for s in SHAPES]))
    shape = torch.isin(data.targets, shape_ids)
    return dict(zip(GROUPS, (data.classes == RELEVANT, data.classes == FILLER, ~shape & (data.classes == NOISE),
                             shape & (data.classes == NOISE))))


def run_weights(run, n_rows):
    """{split: {group: (mean weight, mean P_r)}} on the first n_rows captions of train and val."""
    ckpt_path = checkpoint_path(run['config']['out_dir'])
    model, vocab, cfg, ckpt = load_trained(ckpt_path, 'cpu')
    reference = reference_of(ckpt, ckpt_path, vocab.gpt2_ids) if cfg.loss != 'label' else None
    out = {}
    for name, data in load_splits(cfg, names=('train', 'val'), log=lambda *a: None).items():
        data = data.encode(vocab).subset(range(min(n_rows, len(data))))
        p_r = reference_probs(reference, data, 'cpu').numpy() if reference else None
        w, _ = objective_weights(run['spec']['objective'], cfg, model, data, torch.arange(len(data)), p_r)
        out[name] = {g: (float(w[m].mean()), float(p_r[m.numpy()].mean()) if reference else float('nan'))
                     for g, m in groups(data, vocab).items() if m.any()}
    return out


def main(argv):
    args = parse_flags(argv, FLAGS)
    if args['preset'] not in PRESETS:
        raise ConfigError(f"--preset must be one of {list(PRESETS)}, got {args['preset']!r}")
    preset = PRESETS[args['preset']]
    results = args['results'] or results_folder(args['preset'])
    objectives = [o for o in (args['objectives'].split(',') if args['objectives'] else preset['objectives']) if o != 'ntp']
    runs, rows, skipped = load_runs(os.path.join(results, 'runs')), [], 0
    for st in SETTINGS:
        for obj in objectives:
            lr = best_lr(runs, st, obj, preset)
            for cond in CONDITIONS:
                extra = condition_extra(preset, cond)
                found = list(by_seed(runs, st, obj, lr, preset['seeds'], **extra).values())
                done = [r for r in found if os.path.isfile(checkpoint_path(r['config']['out_dir']))]
                skipped += len(found) - len(done)
                per_seed = [run_weights(r, args['rows']) for r in done]
                for split in ('train', 'val') if per_seed else ():
                    cells = [f"{np.mean([s[split][g][0] for s in per_seed]):.2f} "
                             f"(P_r {np.mean([s[split][g][1] for s in per_seed]):.2f})"
                             if g in per_seed[0][split] else '' for g in GROUPS]
                    rows.append(f"| {st.upper()}, {cond} | {obj} | {split} | " + ' | '.join(cells) + f" | {len(per_seed)} |")
                    print(rows[-1], flush=True)
    text = '\n'.join([f"# Mean weight per token group ({args['preset']}; `python -m study.token_weights`, post hoc)", '',
                      f"First {args['rows']:,} captions of each split; mean over seeds of the mean weight (1 = NTP), "
                      "the reference's mean P_r in brackets.", '',
                      '| setting, condition | objective | captions | ' + ' | '.join(GROUPS) + ' | seeds |',
                      '|---' * (len(GROUPS) + 4) + '|'] + rows) + '\n'
    if skipped:
        text += f"\nSkipped {skipped} runs whose checkpoints are no longer on disk.\n"
    atomic_write(os.path.join(results, 'token_weights.md'), lambda f: f.write(text.encode()))
    print(f"wrote {os.path.join(results, 'token_weights.md')}" + (f" (skipped {skipped} runs without checkpoints)"
                                                                   if skipped else ''))


if __name__ == '__main__':
    cli(main, sys.argv[1:], __doc__, f"Flags (--key=value) and their defaults: {FLAGS}")
