"""
The data-scaling phase's report (study.data_scaling): for each ladder, setting and metric, the
exponent b of error(D) = a D^(-b) for each objective (least squares in log-log on the means over
seeds, 95% bootstrap interval over seeds), b - b_NTP with an interval from draws that resample the
seed pairs jointly, the points, and a log-log figure per ladder beside the main study's compute fit.
"""

import json
import os
import re

import matplotlib
import numpy as np

from runs.files import atomic_write
from study import stats
from study.plan import ROOT

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import NullFormatter  # noqa: E402

# metric -> (what is fitted, from a record's value); the first of each ladder is its headline.
ERRORS = {'shapes': {'attr_acc': ('1 - attr_acc', lambda v: 1 - v), 'loss_relevant': ('loss_relevant', lambda v: v)},
          'flickr': {'retrieval_ratio_r1': ('1 - ratio-R@1', lambda v: 1 - v),
                     'loss': ('test loss (a local slope: it has a floor)', lambda v: v),
                     'cider': ('CIDEr-D (higher is better: b < 0 when it rises)', lambda v: v)}}
COLOURS = {'ntp': 'tab:blue', 'prior': 'tab:red', 'prior + debias': 'tab:orange'}
COMPUTE = os.path.join(ROOT, 'study', 'results', 'study.json')    # the main study's compute fit (U)


def points(records, ladder, setting, metric):
    """{arm: {n_train: {seed: error}}} over the records of one ladder and setting; PRIOR's debiased
    evaluation is the arm 'prior + debias'."""
    fitted = ERRORS[ladder][metric][1]
    out = {}
    for r in records:
        if r['ladder'] != ladder or r['setting'] != setting:
            continue
        arms = [(r['objective'], r['test'])] + ([('prior + debias', r['test_debias'])] if 'test_debias' in r else [])
        for arm, test in arms:
            out.setdefault(arm, {}).setdefault(r['n_train'], {})[r['seed']] = fitted(test[metric])
    return out


def paired(pts, arm, base='ntp'):
    """The points of `arm` and `base` at the sizes and seeds both have (two sizes or more), else None."""
    sizes = [n for n in sorted(pts.get(arm, {})) if n in pts.get(base, {})]
    a = {n: {s: pts[base][n][s] for s in pts[base][n] if s in pts[arm][n]} for n in sizes}
    b = {n: {s: pts[arm][n][s] for s in a[n]} for n in sizes}
    sizes = [n for n in sizes if a[n]]
    return ({n: a[n] for n in sizes}, {n: b[n] for n in sizes}) if len(sizes) > 1 else None


def fittable(pt):
    """(sizes, mean error over seeds at each) of one arm's {n: {seed: error}}, or None when it has fewer
    than two sizes or an error that is not positive (a power law cannot reach 0)."""
    xs = sorted(pt)
    means = [float(np.mean(list(pt[n].values()))) for n in xs]
    return (xs, means) if len(xs) > 1 and min(means) > 0 else None


def fit(pt):
    """{k, a, r2, ci95} of one arm's points, or None (see fittable)."""
    if not fittable(pt):
        return None
    k, a, r2 = stats.fit_power_law(*fittable(pt))
    return {'k': k, 'a': a, 'r2': r2, 'ci95': stats.power_law_ci({n: list(ys.values()) for n, ys in pt.items()})}


def exponent(pt):
    """The fitted exponent alone (no interval), or None (see fittable)."""
    return stats.fit_power_law(*fittable(pt))[0] if fittable(pt) else None


def tables(records):
    """The markdown lines and the fits {(ladder, setting, metric, arm): fit}."""
    lines, fits = [], {}
    for ladder in ERRORS:
        for setting in sorted({r['setting'] for r in records if r['ladder'] == ladder}):
            runs = [r for r in records if r['ladder'] == ladder and r['setting'] == setting]
            capped = sum(r['capped'] for r in runs)
            lines += [f"## {ladder}, {setting} ({len(runs)} runs; {capped} reached max_iters before early stopping)", '',
                      '| fitted | arm | b [95% CI] | R² | b - b_ntp [95% CI] |', '|---|---|---|---|---|']
            for metric, (label, _) in ERRORS[ladder].items():
                pts = points(records, ladder, setting, metric)
                for arm in pts:
                    f = fits[ladder, setting, metric, arm] = fit(pts[arm])
                    pair = paired(pts, arm) if arm != 'ntp' else None
                    ks = [exponent(p) for p in pair] if pair else [None]
                    diff = (f"{ks[1] - ks[0]:+.3f} " + "[{:+.3f}, {:+.3f}]".format(*stats.exponent_difference_ci(*pair))
                            if None not in ks else '')
                    lines.append(f"| {label} | {arm} | " + (f"{f['k']:.3f} [{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}] | "
                                 f"{f['r2']:.2f}" if f else 'n/a | ') + f" | {diff} |")
            lines.append('')
            lines += points_table(records, ladder, setting) + ['']
    return lines, fits


def points_table(records, ladder, setting):
    """Each size's mean ± std over seeds of every metric, per arm."""
    out = ['| n_train | arm | seeds | ' + ' | '.join(ERRORS[ladder]) + ' | best step (mean) |',
           '|---' * (4 + len(ERRORS[ladder])) + '|']
    runs = [r for r in records if r['ladder'] == ladder and r['setting'] == setting]
    for n in sorted({r['n_train'] for r in runs}):
        for arm in ('ntp', 'prior', 'prior + debias'):
            base = 'prior' if arm == 'prior + debias' else arm
            group = [r for r in runs if r['n_train'] == n and r['objective'] == base
                     and (arm != 'prior + debias' or 'test_debias' in r)]
            if not group:
                continue
            tests = [r['test_debias'] if arm == 'prior + debias' else r['test'] for r in group]
            cells = ['{:.4f} ± {:.4f}'.format(*stats.mean_std([t[m] for t in tests])[:2]) for m in ERRORS[ladder]]
            best = np.mean([r['best_step'] or r['last_step'] for r in group])
            out.append(f"| {n:,} | {arm} | {len(group)} | " + ' | '.join(cells) + f" | {best:.0f} |")
    return out


def figure(records, fits, ladder, path):
    """Log-log: each seed's headline error against n_train with the fits, per setting; for shapes, the
    main study's compute fit (U) beside them."""
    metric = next(iter(ERRORS[ladder]))
    settings = sorted({r['setting'] for r in records if r['ladder'] == ladder})
    compute = ladder == 'shapes' and os.path.isfile(COMPUTE)
    fig, axes = plt.subplots(1, len(settings) + compute, figsize=(5 * (len(settings) + compute), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for arm, pt in points(records, ladder, setting, metric).items():
            for n, ys in pt.items():
                ax.scatter([n] * len(ys), list(ys.values()), color=COLOURS.get(arm, 'gray'), s=12, alpha=0.6)
            f = fits.get((ladder, setting, metric, arm))
            if f:
                grid = np.geomspace(min(pt), max(pt), 50)
                ax.plot(grid, f['a'] * grid ** -f['k'], color=COLOURS.get(arm, 'gray'),
                        label=f"{arm}: b = {f['k']:.3f} [{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}]")
        style(ax, 'training captions', ERRORS[ladder][metric][0], f"{ladder}, {setting}")
        sizes = sorted({r['n_train'] for r in records if r['ladder'] == ladder and r['setting'] == setting})
        ticks(ax, sizes, [f'{n:,}' for n in sizes])
    if compute:
        with open(COMPUTE) as f:
            scaling = json.load(f)['scaling']
        for obj, by_axis in scaling.items():
            c = by_axis['compute']
            xs = np.array([float(x) for x in c['points']])
            for x, ys in zip(xs, c['points'].values()):
                axes[0, -1].scatter([x] * len(ys), ys, color=COLOURS.get(obj, 'gray'), s=12, alpha=0.6)
            grid = np.geomspace(xs.min(), xs.max(), 50)
            axes[0, -1].plot(grid, c['a'] * grid ** -c['k'], color=COLOURS.get(obj, 'gray'),
                             label=f"{obj}: compute k = {c['k']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]")
        style(axes[0, -1], 'training FLOPs', '1 - attr_acc', 'main study: compute (U, fixed data)')
        ticks(axes[0, -1], xs, [f'{x:.1e}' for x in xs])
    fig.suptitle('Data scaling: points are seeds, lines power-law fits\n(legend: b and its bootstrap 95% CI)', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def style(ax, xlabel, ylabel, title):
    ax.set_xscale('log'), ax.set_yscale('log'), ax.set_xlabel(xlabel), ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10), ax.grid(alpha=0.3, which='both')
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def ticks(ax, xs, labels):
    """x ticks at the measured points only (a log axis labels its minor ticks, which overlap here)."""
    ax.set_xticks(xs, labels, fontsize=8)
    ax.xaxis.set_minor_formatter(NullFormatter())


def stopped_on(records):
    """Each ladder's early-stopping metric, as its runs' commands set it (train.py's default: val loss)."""
    found = {}
    for r in records:
        metric = re.search(r'--stop_on=(\S+)', r['command'])
        found.setdefault(r['ladder'], set()).add(metric.group(1) if metric else 'loss')
    return '; '.join(f"{ladder}: {', '.join(sorted(m))}" for ladder, m in sorted(found.items()))


def write(records, results):
    """summary.md and a figure per ladder in `results`; returns the markdown."""
    lines, fits = tables(records)
    commits = sorted({r['commit'][:7] for r in records})
    walls = sum(r['wall_s'] for r in records)
    text = '\n'.join(['# Data scaling: NTP vs PRIOR (design: design.md)', '',
                      'b: the exponent of error(D) = a D^(-b) fitted to the means over seeds (D: training captions); '
                      'intervals: 1,000 bootstrap draws over seeds (for b - b_ntp the seed pairs are drawn jointly). '
                      f"Every run trained until its val stopping metric ({stopped_on(records)}) stopped improving "
                      '(capped: it reached max_iters first) and was tested on its best val checkpoint.', ''] + lines +
                     [f"{len(records)} runs, {walls / 3600:.1f} h of run wall time in all; commits as the runs "
                      f"started: {', '.join(commits)}."]) + '\n'
    atomic_write(os.path.join(results, 'summary.md'), lambda f: f.write(text.encode()))
    for ladder in ERRORS:
        if any(r['ladder'] == ladder for r in records):
            figure(records, fits, ladder, os.path.join(results, f'{ladder}.png'))
    return text
