"""The study end to end on the tiny preset: every phase runs (two runs at a time), the report is
written from the run JSONs, a rerun resumes (skips every finished run). Checks the machinery,
not who wins."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest

from runs.errors import ConfigError
from sources.captions import split_of
from study import stats
from study import plan
from study.flickr import noisy_dataset
from study.noise_echo import strip_noise
from study.photo_debias import FLOORS
from study.plan import PRESETS, SETTINGS, run_name, spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_study(tmp_path, *extra):
    cmd = [sys.executable, '-m', 'study', '--preset=tiny', '--jobs=2', f'--results={tmp_path / "results"}',
           f'--out={tmp_path / "out"}', *extra]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_study_tiny_end_to_end_and_resume(tmp_path):
    preset = PRESETS['tiny']
    text = run_study(tmp_path)
    res = tmp_path / 'results'
    runs = {r['name']: r for r in (json.loads(p.read_text()) for p in (res / 'runs').glob('*.json'))}
    agg = json.loads((res / 'study.json').read_text())
    for st in SETTINGS:
        for obj in preset['objectives']:
            lr = agg['best_lr'][f'{st}/{obj}']
            tried = sorted(float(x) for x in agg['sweep'][f'{st}/{obj}'])
            assert tried[0] < lr < tried[-1]                     # never at the edge of its sweep
            for sd in preset['seeds']:                          # every seed, clean and (NTP, PRIOR) noisy captions
                assert run_name(spec(st, obj, lr, sd)) in runs
                if obj in preset['noisy_objectives']:
                    noisy = runs[run_name(spec(st, obj, lr, sd, caption_noise=preset['caption_noise']))]
                    assert noisy['config']['caption_noise'] == preset['caption_noise']
    c = agg['comparisons']['u/clean/prior']
    assert c['relative_gain']['n'] == len(preset['seeds']) and c['seeds'] == preset['seeds']
    assert set(agg['scaling']['ntp']) == {'compute', 'data'} and math.isfinite(agg['scaling']['prior']['compute']['k'])
    assert len(agg['scaling']['ntp']['compute']['points']) == len(preset['compute_fractions']) + 1
    assert set(agg['class_weights']['u/clean/prior']) == {'relevant', 'filler', 'noise'}
    assert math.isfinite(agg['class_weights']['u/clean/gain']['relevant'])   # the gain weights, from the trained model
    label = agg['class_weights']['h/clean/label']                          # the ceiling: relevant tokens x2
    assert 1.6 < label['relevant'] / label['filler'] < 2.4 and label['noise'] == pytest.approx(label['filler'], rel=0.2)
    assert 'vs NTP**' in text and '**gain vs NTP**' in text
    h_frozen = runs[run_name(spec('h', 'ntp', agg['best_lr']['h/ntp'], preset['seeds'][0], freeze_lm=True))]
    assert h_frozen['n_trained'] < runs[run_name(spec('h', 'ntp', agg['best_lr']['h/ntp'], preset['seeds'][0]))]['n_trained']
    for name in ('summary.md', 'curves.png', 'scaling.png', 'weak_spot.png'):
        assert (res / name).stat().st_size > 0
    assert '## Main comparison' in text and 'relative gain' in text
    assert '| U, clean | prior | ' in text and '| H, noisy | prior | ' in text      # the headline table, a row each
    assert 'ntp 0.' in text.split('Final val attr_acc')[1].split('\n')[0]
    assert all(len(r['commit']) == 40 for r in runs.values())   # the code each run started with
    weights = subprocess.run([sys.executable, '-m', 'study.token_weights', '--preset=tiny', f'--results={res}',
                              '--objectives=label,gain'], cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert weights.returncode == 0, weights.stderr[-3000:]
    table = (res / 'token_weights.md').read_text()
    for split in ('train', 'val'):                              # post hoc, on captions trained on and not
        assert f'| U, clean | gain | {split} |' in table and f'| H, clean | label | {split} |' in table
    val = next(line for line in table.splitlines() if line.startswith('| U, clean | label | val |')).split(' | ')
    assert 1.6 < float(val[3].split()[0]) / float(val[4].split()[0]) < 2.4      # relevant vs filler: the ceiling's 2:1
    again = run_study(tmp_path)                                 # resumes: nothing left to do
    assert ' to do' in again and all(line.endswith(' 0 to do') for line in again.splitlines() if ' to do' in line)
    other = subprocess.run([sys.executable, '-m', 'study', '--preset=tiny', '--data_seed=77', f'--results={res}',
                            f'--out={tmp_path / "out"}'], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert other.returncode != 0 and 'data_seed=1234 (here 77)' in other.stderr    # never mixes two data sets
    assert len(other.stderr.strip().splitlines()) == 1


def test_code_state_names_the_commit_and_each_changed_file(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *args], cwd=tmp_path, check=True,
                       capture_output=True)
    git('init', '-q')
    for name in ('a.py', 'b.py'):
        (tmp_path / name).write_text('x = 1\n')
    git('add', '.')
    git('commit', '-qm', 'first')
    (tmp_path / 'a.py').write_text('x = 2\n')                  # changed, not staged: the line starts with a space
    (tmp_path / 'new.py').write_text('y = 1\n')                # untracked: not the code that ran
    monkeypatch.setattr(plan, 'ROOT', str(tmp_path))
    commit, changed = plan.code_state()
    assert len(commit) == 40 and changed == ['a.py']


def test_flickr_summary_of_another_comparison_has_its_own_file():
    from study.flickr import summary_path
    assert summary_path('R', ['ntp', 'prior']) == os.path.join('R', 'summary.md')
    assert summary_path('R', ['ntp', 'gain']) == os.path.join('R', 'summary_ntp-gain.md')
    assert summary_path('R', ['ntp', 'prior_gain']) != summary_path('R', ['ntp', 'prior', 'gain'])


def test_paired_statistics():
    assert stats.t_test([0.1, 0.12, 0.09, 0.11, 0.1])['p'] < 1e-4
    assert stats.t_test([0.1, -0.1, 0.05, -0.06])['p'] > 0.5
    test = stats.t_test([-2.6, -3.8, -3.6, -7.2, -6.5])              # Student's t, df 4: 2.776
    assert test['ci'] == pytest.approx((-7.216, -2.264), abs=1e-3) and test['p'] == pytest.approx(0.00603, abs=1e-4)
    assert stats.t_critical(1) == pytest.approx(12.706, abs=1e-3) and stats.t_critical(30) == pytest.approx(2.042, abs=1e-3)
    assert stats.t_sf2(1.95996, 10 ** 6) == pytest.approx(0.05, abs=1e-5) and stats.t_sf2(0.0, 3) == 1.0
    adjusted, survives = stats.holm([0.01, 0.04, 0.03, 0.2])
    assert adjusted == pytest.approx([0.04, 0.09, 0.09, 0.2]) and survives == [True, False, False, False]
    adjusted, survives = stats.holm([float('nan'), 0.01, 0.04, float('nan')])   # a partial study: 4 in the family
    assert math.isnan(adjusted[0]) and math.isnan(adjusted[3]) and adjusted[1:3] == pytest.approx([0.04, 0.12])
    assert survives == [False, True, False, False]
    k, a, r2 = stats.fit_power_law([1, 10, 100], [1.0, 0.5, 0.25])
    assert k == pytest.approx(math.log10(2)) and r2 == pytest.approx(1.0)
    assert stats.first_step_reaching([(0, 0.2), (5, 0.6), (10, 0.9)], 0.5) == 5
    assert stats.first_step_reaching([(0, 0.2)], 0.5) is None
    assert stats.relative_change(0.9, 0.8, True) == pytest.approx(0.125) and stats.relative_change(1, 0, True) is None


def test_two_recipes_test_runs_are_paired_by_seed(tmp_path, capsys):
    from study.recipe import TEST_KEYS, test_report
    for seed, (a, b) in {1: (0.10, 0.13), 2: (0.20, 0.21), 3: (0.30, 0.32), 7: (0.5, None)}.items():
        (tmp_path / f'a_seed{seed}.json').write_text(json.dumps({'test': {k: a for k in TEST_KEYS}}))
        if b is not None:                                           # (an eval_test.json: the metrics themselves)
            (tmp_path / f'b_seed{seed}_beam3.json').write_text(json.dumps({k: b for k in TEST_KEYS}))
    test_report([str(tmp_path / 'a_*.json'), str(tmp_path / 'b_*.json')])
    out = capsys.readouterr().out
    assert 'seeds [1, 2, 3] (paired)' in out                       # seed 7 has no partner
    row = next(line for line in out.splitlines() if line.startswith('| cider |'))
    d = stats.t_test([0.03, 0.01, 0.02])
    assert f"| 0.200 ± 0.100 | 0.220 ± 0.095 | +0.020 [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] | {d['p']:.3f} |" in row
    with pytest.raises(ConfigError, match='no records'):
        test_report([str(tmp_path / 'a_*.json'), str(tmp_path / 'c_*.json')])
    (tmp_path / 'd_seed9.json').write_text(json.dumps({'bleu4': 0.1}))
    with pytest.raises(ConfigError, match=r'd_seed9.json has no bleu1'):
        test_report([str(tmp_path / 'a_*.json'), str(tmp_path / 'd_*.json')])
    (tmp_path / 'd_seed9.json').write_text(json.dumps({k: 0.1 for k in TEST_KEYS}))
    with pytest.raises(ConfigError, match='no seed has a record in both'):
        test_report([str(tmp_path / 'a_*.json'), str(tmp_path / 'd_*.json')])


def test_noisy_captions_keep_the_recipes_image_folder(tmp_path):
    """The noisy copy of a captions.csv named by path, with its images elsewhere, points at those images
    and keeps every row; a dataset that is not a CSV gets one line naming it."""
    from test_captions import make_folder
    data = make_folder(tmp_path, n_images=6)
    config = tmp_path / 'csv_path.py'
    config.write_text(f"dataset = {str(data / 'captions.csv')!r}\nimage_root = {str(data / 'images')!r}\n")
    folder, images = noisy_dataset(str(config), str(tmp_path / 'out'))
    assert images == str(data / 'images')
    assert len(list(csv.DictReader(open(os.path.join(folder, 'captions.csv'))))) == 12
    jsonl = make_folder(tmp_path / 'j', n_images=2, fmt='jsonl')
    config.write_text(f"dataset = {str(jsonl)!r}\n")
    with pytest.raises(ConfigError, match='captions.csv'):
        noisy_dataset(str(config), str(tmp_path / 'out2'))


def test_noise_is_cut_from_captions_and_nothing_else():
    assert strip_noise('Stock photo: A dog runs . Photo by Ana Silva.') == 'A dog runs .'
    assert strip_noise('Image of a man on a bench .') == 'a man on a bench .'
    assert strip_noise('A photo of a dog by the sea .') == 'A photo of a dog by the sea .'    # no noise to cut


@pytest.mark.slow
def test_flickr_comparison_runs_pairs_and_resumes(tmp_path):
    """study.flickr on a tiny photo folder with the pretrained EfficientNet-Lite0: every (condition, loss,
    seed) runs, the table pairs them, the noisy condition's captions carry noise on the training split
    only, PRIOR's weights per noise kind are reported, and a rerun trains nothing."""
    from test_captions import make_folder
    data = make_folder(tmp_path, n_images=60)
    config = tmp_path / 'tiny_photos.py'
    config.write_text(f"dataset = {str(data)!r}\nimage_size = 32\narch = 'h'\nvision = 'efficientnet_lite0'\n"
                      "init_vision = 'pretrained'\nfreeze_vision = True\nn_layer = 1\nn_head = 2\nn_embd = 16\n"
                      "ref_max_iters = 4\nbatch_size = 8\nmax_iters = 4\nwarmup_iters = 1\neval_interval = 2\n"
                      "eval_batches = 1\nval_frac = 0.25\ntest_frac = 0.25\ndevice = 'cpu'\n")
    cmd = [sys.executable, '-m', 'study.flickr', f'--config={config}', '--seeds=1,2', '--jobs=2', '--conditions=full,noisy',
           f'--results={tmp_path / "results"}', f'--out={tmp_path / "out"}']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / 'results' / 'runs').glob('*.json'))
    assert runs == [f'{c}_{loss}_seed{s}.json' for c in ('full', 'noisy') for loss in ('ntp', 'prior') for s in (1, 2)]
    table = (tmp_path / 'results' / 'summary.md').read_text()
    for metric in ('retrieval_r1', 'retrieval_ratio_r1', 'loss_top_weight', 'bleu4', 'cider', 'distinct'):
        assert f'| {metric}' in table
    assert 'Holm' in table and "PRIOR's mean training weight" in table and 'attribution name' in table
    assert 'name: word starts' in table and 'name: word rest' in table
    noisy = list(csv.DictReader(open(tmp_path / 'out' / 'noisy_data' / 'captions.csv')))
    clean = list(csv.DictReader(open(data / 'captions.csv')))
    changed = [a['image'] for a, b in zip(noisy, clean) if a['caption'] != b['caption']]
    assert changed and all(split_of(im, 0.25, 0.25) == 'train' for im in changed)
    assert all(b['caption'] in a['caption'] for a, b in zip(noisy, clean))
    record = json.loads((tmp_path / 'results' / 'runs' / 'full_ntp_seed1.json').read_text())
    assert math.isfinite(record['test']['loss_top_weight'])      # an NTP run is scored on the reference's tokens too
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and 'seed1:' not in again.stdout and '| retrieval_r1' in again.stdout
    assert len(record['commit']) == 40 and isinstance(record['uncommitted'], list)   # the code as it started
    (tmp_path / 'results' / 'runs' / 'noisy_prior_seed2.json').unlink()          # as if interrupted before it
    report = subprocess.run(cmd + ['--report=True'], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert report.returncode == 0, report.stderr[-2000:]
    assert '## full (seed 1, seed 2)' in report.stdout and '## noisy (seed 1)' in report.stdout
    assert 'Not counted: seed 2' in report.stdout                # NTP's seed 2 has no partner: out of every column
    assert not (tmp_path / 'results' / 'runs' / 'noisy_prior_seed2.json').exists()          # nothing was run
    assert 'all 9 tests' in report.stdout                      # Holm over the full condition's pairs only
    config.write_text(config.read_text() + "max_iters = 5\n")    # another recipe: its old results are not reused
    changed = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert changed.returncode != 0 and 'move it away' in changed.stderr and 'Traceback' not in changed.stderr
    empty = subprocess.run(cmd + ['--report=True', f'--results={tmp_path / "none"}'], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600, env=env)
    assert empty.returncode != 0 and 'no finished run' in empty.stderr and 'Traceback' not in empty.stderr
    echo = subprocess.run([sys.executable, '-m', 'study.noise_echo', '--seeds=1,2', f'--out={tmp_path / "out"}',
                           f'--results={tmp_path / "results"}'], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=env)
    assert echo.returncode == 0, echo.stderr[-2000:]
    shares = json.loads((tmp_path / 'results' / 'noise_echo' / 'noisy_prior_seed1.json').read_text())
    assert 0 <= shares['attribution'] <= 1 and 0 <= shares['boilerplate'] <= 1 and len(shares['examples']) == 3
    noisy_eval = json.loads((tmp_path / 'results' / 'runs' / 'noisy_ntp_seed1.json').read_text())['test']
    ntp = json.loads((tmp_path / 'results' / 'noise_echo' / 'noisy_ntp_seed1.json').read_text())
    assert ntp['bleu4'] == pytest.approx(noisy_eval['bleu4'], abs=1e-9)     # the run's own captions, again
    assert '| attribution |' in (tmp_path / 'results' / 'noise_echo.md').read_text()
    debias_cmd = [sys.executable, '-m', 'study.photo_debias', '--seeds=1,2', f'--out={tmp_path / "out"}',
                  f'--results={tmp_path / "results"}']
    debias = subprocess.run(debias_cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert debias.returncode == 0, debias.stderr[-2000:]
    table = (tmp_path / 'results' / 'debias.md').read_text()
    assert '## noisy (seeds 1;' in table and '## full (seeds 1, 2;' in table and '| attribution |' in table
    assert 'Holm across all 18 tests' in table       # 2 arms x 4 metrics (full), x 5 with the attribution (noisy)
    evals = tmp_path / 'results' / 'debias'
    val = {f: json.loads((evals / f'full_prior_seed{s}_val_floor{f}.json').read_text())['cider']
           for f in FLOORS for s in (1, 2)}
    chosen = float(table.split('## full')[1].split('Floor chosen on val: ')[1].split(' ')[0])
    means = {f: sum(json.loads((evals / f'full_prior_seed{s}_val_floor{f}.json').read_text())['cider']
                    for s in (1, 2)) / 2 for f in FLOORS}
    assert val and means[chosen] == max(means.values())             # chosen on val, never on test
    plain = json.loads((evals / 'full_prior_seed1_test.json').read_text())
    own = json.loads((tmp_path / 'results' / 'runs' / 'full_prior_seed1.json').read_text())['test']
    assert plain['bleu4'] == pytest.approx(own['bleu4'], abs=1e-9) and plain['loss'] == pytest.approx(own['loss'])
    debiased = json.loads((evals / f'full_prior_seed1_test_floor{chosen}.json').read_text())
    assert debiased['floor'] == chosen and debiased['loss'] != pytest.approx(plain['loss'])   # the corrected model
    again = subprocess.run(debias_cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and '.json:' not in again.stdout                # every evaluation reused
    margin = subprocess.run([sys.executable, '-m', 'study.retrieval_margin',
                             f'--ckpt={tmp_path}/out/full_ntp_seed1/ckpt.pt', '--split=test'],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert margin.returncode == 0, margin.stderr[-2000:]
    r1 = float(margin.stdout.split('R@1 ')[1].split(';')[0])   # the same candidates as eval's retrieval
    assert math.isfinite(record['test']['retrieval_r1']) and r1 == pytest.approx(record['test']['retrieval_r1'], abs=1e-3)


def test_a_resumed_flickr_runs_wall_time_is_the_sum_of_its_parts(tmp_path, monkeypatch):
    """A run stopped (a failed part), stopped again with the study itself killed (no end recorded), then
    finished: its record's wall_s is the total and wall_parts_s each part, not its last part alone."""
    import time
    from study import flickr
    config = tmp_path / 'c.py'
    config.write_text('max_iters = 5\n')
    out_root, runs_dir = tmp_path / 'out', tmp_path / 'runs'
    name = flickr.run_name('full', 'ntp', 1)
    parts = iter([(0.3, 1, False), (0.2, None, True), (0.1, 0, True)])      # (seconds, exit status, resumed)

    def fake_train(cmd, stdout, **kw):
        seconds, status, resumed = next(parts)
        assert ('--resume=True' in cmd) == resumed
        os.makedirs(out_root / name, exist_ok=True)
        open(out_root / name / 'ckpt.pt', 'w').close()
        time.sleep(seconds)
        stdout.write('step\n')
        stdout.flush()
        if status is None:
            raise KeyboardInterrupt                 # the study killed mid-part: its end is the log's last write
        if status == 0:
            (out_root / name / 'eval_test.json').write_text(json.dumps(dict.fromkeys(flickr.METRICS, 0.5)))
        return subprocess.CompletedProcess(cmd, status)
    monkeypatch.setattr(flickr.subprocess, 'run', fake_train)
    monkeypatch.setattr(flickr, 'code_state', lambda: ('0' * 40, False))
    args = (str(config), 'full', 'ntp', 1, str(out_root), str(runs_dir), 1, [])
    with pytest.raises(ConfigError, match='failed'):
        flickr.run(*args)
    with pytest.raises(KeyboardInterrupt):
        flickr.run(*args)
    parts_file = out_root / f'{name}.parts.json'
    record = json.loads(parts_file.read_text())
    record[-1][1] = None                            # as a SIGKILL of the study would leave it
    parts_file.write_text(json.dumps(record))
    record = flickr.run(*args)
    assert len(record['wall_parts_s']) == 3 and record['wall_s'] == pytest.approx(sum(record['wall_parts_s']), abs=0.2)
    assert record['wall_parts_s'][0] >= 0.3 and record['wall_parts_s'][1] >= 0.2 and record['wall_s'] >= 0.6
