"""
The study's figures, drawn from the run JSONs and report.aggregate's numbers: validation curves per
condition, the scaling fits, and where each weighting puts its weight (with the loss per token class).
"""

import matplotlib
import numpy as np

from study.plan import CONDITIONS, SETTINGS, by_seed, condition_extra

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

COLOURS = {'ntp': 'tab:blue', 'prior': 'tab:red', 'prior_floor': 'tab:green', 'prior_a05': 'tab:pink',
           'label': 'tab:gray', 'gain': 'tab:purple', 'prior_gain': 'tab:orange'}


def save_figure(fig, title, path):
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(runs, agg, preset, path):
    fig, axes = plt.subplots(len(SETTINGS), len(CONDITIONS), figsize=(11, 7.5), squeeze=False)
    for i, st in enumerate(SETTINGS):
        for j, cond in enumerate(CONDITIONS):
            ax = axes[i, j]
            for obj in preset['objectives']:
                extra = condition_extra(preset, cond)
                g = by_seed(runs, st, obj, agg['best_lr'][f'{st}/{obj}'], preset['seeds'], **extra)
                if not g:
                    continue
                steps = [c['step'] for c in next(iter(g.values()))['curve']]
                ys = np.array([[c['attr_acc'] for c in r['curve']] for r in g.values()])
                ax.plot(steps, ys.mean(0), color=COLOURS[obj], label=f"{obj} ({len(g)} seeds)")
                ax.fill_between(steps, ys.min(0), ys.max(0), color=COLOURS[obj], alpha=0.2)
            ax.set_title(f"{st.upper()}-LVLM, {cond} training captions", fontsize=10)
            ax.set_xlabel('step'), ax.set_ylabel('val attr_acc'), ax.set_ylim(0.25, 1.0), ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    save_figure(fig, 'Validation attribute accuracy (mean over seeds; band = min..max)', path)


def plot_scaling(agg, path):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, axis, label in ((axes[0], 'compute', 'training FLOPs'), (axes[1], 'data', 'training images')):
        for obj, fits in agg['scaling'].items():
            f = fits.get(axis)
            if not f:
                continue
            xs = np.array([float(x) for x in f['points']])
            for x, ys in zip(xs, f['points'].values()):
                ax.scatter([x] * len(ys), ys, color=COLOURS[obj], s=12, alpha=0.6)
            grid = np.geomspace(xs.min(), xs.max(), 50)
            ax.plot(grid, f['a'] * grid ** -f['k'], color=COLOURS[obj],
                    label=f"{obj}: k = {f['k']:.3f} [{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}]")
        ax.set_xscale('log'), ax.set_yscale('log'), ax.set_xlabel(label), ax.set_ylabel('test 1 - attr_acc')
        ax.grid(alpha=0.3, which='both')
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    save_figure(fig, 'Scaling, U-LVLM (points: seeds; lines: power-law fits with bootstrap 95% CI of k)', path)


def plot_weak_spot(agg, preset, path):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    classes = ('relevant', 'filler', 'noise')
    tags = [t for t in agg['class_weights'] if t.startswith('u/')]
    for k, tag in enumerate(tags):
        axes[0].bar(np.arange(3) + k * 0.8 / len(tags), [agg['class_weights'][tag][c] for c in classes],
                    width=0.8 / len(tags), label=tag, color=COLOURS[tag.split('/')[-1]],
                    hatch='//' if '/noisy/' in tag else None, edgecolor='white')      # noisy: hatched
    axes[0].set_xticks(np.arange(3) + 0.4 - 0.4 / max(1, len(tags))), axes[0].set_xticklabels(classes)
    axes[0].axhline(1.0, color='gray', lw=0.8), axes[0].set_ylabel('mean training weight (NTP = 1)')
    axes[0].set_title('Where each weighting puts the weight (U)', fontsize=10), axes[0].legend(fontsize=7)
    objectives = preset['objectives']
    width = 0.8 / len(objectives)
    for k, obj in enumerate(o for o in objectives if o in agg['main']['u/clean']):     # a partial report: those run
        means = [agg['main']['u/clean'][obj][f'loss_{c}'][0] for c in classes]
        stds = [agg['main']['u/clean'][obj][f'loss_{c}'][1] for c in classes]
        axes[1].bar(np.arange(3) + k * width, means, yerr=stds, width=width, color=COLOURS[obj], label=obj)
    axes[1].set_xticks(np.arange(3) + 0.4 - width / 2), axes[1].set_xticklabels(classes)
    axes[1].set_ylabel('test loss (nats/token)'), axes[1].set_title('Loss per token class (U, clean)', fontsize=10)
    axes[1].legend(fontsize=8)
    save_figure(fig, None, path)
