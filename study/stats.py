"""
The study's statistics: paired comparisons over seeds (t-based intervals and p-values, Holm's
correction across a table), power-law fits with a bootstrap interval, sample efficiency. Pure numpy
and math; nothing here trains or reads files.
"""

import math

import numpy as np

N_BOOT = 1000                   # bootstrap draws for power_law_ci


def finite(values):
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], float)


def mean_std(values):
    """(mean, sample std, n) of the finite values."""
    v = finite(values)
    if len(v) == 0:
        return float('nan'), float('nan'), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def t_sf2(t, df):
    """Two-sided p-value of Student's t with df degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    if not math.isfinite(t):
        return 0.0
    return incomplete_beta(df / (df + t * t), df / 2, 0.5)


def incomplete_beta(x, a, b):
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (Lentz's method)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):                # the fraction converges fast on this side only
        return 1 - incomplete_beta(1 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)) / a
    tiny, c, d, f = 1e-300, 1.0, 0.0, 1.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + num * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1) < 1e-14:
            break
    return front * (f - 1)


def t_critical(df, level=0.95):
    """The two-sided critical value of Student's t (bisection on t_sf2)."""
    lo, hi = 0.0, 1e3
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_sf2(mid, df) > 1 - level else (lo, mid)
    return (lo + hi) / 2


def t_test(values, level=0.95):
    """One-sample t on paired differences: {mean, ci (t-based), t, p (two-sided), n}. With 5 seeds a
    percentile bootstrap interval is too narrow (it ignores that the spread is itself estimated)."""
    d = finite(values)
    n = len(d)
    if n < 2:
        return {'mean': float(d.mean()) if n else float('nan'), 'ci': (float('nan'), float('nan')),
                't': float('nan'), 'p': float('nan'), 'n': n}
    se = d.std(ddof=1) / math.sqrt(n)
    half = t_critical(n - 1, level) * se
    t = d.mean() / se if se > 0 else (0.0 if d.mean() == 0 else math.copysign(math.inf, d.mean()))
    return {'mean': float(d.mean()), 'ci': (float(d.mean() - half), float(d.mean() + half)), 't': float(t),
            'p': float(t_sf2(t, n - 1)), 'n': n}


def holm(p_values, alpha=0.05):
    """Holm's step-down correction for a family of tests: (adjusted p-values, which are significant).
    A test not yet run (p NaN, in a partial study) still counts in the family's size, which is fixed in
    advance, and stays NaN and not significant."""
    order = sorted(range(len(p_values)), key=lambda i: (math.isnan(p_values[i]), p_values[i]))
    adjusted, running = [float('nan')] * len(p_values), 0.0
    for rank, i in enumerate(order):
        if math.isnan(p_values[i]):
            break
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted, [a < alpha for a in adjusted]


def relative_change(new, base, higher_better):
    """Signed so that + is better; None where the base is 0 or undefined."""
    if new is None or base is None or not (math.isfinite(new) and math.isfinite(base)) or base == 0:
        return None
    return (new - base) / abs(base) * (1 if higher_better else -1)


def fit_power_law(x, y):
    """y ~ a * x^(-k) by least squares in log-log: (k, a, r2). Needs 2+ distinct x and y > 0."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    slope, icpt = np.polyfit(lx, ly, 1)
    ss = ((ly - ly.mean()) ** 2).sum()
    r2 = 1 - ((ly - (icpt + slope * lx)) ** 2).sum() / ss if ss > 0 else float('nan')
    return float(-slope), float(math.exp(icpt)), float(r2)


def power_law_ci(points, seed=0, level=0.95):
    """Bootstrap interval of the exponent k: points is {x: [y of each seed]}; each draw resamples
    the seeds at every x independently and refits."""
    xs = sorted(points)
    rng = np.random.default_rng(seed)
    ks = []
    for _ in range(N_BOOT):
        ys = [np.mean(np.asarray(points[x])[rng.integers(len(points[x]), size=len(points[x]))]) for x in xs]
        ks.append(fit_power_law(xs, ys)[0])
    lo, hi = np.quantile(ks, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def exponent_difference_ci(points_a, points_b, seed=0, level=0.95):
    """Bootstrap interval of k_b - k_a for two objectives measured on the same seeds: points_* is
    {x: {seed: y}}; each draw resamples the seeds at every x, the same ones for both (they are paired)."""
    xs = sorted(points_a)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(N_BOOT):
        draws = {x: [sorted(points_a[x])[i] for i in rng.integers(len(points_a[x]), size=len(points_a[x]))]
                 for x in xs}
        ka = fit_power_law(xs, [np.mean([points_a[x][s] for s in draws[x]]) for x in xs])[0]
        kb = fit_power_law(xs, [np.mean([points_b[x][s] for s in draws[x]]) for x in xs])[0]
        diffs.append(kb - ka)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def first_step_reaching(curve, target, higher_better=True):
    """The first step of a [(step, value)] curve whose value reaches target; None if none does."""
    for step, value in curve:
        if value is not None and math.isfinite(value) and (value >= target if higher_better else value <= target):
            return step
    return None
