"""
Curves of training runs: one run's loss.png (train.py draws it at the end), or any runs side by side;
and eval.py's --figure, caption tokens shaded by PRIOR weight and LVLM loss.

    python -m runs.plots out/shapes_u out/shapes_u_ntp         # -> compare.png and a table of final metrics
    python -m runs.plots out/a out/b out/c --out=runs.png

Each run folder needs its log.jsonl; the table also reads eval_test.json where the run has one.
Panels whose values are all missing (per-class losses on real data, NaN there) are left out.
"""

import json
import math
import os
import sys

import matplotlib

from runs.cli import cli, parse_flags
from runs.errors import ConfigError
from runs.files import atomic_write

matplotlib.use('Agg')                           # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

FLAGS = {'out': 'compare.png'}
# val curves worth comparing, in order; those a run does not have (NaN) are skipped
VAL_KEYS = ('val_loss', 'val_loss_relevant', 'val_attr_acc')


def read_log(run_dir):
    path = os.path.join(run_dir, 'log.jsonl')
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir}: no log.jsonl (is it a train.py run folder?)")
    with open(path) as f:
        return [json.loads(line) for line in f]


def series(rows, key):
    """(steps, values) of `key` in log rows, without missing or NaN values."""
    points = [(r['step'], r[key]) for r in rows if key in r and r[key] is not None and not math.isnan(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(log_path, png_path):
    """One run: the training objective (PRIOR-weighted or NTP), the val NTP loss, and val loss per
    token class (val_loss_<class>) where the data has classes (shapes), each on its own axis."""
    rows = [json.loads(line) for line in open(log_path)]
    panels = [('train objective', [('train', 'train_loss')]), ('val caption loss (NTP)', [('val', 'val_loss')])]
    class_keys = dict.fromkeys(k for r in rows for k in r if k.startswith('val_loss_'))   # per token class, in order
    classes = [(k[len('val_loss_'):], k) for k in class_keys if series(rows, k)[0]]
    if classes:
        panels.append(('val loss per token class', classes))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for label, key in lines:
            ax.plot(*series(rows, key), 'o-' if key.startswith('val') else '-', label=label, markersize=3)
        ax.set_title(title), ax.set_xlabel('step')
        if len(lines) > 1:
            ax.legend()
    fig.tight_layout()
    atomic_write(png_path, lambda f: fig.savefig(f, format='png', dpi=100))
    plt.close(fig)


def token_figure(rows, path):
    """Caption tokens shaded by two values each, one row per image: rows of (image [H,W,3], token
    texts, PRIOR weights, LVLM losses), as eval.py's --figure draws them."""
    fig, axes = plt.subplots(len(rows), 2, figsize=(13, 2.6 * len(rows)), gridspec_kw={'width_ratios': [1, 9]},
                             squeeze=False)
    for r, (image, tokens, weights, losses) in enumerate(rows):
        axes[r, 0].imshow(image, interpolation='nearest'), axes[r, 0].axis('off')
        ax = axes[r, 1]
        ax.axis('off'), ax.set_xlim(0, 1), ax.set_ylim(0, 1)
        for line, (name, values, vmax, cmap) in enumerate((('PRIOR weight', weights, 3.0, 'Reds'),
                                                          ('LVLM loss', losses, 4.0, 'Blues'))):
            x, y = 0.0, 0.86 - 0.5 * line
            ax.text(x, y + 0.1, name, fontsize=8, color='gray')
            for tok, v in zip(tokens, values):
                width = 0.0086 * max(len(tok), 1)
                if x + width > 1:
                    x, y = 0.0, y - 0.13
                ax.text(x, y, tok.replace('<|endoftext|>', '⏎'), fontsize=8, family='monospace',
                        bbox=dict(facecolor=plt.get_cmap(cmap)(min(v / vmax, 1.0)), edgecolor='none', pad=1))
                x += width
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=110))
    plt.close(fig)


def final_metrics(run_dir, rows):
    """The last val values and, if present, the test metrics of eval_test.json."""
    out = {}
    for key in VAL_KEYS:
        values = series(rows, key)[1]
        if values:
            out[key] = values[-1]
    train = series(rows, 'train_loss')
    if train[0]:
        out['steps'] = train[0][-1]
    test = os.path.join(run_dir, 'eval_test.json')
    if os.path.isfile(test):
        with open(test) as f:
            out.update({f'test_{k}': v for k, v in json.load(f).items() if isinstance(v, float)})
    return out


def compare(run_dirs, png_path):
    """Val curves of every run on shared axes, and a markdown table of their final metrics."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(set(names)) < len(names):             # same folder name under different parents
        names = [os.path.normpath(d) for d in run_dirs]
    logs = [read_log(d) for d in run_dirs]
    keys = [k for k in VAL_KEYS if any(series(rows, k)[0] for rows in logs)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, rows in zip(names, logs):
            ax.plot(*series(rows, key), 'o-', label=name, markersize=3)
        ax.set_title(key), ax.set_xlabel('step'), ax.legend()
    fig.tight_layout()
    atomic_write(png_path, lambda f: fig.savefig(f, format='png', dpi=100))
    plt.close(fig)
    finals = [final_metrics(d, rows) for d, rows in zip(run_dirs, logs)]
    metrics = list(dict.fromkeys(k for f in finals for k in f))
    lines = ['| metric | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
    for key in metrics:
        cells = [f"{f[key]:.4g}" if key in f else '' for f in finals]
        lines.append(f'| {key} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv):
    runs = [a for a in argv if not a.startswith('-')]
    args = parse_flags([a for a in argv if a.startswith('-')], FLAGS)
    if not runs:
        raise ConfigError("name at least one run folder: python -m runs.plots out/a out/b")
    print(compare(runs, args['out']))
    print(f"wrote {args['out']}")


if __name__ == '__main__':
    cli(main, sys.argv[1:], __doc__, "Flags: --out=compare.png   the figure to write")
