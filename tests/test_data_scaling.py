"""The data-scaling phase (study.data_scaling, study.scaling_report): the fit recovers exponents set by
hand and their paired difference; the flickr rungs nest and keep val and test; a tiny shapes ladder
runs end to end, records what the fits need, and resumes."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sources.captions import split_of
from study import scaling_report
from study.data_scaling import photo_subset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record(objective, seed, n, error, debiased=None):
    r = dict(ladder='shapes', setting='u', objective=objective, seed=seed, n_train=n, best_step=10, last_step=20,
             capped=False, wall_s=1.0, commit='0' * 40, command='train.py configs/shapes_u.py --stop_on=attr_acc',
             test={'attr_acc': 1 - error, 'loss_relevant': 2 * error})
    if debiased is not None:
        r['test_debias'] = {'attr_acc': 1 - debiased, 'loss_relevant': 2 * debiased}
    return r


def test_the_fit_recovers_exponents_set_by_hand_and_their_paired_difference(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for seed in (1, 2, 3):
        for n in (1000, 2000, 4000, 8000, 16000):
            luck = np.exp(rng.normal(0, 0.05))                     # the seed's, shared by the pair
            own = np.exp(rng.normal(0, 0.01, size=3))              # each arm's
            records += [record('ntp', seed, n, 3.0 * n ** -0.3 * luck * own[0]),
                        record('prior', seed, n, 5.0 * n ** -0.4 * luck * own[1],
                               debiased=4.0 * n ** -0.35 * luck * own[2])]
    text = scaling_report.write(records, str(tmp_path))
    row = {line.split(' | ')[1]: line.split(' | ') for line in text.splitlines() if line.startswith('| 1 - attr_acc |')}
    assert float(row['ntp'][2].split()[0]) == pytest.approx(0.3, abs=0.02)
    assert float(row['prior'][2].split()[0]) == pytest.approx(0.4, abs=0.02)
    assert float(row['prior + debias'][2].split()[0]) == pytest.approx(0.35, abs=0.02)
    diff, lo, hi = (float(x.strip('[],')) for x in row['prior'][4].split()[:3])
    assert diff == pytest.approx(0.1, abs=0.01) and lo < 0.1 < hi and hi - lo < 0.04    # paired: narrower than b's own
    assert (tmp_path / 'summary.md').read_text() == text and (tmp_path / 'shapes.png').stat().st_size > 0
    assert '| 1,000 | prior + debias | 3 |' in text              # the points, per size and arm
    assert 'stopping metric (shapes: attr_acc)' in text          # read from the runs' commands


def test_a_perfect_error_is_not_fitted():
    pts = {'ntp': {100: {1: 0.1, 2: 0.1}, 200: {1: 0.0, 2: 0.0}}}
    assert scaling_report.fit(pts['ntp']) is None and scaling_report.exponent(pts['ntp']) is None


def test_photo_rungs_nest_and_keep_every_val_and_test_row(tmp_path):
    from test_captions import make_folder
    data = make_folder(tmp_path, n_images=40)
    config = tmp_path / 'photos.py'
    config.write_text(f"dataset = {str(data)!r}\nval_frac = 0.25\ntest_frac = 0.25\n")
    source = list(csv.DictReader(open(data / 'captions.csv')))
    rungs = {}
    for fraction in (0.25, 0.5, 1.0):
        folder, images = photo_subset(str(config), str(tmp_path / 'out'), fraction)
        assert images == str(data / 'images') or os.path.samefile(images, data / 'images')
        rungs[fraction] = list(csv.DictReader(open(os.path.join(folder, 'captions.csv'))))
    train = {f: {r['image'] for r in rows if split_of(r['image'], 0.25, 0.25) == 'train'} for f, rows in rungs.items()}
    everything = {r['image'] for r in source if split_of(r['image'], 0.25, 0.25) == 'train'}
    assert train[0.25] < train[0.5] < train[1.0] == everything
    assert len(train[0.5]) == round(0.5 * len(everything))
    held_out = [(r['image'], r['caption']) for r in source if split_of(r['image'], 0.25, 0.25) != 'train']
    for rows in rungs.values():
        assert [(r['image'], r['caption']) for r in rows if split_of(r['image'], 0.25, 0.25) != 'train'] == held_out
    assert [(r['image'], r['caption']) for r in rungs[1.0]] == [(r['image'], r['caption']) for r in source]


@pytest.mark.slow
def test_a_tiny_shapes_ladder_runs_records_and_resumes(tmp_path):
    cmd = [sys.executable, '-m', 'study.data_scaling', '--preset=tiny', '--ladders=shapes', '--seeds=1,2',
           f'--results={tmp_path / "results"}', f'--out={tmp_path / "out"}']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in sorted((tmp_path / 'results' / 'runs').glob('*.json'))]
    assert len(runs) == 8 and {(r['objective'], r['n_train'], r['seed']) for r in runs} == {
        (o, n, s) for o in ('ntp', 'prior') for n in (64, 128) for s in (1, 2)}
    for r in runs:
        assert r['best_step'] <= r['last_step'] <= 8 and isinstance(r['capped'], bool) and len(r['commit']) == 40
        assert 0 <= r['test']['attr_acc'] <= 1 and ('test_debias' in r) == (r['objective'] == 'prior')
        assert (tmp_path / 'out' / r['name'] / 'best.pt').is_file()
    summary = (tmp_path / 'results' / 'summary.md').read_text()
    assert '## shapes, u (8 runs;' in summary and '| 1 - attr_acc | prior + debias |' in summary
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and again.stdout.startswith('# Data scaling')      # nothing re-run: the report alone
    record = tmp_path / 'results' / 'runs' / f"{runs[0]['name']}.json"
    record.write_text(json.dumps({**runs[0], 'config_sha256': '0' * 64}))         # as if the preset was edited since
    edited = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert edited.returncode == 2 and edited.stderr.count('\n') == 1, edited.stderr
    assert f"{record} was made by" in edited.stderr and 'with another configs/shapes_u.py' in edited.stderr
