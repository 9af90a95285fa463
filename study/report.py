"""
The study's report, rebuilt from the run JSONs alone: study.json (every aggregate), summary.md
(each claim with its interval and test) and the figures (study/figures.py).

The metrics were fixed before the comparison ran (see docs/results.md):
  - paper-style average relative gain over accuracy-type metrics whose NTP value is far from 0:
    the four attribute accuracies and `grounded` = 1 - hallucination (share of described
    objects that are in the image);
  - caption-level shares that can sit near 0 (recall, exact) as absolute differences;
  - the loss on each true token class apart: relevant (what PRIOR should help), filler and
    noise (what it may cost).
"""

import json
import os

import numpy as np

from study import figures, stats
from study.plan import (CONDITIONS, DYNAMIC_WEIGHT_ROWS, SETTINGS, STATIC_WEIGHTS, best_lr, by_seed, condition_extra,
                        phases, select_seeds, setting_value, sweep_lrs, val_score)

REL_METRICS = ('acc_count', 'acc_colour', 'acc_shape', 'acc_position', 'grounded')
ABS_METRICS = ('recall', 'exact')
CLASS_LOSSES = ('loss_relevant', 'loss_filler', 'loss_noise')
TABLE_METRICS = ('attr_acc',) + REL_METRICS + ABS_METRICS + CLASS_LOSSES
SETTING_NAMES = {'u': 'U-LVLM (encoder-free, all trained)',
                 'h': 'H-LVLM (frozen pretrained ViT, trained projector and LM)'}
LABELS = {'prior': 'PRIOR', 'prior_floor': 'PRIOR + weight floor', 'prior_a05': 'PRIOR, alpha 0.5',
          'label': 'the label ceiling (relevant tokens x2)', 'gain': 'gain', 'prior_gain': 'prior_gain'}


def metric(m, key):
    return 1 - m['hallucination'] if key == 'grounded' else m[key]


def compare(new, base):
    """PRIOR-vs-NTP statistics over the seeds both have: relative gain (paired t, t-based 95% CI),
    each metric's relative change, absolute differences of the caption shares, class losses."""
    seeds = sorted(set(new) & set(base))
    a, b = [new[s]['test'] for s in seeds], [base[s]['test'] for s in seeds]
    gains, per_metric = [], {}
    for m in REL_METRICS:
        per_metric[m] = [stats.relative_change(metric(x, m), metric(y, m), True) for x, y in zip(a, b)]
    for i in range(len(seeds)):
        changes = [per_metric[m][i] for m in REL_METRICS if per_metric[m][i] is not None]
        gains.append(float(np.mean(changes)) if changes else None)
    out = {'seeds': seeds, 'relative_gain': summarise(gains)}
    out['per_metric'] = {m: summarise(v) for m, v in per_metric.items()}
    for m in ABS_METRICS + CLASS_LOSSES + ('attr_acc',):
        out[m] = summarise([metric(x, m) - metric(y, m) for x, y in zip(a, b)])
    return out


def summarise(values):
    """Paired differences over seeds: mean, std, t-based 95% interval, t and its two-sided p-value."""
    mean, std, n = stats.mean_std(values)
    test = stats.t_test(values)
    return {'mean': mean, 'std': std, 'n': n, 'ci95': test['ci'], 't': test['t'], 'p': test['p'],
            'significant': test['p'] < 0.05, 'values': [v for v in values]}


def correct_for_the_table(comparisons):
    """Holm's correction across the table's headline tests (each comparison's relative gain): stores the
    adjusted p-value and whether the test survives it."""
    keys = list(comparisons)
    adjusted, survives = stats.holm([comparisons[k]['relative_gain']['p'] for k in keys])
    for k, p, ok in zip(keys, adjusted, survives):
        comparisons[k]['relative_gain'].update(p_holm=p, significant_holm=ok)


def sample_efficiency(prior, ntp, key='attr_acc'):
    """Per seed: the first val step where PRIOR reaches NTP's final val `key`, and NTP's steps / that."""
    out = []
    for sd in sorted(set(prior) & set(ntp)):
        final_step, target = ntp[sd]['curve'][-1]['step'], ntp[sd]['curve'][-1][key]
        step = stats.first_step_reaching([(c['step'], c[key]) for c in prior[sd]['curve']], target)
        out.append({'seed': sd, 'target': target, 'ntp_steps': final_step, 'prior_steps': step,
                    'speedup': final_step / step if step else None})
    return out


def aggregate(preset, runs):
    seeds = preset['seeds']
    plan = list(phases(preset, runs))
    agg = {'preset': preset, 'sweep': {}, 'best_lr': {}, 'main': {}, 'comparisons': {}, 'sample_efficiency': {},
           'class_weights': {}, 'final_val': {}, 'scaling': {}, 'frozen_lm': {}}
    if len(plan) < 2:
        return agg                               # the sweep is not finished: nothing to compare yet
    objectives = preset['objectives']
    for st in SETTINGS:
        for obj in objectives:
            lrs = sweep_lrs(runs, st, obj, preset)
            agg['sweep'][f'{st}/{obj}'] = {f'{lr:g}': val_score(runs, st, obj, lr, preset) for lr in lrs}
            agg['best_lr'][f'{st}/{obj}'] = best_lr(runs, st, obj, preset)
    for st in SETTINGS:
        for cond in CONDITIONS:
            extra = condition_extra(preset, cond)
            group = {obj: by_seed(runs, st, obj, agg['best_lr'][f'{st}/{obj}'], seeds, **extra) for obj in objectives}
            group = {obj: g for obj, g in group.items() if g}          # noisy captions: only the noisy_objectives
            tag = f'{st}/{cond}'
            agg['main'][tag] = {obj: {m: stats.mean_std([metric(r['test'], m) for r in g.values()])
                                      for m in TABLE_METRICS} for obj, g in group.items()}
            agg['final_val'][tag] = {obj: {sd: r['val']['attr_acc'] for sd, r in g.items()} for obj, g in group.items()}
            for obj in objectives[1:]:
                if obj in group and 'ntp' in group:
                    agg['comparisons'][f'{tag}/{obj}'] = compare(group[obj], group['ntp'])
                    agg['sample_efficiency'][f'{tag}/{obj}'] = sample_efficiency(group[obj], group['ntp'])
                    agg['class_weights'][f'{tag}/{obj}'] = {
                        c: stats.mean_std([r['class_weights'][c] for r in group[obj].values()])[0]
                        for c in ('relevant', 'filler', 'noise')}
    correct_for_the_table(agg['comparisons'])
    agg['scaling'] = scaling(preset, runs, agg['best_lr'])
    for obj in ('ntp', 'prior') if preset['frozen_lm_seeds'] else ():
        g = by_seed(runs, 'h', obj, agg['best_lr'][f'h/{obj}'], seeds[:preset['frozen_lm_seeds']], freeze_lm=True)
        agg['frozen_lm'][obj] = {m: stats.mean_std([metric(r['test'], m) for r in g.values()]) for m in TABLE_METRICS}
    return agg


def scaling(preset, runs, best):
    """Test error (1 - attr_acc) against training FLOPs and against training images, per objective:
    power-law exponents with bootstrap intervals over seeds (U; the main run is the top point)."""
    seeds = preset['seeds'][:preset['scaling_seeds']]
    iters, n_train = setting_value(preset, 'max_iters'), setting_value(preset, 'n_train')
    axes = {'compute': [{'max_iters': round(iters * f)} for f in preset['compute_fractions']] + [{}],
            'data': [{'n_train': round(n_train * f)} for f in preset['data_fractions']] + [{}]}
    out = {}
    for obj in ('ntp', 'prior'):
        out[obj] = {}
        for axis, variants in axes.items():
            points = {}
            for extra in variants:
                g = list(by_seed(runs, 'u', obj, best[f'u/{obj}'], seeds, **extra).values())
                if g:
                    x = float(np.mean([r['flops'] for r in g])) if axis == 'compute' else g[0]['config']['n_train']
                    points[x] = [1 - r['test']['attr_acc'] for r in g]
            if len(points) >= 2 and all(v > 0 for ys in points.values() for v in ys):
                k, a, r2 = stats.fit_power_law(sorted(points), [np.mean(points[x]) for x in sorted(points)])
                out[obj][axis] = {'k': k, 'a': a, 'r2': r2, 'ci95': stats.power_law_ci(points),
                                  'points': {f'{x:g}': ys for x, ys in sorted(points.items())}}
    return out


# ---------------------------------------------------------------------------------------------
# Writing it out

def fmt(ms, digits=3):
    mean, std, n = ms
    return 'n/a' if n == 0 else f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def pct(s):
    lo, hi = s['ci95']
    return f"{100 * s['mean']:+.1f}% [95% CI {100 * lo:+.1f}, {100 * hi:+.1f}]"


def pts(s):
    lo, hi = s['ci95']
    return f"{100 * s['mean']:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def verdict(s):
    """t, p and the verdict; for a headline test, after Holm's correction across the table."""
    if 'p_holm' in s:
        return (f"paired t = {s['t']:.2f}, p = {s['p']:.3f}, Holm-adjusted p = {s['p_holm']:.3f} (n = {s['n']}): "
                + (('**significantly better**' if s['mean'] > 0 else '**significantly worse**') if s['significant_holm']
                   else 'not significant') + ' after correction')
    return (f"paired t = {s['t']:.2f}, p = {s['p']:.3f} (n = {s['n']}, uncorrected): "
            + ('**significant**' if s['significant'] else 'not significant'))


def main_section(agg, tag, preset):
    st, cond = tag.split('/')
    name = SETTING_NAMES[st] + (', clean captions' if cond == 'clean' else
                                f", noisy training captions (caption_noise {preset['caption_noise']})")
    objectives = preset['objectives']
    lines = [f"### {name}", '', '| test metric | ' + ' | '.join(objectives) + ' |', '|---' * (len(objectives) + 1) + '|']
    for m in TABLE_METRICS:
        lines.append(f"| {m} | " + ' | '.join(fmt(agg['main'][tag][obj][m]) if obj in agg['main'][tag] else 'not run'
                                             for obj in objectives) + ' |')
    lines.append('')
    for obj in objectives[1:]:
        c = agg['comparisons'].get(f'{tag}/{obj}')
        if c is None:
            continue
        label = LABELS[obj] + (f" {preset['floor']}" if obj == 'prior_floor' else '')
        worse = [m for m in REL_METRICS if c['per_metric'][m]['mean'] < 0]
        lines.append(f"- **{label} vs NTP**: relative gain {pct(c['relative_gain'])}, {verdict(c['relative_gain'])}."
                     f" Per seed: {', '.join(f'{100 * v:+.1f}%' for v in c['relative_gain']['values'] if v is not None)}."
                     f" Worse than NTP on: {', '.join(worse) or 'none'}.")
        lines.append(f"  Caption shares (absolute): recall {pts(c['recall'])}, exact {pts(c['exact'])}."
                     f" Loss per token class (minus NTP's, nats): relevant {c['loss_relevant']['mean']:+.3f} "
                     f"({verdict(c['loss_relevant'])}), filler {c['loss_filler']['mean']:+.3f}, "
                     f"noise {c['loss_noise']['mean']:+.3f}.")
        se = agg['sample_efficiency'][f'{tag}/{obj}']
        reached = [e for e in se if e['speedup']]
        at = ', '.join(str(e['prior_steps']) for e in reached)
        speedup = ', '.join(f"{e['speedup']:.2f}x" for e in reached)
        lines.append(f"  Sample efficiency: reaches NTP's final val attr_acc in {len(reached)} of {len(se)} seeds"
                     + (f", at step {at} of {se[0]['ntp_steps']} (speed-up {speedup})" if reached else '') + '.')
        w = agg['class_weights'][f'{tag}/{obj}']
        lines.append(f"  Mean training weight per token class (1 = NTP{weights_from(obj)}): relevant "
                     f"{w['relevant']:.2f}, filler {w['filler']:.2f}, noise {w['noise']:.2f}"
                     + (" (names and cities, and the wrong shape words)" if cond == 'noisy' else '') + '.')
    return lines


def weights_from(objective):
    return '' if objective in STATIC_WEIGHTS else \
        f"; as the trained model weighs the first {DYNAMIC_WEIGHT_ROWS:,} training captions"


def headline_table(agg):
    """One row per comparison with NTP: what docs/results.md's table quotes."""
    lines = ['| condition | objective | test attr_acc (NTP -> it) | relative gain [95% CI] | t, p, Holm p | '
             'recall, pts | exact, pts | loss relevant / filler, nats | reaches NTP\'s final val attr_acc | '
             'mean weight relevant / filler / noise |', '|---' * 10 + '|']
    for key, c in agg['comparisons'].items():
        st, cond, obj = key.split('/')
        g, w = c['relative_gain'], agg['class_weights'][key]
        acc = agg['main'][f'{st}/{cond}']
        reached = sum(1 for e in agg['sample_efficiency'][key] if e['speedup'])
        sig = (' **sig. better**' if g['mean'] > 0 else ' **sig. worse**') if g['significant_holm'] else ''
        lines.append(f"| {st.upper()}, {cond} | {obj} | {acc['ntp']['attr_acc'][0]:.3f} -> {acc[obj]['attr_acc'][0]:.3f} | "
                     f"{pct(g).replace('95% CI ', '')} | {g['t']:.2f}, {g['p']:.3f}, {g['p_holm']:.3f}"
                     f"{sig} | {pts(c['recall']).replace(' pts', '')} | "
                     f"{pts(c['exact']).replace(' pts', '')} | {c['loss_relevant']['mean']:+.3f} / "
                     f"{c['loss_filler']['mean']:+.3f} | {reached} of {len(agg['sample_efficiency'][key])} seeds | "
                     f"{w['relevant']:.2f} / {w['filler']:.2f} / {w['noise']:.2f} |")
    return lines


def summary_text(agg, preset, preset_name, data_seed, runtime):
    seeds = preset['seeds']
    lines = [f"# PRIOR vs NTP on the shapes data (preset `{preset_name}`, data seed {data_seed})", '',
             f"Seeds {seeds}; learning rate per setting and objective chosen on val {'attr_acc'} (mean over seeds "
             f"{select_seeds(preset)}) from a sweep that is extended until the chosen rate has a neighbour on both sides. "
             f"Test split: teacher-forced metrics on every caption, free-running metrics on "
             f"{preset['n_generate']} greedy captions. Relative gain = mean over {', '.join(REL_METRICS)} of the "
             f"relative change vs NTP (+ is better), paired by seed; 95% CIs t-based over seeds; "
             f"significance by a paired t-test, with Holm's correction across the table's headline tests "
             f"(the relative gains)." + (f" Protocol wall time {runtime / 60:.0f} min." if runtime else ''), '',
             f"## Learning-rate sweep (val attr_acc, mean over seeds {select_seeds(preset)})", '',
             '| setting/objective | rates tried: val attr_acc | chosen |', '|---|---|---|']
    for key, sweep in agg['sweep'].items():
        lines.append(f"| {key} | {', '.join(f'{lr}: {v:.3f}' for lr, v in sweep.items())} | {agg['best_lr'][key]:g} |")
    lines += ['', '## Every comparison with NTP (test split, paired by seed; Holm across the relative gains)', '']
    lines += headline_table(agg)
    ran = {obj: [g[obj] for g in agg['final_val'].values() if obj in g] for obj in preset['objectives']}
    fresh = [sd for sd in preset['seeds'] if sd not in select_seeds(preset)]
    lines += ['', f"Final val attr_acc, mean over the conditions each objective ran in and seeds {fresh} (not those "
              "that chose the rates): " + ', '.join(f"{obj} {np.mean([v for g in c for sd, v in g.items() if sd in fresh]):.4f}"
                                                    f" ({len(c)} conditions)" for obj, c in ran.items()) + '.']
    lines += ['', '## Main comparison (test split, mean ± std over seeds)', '']
    for tag in agg['main']:
        lines += main_section(agg, tag, preset) + ['']
    if not agg['scaling'].get('ntp'):
        return '\n'.join(lines) + '\n'
    lines += ['## Scaling (U, clean; test error = 1 - attr_acc ~ a * x^-k)', '',
              '| objective | compute: k [95% CI] (R²) | data: k [95% CI] (R²) |', '|---|---|---|']
    for obj, fits in agg['scaling'].items():
        cells = [f"{f['k']:.3f} [{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}] ({f['r2']:.2f})" if f else 'n/a'
                 for f in (fits.get('compute'), fits.get('data'))]
        lines.append(f"| {obj} | {cells[0]} | {cells[1]} |")
    lines += ['', f"## H-LVLM with the LM frozen too (LLaVA's first stage alone; {preset['frozen_lm_seeds']} seed(s))", '',
              '| test metric | ntp | prior |', '|---|---|---|']
    for m in TABLE_METRICS:
        lines.append(f"| {m} | " + ' | '.join(fmt(agg['frozen_lm'][obj][m]) for obj in ('ntp', 'prior')) + ' |')
    return '\n'.join(lines) + '\n'


def write_report(preset, preset_name, runs, results_dir, data_seed, runtime=None):
    """Aggregate `runs` into results_dir: study.json, summary.md and the figures. Returns the summary."""
    agg = aggregate(preset, runs)
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, 'study.json'), 'w') as f:
        json.dump(agg, f, indent=1)
    if not agg['main']:
        return 'the sweep has not finished: no report yet\n'
    text = summary_text(agg, preset, preset_name, data_seed, runtime)
    drawn = ['curves', 'weak_spot'] + (['scaling'] if agg['scaling'].get('ntp') else [])
    text += '\n' + ''.join(f"![{name}]({name}.png)\n" for name in drawn)
    with open(os.path.join(results_dir, 'summary.md'), 'w') as f:
        f.write(text)
    figures.plot_curves(runs, agg, preset, os.path.join(results_dir, 'curves.png'))
    if 'scaling' in drawn:
        figures.plot_scaling(agg, os.path.join(results_dir, 'scaling.png'))
    figures.plot_weak_spot(agg, preset, os.path.join(results_dir, 'weak_spot.png'))
    return text
