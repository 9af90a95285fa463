"""study.py end to end on the tiny preset: every phase runs, the report is written, a rerun
resumes (skips every finished run). Checks the machinery, not who wins."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def run_study(tmp_path, *extra):
    cmd = [sys.executable, 'study.py', '--tiny', f'--results={tmp_path / "results"}', f'--out={tmp_path / "out"}',
           *extra]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def runs_by_name(res):
    return {r['name']: r for r in (json.loads(p.read_text()) for p in (res / 'runs').glob('*.json'))}


def test_study_tiny_end_to_end_and_resume(tmp_path):
    sys.path.insert(0, ROOT)
    from study import OBJECTIVES, PRESETS, REL_METRICS, run_name, spec
    preset = PRESETS['tiny']
    run_study(tmp_path)
    res = tmp_path / 'results'
    for name in ('results.md', 'summary.md', 'study.json', 'curves.png', 'scaling.png', 'ablations.png'):
        assert (res / name).stat().st_size > 0, name
    agg = json.loads((res / 'study.json').read_text())
    for st in ('u', 'h'):
        for obj in OBJECTIVES:
            main = agg['main'][f'{st}/{obj}']
            assert main['lr'] in preset['lrs'] and main['n_seeds'] == len(preset['seeds'])
            assert all(len(v) == 2 for v in main['metrics'].values())
        for obj in ('prior', 'prior_floor'):
            gain = agg['relative_gain'][f'{st}/{obj}']
            assert gain['n_pairs'] == len(preset['seeds']) and math.isfinite(gain['mean'])
            assert set(gain['metrics_included']) == set(REL_METRICS)
    assert 'oracle' in agg['ablations']['default']
    # the PMI variant (beyond the paper) goes through the same protocol on U, and is not PRIOR + floor
    pmi = agg['main']['u/prior_floor_pmi']
    assert pmi['n_seeds'] == len(preset['seeds']) and 'u/prior_floor_pmi' in agg['relative_gain']
    floor_run = runs_by_name(res)[agg['main']['u/prior_floor']['runs'][0]]
    pmi_run = runs_by_name(res)[run_name(spec('u', 'prior_floor_pmi', agg['main']['u/prior_floor']['lr'],
                                              preset['seeds'][0]))]
    assert pmi_run['pmi_beta'] and pmi_run['test']['loss'] != floor_run['test']['loss']
    assert sum(1 for row in agg['ablations'].values() if 'ntp' in row) == 6
    for obj in ('ntp', 'prior'):
        assert len(agg['scaling'][obj]['points']) == len(preset['sizes']) * len(preset['budgets'])
        assert math.isfinite(agg['scaling'][obj]['fit_loss_relevant']['exponent'])
    runs = runs_by_name(res)
    assert len(runs) == agg['n_runs']
    for r in runs.values():
        assert r['flops'] > 0 and r['test']['n_generated'] == preset['n_generate']
        if 'max_iters' not in r['spec']:                        # >= 8 val checkpoints per run
            assert len(r['curve']) >= 8
    # same seed => same initialisation whatever the objective (the step-0 val metrics agree)
    seed, lr = preset['seeds'][0], preset['lrs'][0]
    first = [runs[f"u_{obj}_lr{lr:g}_s{seed}".replace('.', 'p')]['curve'][0] for obj in OBJECTIVES]
    assert all(c == first[0] for c in first)
    # every number of the summary's table comes from the run files
    md = (res / 'results.md').read_text()
    assert '## Summary' in md and 'relative gain' in md
    # resumable: a second invocation finds every run done and only rebuilds the report
    again = run_study(tmp_path)
    assert ' to do' in again and all(line.endswith(', 0 to do') for line in again.splitlines() if ' to do' in line)
    # a results dir of another preset is refused
    out = subprocess.run([sys.executable, 'study.py', '--quick', f'--results={res}', f'--out={tmp_path / "o2"}'],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and 'tiny' in (out.stderr + out.stdout)
