"""Behaving like a known tool: --help, one-line errors, progress, resume rules, portable checkpoints,
eval's own file, plots, wandb, precision, and the GPU paths that can be checked on a CPU."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import runs.devices as device_mod
from runs.errors import ConfigError
from runs.files import load_checkpoint
from runs.optim import lr_at
from runs.progress import Progress, hms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})


def train_quiet(cfg):
    from train import train
    lines = []
    return train(cfg, log=lines.append), lines


# ---- the command line ----

@pytest.mark.slow
@pytest.mark.parametrize('script, shows', [('train.py', 'max_iters: int'), ('eval.py', '--ckpt='),
                                           ('bench.py', '--bench_iters'), ('reference.py', 'ref_max_iters'),
                                           ('encoder.py', 'enc_max_iters'), ('-m runs.plots', 'side by side')])
def test_every_entry_point_has_help(script, shows):
    out = run(script.split() + ['--help'])
    assert out.returncode == 0 and shows in out.stdout and out.stderr == ''


@pytest.mark.slow
@pytest.mark.parametrize('args, says', [(['train.py', '--max_iter=5'], "did you mean --max_iters"),
                                        (['eval.py', '--chkpt=x'], "did you mean --ckpt"),
                                        (['bench.py', '--arch=cnn'], "'arch' must be one of"),
                                        (['train.py', '--precision=fp8'], "precision 'fp8'"),
                                        (['eval.py', '--ckpt=/nowhere/ckpt.pt'], "no checkpoint at /nowhere"),
                                        (['-m', 'runs.plots'], "name at least one run folder")])
def test_settings_mistakes_end_in_one_line(args, says):
    out = run(args)
    assert out.returncode == 2 and out.stdout == ''
    assert out.stderr.count('\n') == 1 and out.stderr.startswith('error: ') and says in out.stderr, out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the error a machine without a GPU gives')
def test_absent_device_is_refused_before_any_work(tiny_cfg):
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        device_mod.resolve_device('cuda')
    with pytest.raises(ConfigError, match="not one of"):
        device_mod.resolve_device('tpu')
    with pytest.raises(ConfigError, match="no CUDA GPU"):       # before data, reference or out_dir
        train_quiet(dataclasses.replace(tiny_cfg, device='cuda:0'))
    assert not os.path.exists(tiny_cfg.out_dir) and not os.path.exists(tiny_cfg.ref_ckpt)


# ---- progress, timing, MFU ----

def test_progress_line_counts_and_estimates(monkeypatch):
    now = [100.0]
    monkeypatch.setattr('runs.progress.time.time', lambda: now[0])
    p = Progress(100, every=5.0, done=20)                  # a resumed run: 20 done before
    now[0] += 8.0
    assert p.line(40) == "40/100, 8.0s elapsed, ETA 24.0s"   # 20 steps in 8 s, 60 to go
    assert p.due() and not p.due()
    assert Progress(None).line(7).startswith("7, ")
    assert hms(3.25) == '3.2s' and hms(245) == '4m05s' and hms(3725) == '1h02m'


def test_cpu_mfu_never_above_100_percent():
    measured = device_mod.device_peak_flops('cpu')
    assert device_mod.device_peak_flops('cpu', observed=measured * 3) == measured * 3   # the peak rises
    assert device_mod.device_peak_flops('cpu') == measured * 3                          # and stays


@pytest.mark.slow
def test_training_logs_progress_memory_and_wall_time(tiny_cfg):
    _, lines = train_quiet(dataclasses.replace(tiny_cfg, log_interval=3))
    iters = [line for line in lines if line.startswith('iter ')]
    assert iters[0].startswith('iter 3/6, ') and 'ETA' in iters[0] and 'peak mem' in iters[0]
    assert any(line.startswith('reference iter 20/20, ') for line in lines)
    assert lines[-1].startswith('wall time ')
    rows = [json.loads(line) for line in open(os.path.join(tiny_cfg.out_dir, 'log.jsonl'))]
    assert all(0 < r['mfu'] <= 1 and r['peak_mem_mib'] > 0 for r in rows if 'mfu' in r)


def test_data_check_speaks_only_when_slow(tmp_path, monkeypatch):
    from test_captions import make_folder
    folder = make_folder(tmp_path, n_images=4)
    logs = []
    from sources.captions import read_records
    read_records(str(folder), log=logs.append)
    assert not any('checking' in line for line in logs)     # a small dataset: no progress lines
    monkeypatch.setattr('runs.progress.Progress.due', lambda self: True)
    logs.clear()
    read_records(str(folder), log=logs.append)
    assert any(f'checking {folder}: ' in line for line in logs)


# ---- resume ----

def test_lr_after_the_planned_end_stays_at_the_minimum():
    assert lr_at(99, 1.0, 10, 100, 0.1) > 0.1
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1) == lr_at(150, 1.0, 10, 100, 0.1)


@pytest.mark.slow
def test_resume_extends_a_moved_run_and_refuses_what_changes_the_result(tiny_cfg, tmp_path):
    first = dataclasses.replace(tiny_cfg, final_eval=False)
    train_quiet(first)
    moved = str(tmp_path / 'moved')
    shutil.move(first.out_dir, moved)
    longer = dataclasses.replace(first, out_dir=moved, resume=True, max_iters=9, log_interval=2, eval_interval=9,
                                 ckpt_interval=0, compile=False, num_workers=0)
    _, lines = train_quiet(longer)
    assert any('resumed from' in line and 'max_iters 6 -> 9' in line for line in lines)
    rows = [json.loads(line) for line in open(os.path.join(moved, 'log.jsonl'))]
    lrs = {r['step']: r['lr'] for r in rows if 'lr' in r}
    min_lr = first.learning_rate * first.min_lr_ratio
    assert lrs[8] == pytest.approx(min_lr)                  # the cosine ended at step 6, as first planned
    ckpt = load_checkpoint(os.path.join(moved, 'ckpt.pt'))
    assert ckpt['step'] == 9 and ckpt['config']['lr_decay_iters'] == 6
    walls = [r for r in rows if 'wall_s' in r]                  # the total and each part's, not the last part's
    assert [len(r['wall_parts_s']) for r in walls] == [1, 2] and walls[1]['wall_s'] == sum(walls[1]['wall_parts_s'])
    assert 0 < walls[1]['wall_parts_s'][0] <= walls[0]['wall_s'] and ' over 2 parts (' in lines[-1]
    with pytest.raises(ConfigError, match=r"would change the result: alpha 1.0 -> 2.0, learning_rate 0.004 -> 0.001 "):
        train_quiet(dataclasses.replace(longer, learning_rate=1e-3, alpha=2.0))
    with pytest.raises(ConfigError, match="no checkpoint"):
        train_quiet(dataclasses.replace(longer, out_dir=str(tmp_path / 'empty')))


def trained_on_a_folder(tiny_cfg, tmp_path):
    """(folder, cfg) of a short NTP run on a 40-image caption folder, trained."""
    from test_captions import make_folder
    folder = make_folder(tmp_path, n_images=40)
    cfg = dataclasses.replace(tiny_cfg, dataset=str(folder), image_size=16, val_frac=0.25, test_frac=0.25,
                              block_size=24, final_eval=False, loss='ntp', init_lm='scratch')
    train_quiet(cfg)
    return folder, cfg


@pytest.mark.slow
def test_resume_refuses_changed_training_data(tiny_cfg, tmp_path):
    folder, cfg = trained_on_a_folder(tiny_cfg, tmp_path)
    text = (folder / 'captions.csv').read_text().splitlines()
    row = next(i for i, line in enumerate(text[1:], 1) if ' dog ' in line)    # one word of one caption
    text[row] = text[row].replace(' dog ', ' cat ', 1)
    (folder / 'captions.csv').write_text('\n'.join(text))
    with pytest.raises(ConfigError, match=r"the training captions \(token rows\) differ"):
        train_quiet(dataclasses.replace(cfg, resume=True, max_iters=8))


@pytest.mark.slow
def test_a_refused_resume_names_the_changed_images_of_every_split(tiny_cfg, tmp_path):
    from data import load_splits
    from test_captions import write_image
    folder, cfg = trained_on_a_folder(tiny_cfg, tmp_path)
    splits = load_splits(cfg, log=lambda *a: None)
    paths = {name: sorted(set(split.images.paths)) for name, split in splits.items()}
    again = dataclasses.replace(cfg, resume=True, max_iters=8)
    for split, n in (('train', 5), ('val', 1), ('test', 1)):
        saved = {p: open(p, 'rb').read() for p in paths[split][:n]}
        for k, path in enumerate(saved):
            write_image(path, 1000 + k)                            # other pixels, still a good JPEG
        with pytest.raises(ConfigError) as e:
            train_quiet(again)
        what = 'training images' if split == 'train' else 'val or test images'
        assert what in str(e.value) and '\n' not in str(e.value), str(e.value)
        named = [p for p in saved if p in str(e.value)]
        assert len(named) == min(n, 3) and (n <= 3 or f'and {n - 3} more' in str(e.value)), str(e.value)
        for path, content in saved.items():
            open(path, 'wb').write(content)
    _, lines = train_quiet(again)                                  # restored: it resumes
    assert any('resumed from' in line for line in lines)


# ---- checkpoints and eval ----

@pytest.mark.slow
def test_eval_works_from_anywhere_in_its_own_file(tiny_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, ref_ckpt='', out_dir='run')      # paths relative to where train ran
    work = tmp_path / 'work'
    work.mkdir()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        train_quiet(cfg)
    finally:
        os.chdir(cwd)
    before = (work / 'run' / 'eval_test.json').read_text()
    shutil.move(str(work / 'run'), str(tmp_path / 'moved'))
    shutil.rmtree(work)                                  # the reference folder is gone too
    ckpt = tmp_path / 'moved' / 'ckpt.pt'
    fig = tmp_path / 'fig.png'
    out = run([os.path.join(ROOT, 'eval.py'), f'--ckpt={ckpt}', '--split=test', '--n_generate=8',
               f'--figure={fig}'], cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    mine = json.load(open(tmp_path / 'moved' / 'eval_test_step6.json'))
    assert (tmp_path / 'moved' / 'eval_test.json').read_text() == before          # train's own, untouched
    assert mine['n_generated'] == 8 and fig.stat().st_size > 0


def test_eval_loads_no_optimiser_state(tiny_cfg, tmp_path):
    from eval import load_trained
    from train import train
    train(dataclasses.replace(tiny_cfg, final_eval=False, loss='ntp', init_lm='scratch'), log=lambda *a: None)
    model, _, cfg, ckpt = load_trained(os.path.join(tiny_cfg.out_dir, 'ckpt.pt'), 'cpu')
    assert 'optimizer' not in ckpt and cfg.precision == 'auto' and not model.training


# ---- plots ----

def test_plots_skip_empty_panels_and_compare_runs(tmp_path, monkeypatch):
    import runs.plots as plot
    nan = float('nan')
    for name, shift in (('a', 0.0), ('b', 0.5)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        rows = [{'step': s, 'train_loss': 3 - s / 10 + shift} for s in (1, 2, 3)] + \
               [{'step': s, 'val_loss': 3 - s / 10 + shift, 'val_loss_relevant': nan, 'val_attr_acc': nan}
                for s in (0, 3)]                             # real data: no token classes
        (run_dir / 'log.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
        (run_dir / 'eval_test.json').write_text(json.dumps({'loss': 2.0 + shift, 'n_captions': 5}))
    panels = []
    real_subplots = plot.plt.subplots
    monkeypatch.setattr(plot.plt, 'subplots',
                        lambda rows, cols, **kw: panels.append(cols) or real_subplots(rows, cols, **kw))
    plot.plot_run(str(tmp_path / 'a' / 'log.jsonl'), str(tmp_path / 'a' / 'loss.png'))
    table = plot.compare([str(tmp_path / 'a'), str(tmp_path / 'b')], str(tmp_path / 'cmp.png'))
    assert panels == [2, 1]                              # objective and val loss apart; no NaN panels
    assert '| metric | a | b |' in table and '| test_loss | 2 | 2.5 |' in table and '| val_loss | 2.7 | 3.2 |' in table
    assert (tmp_path / 'cmp.png').stat().st_size > 0 and (tmp_path / 'a' / 'loss.png').stat().st_size > 0


# ---- wandb ----

def test_wandb_is_optional(tiny_cfg, monkeypatch):
    from train import train
    cfg = dataclasses.replace(tiny_cfg, wandb_project='nanoprior', final_eval=False, loss='ntp', init_lm='scratch')
    calls = []

    class Run:
        def log(self, data, step):
            calls.append((step, data))

        def finish(self):
            calls.append('finish')
    monkeypatch.setitem(sys.modules, 'wandb', types.SimpleNamespace(init=lambda **kw: calls.append(kw) or Run()))
    train(cfg, log=lambda *a: None)
    assert calls[0]['project'] == 'nanoprior' and calls[0]['name'] == 'run' and calls[-1] == 'finish'
    assert any(step == 6 and 'train_loss' in data for step, data in calls[1:-1])
    monkeypatch.setitem(sys.modules, 'wandb', None)          # not installed
    with pytest.raises(ConfigError, match="pip install wandb"):
        train(dataclasses.replace(cfg, out_dir=cfg.out_dir + '_again'), log=lambda *a: None)


# ---- precision and the GPU paths ----

@pytest.mark.slow
@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_precision_setting(tiny_cfg, precision):
    cfg = dataclasses.replace(tiny_cfg, precision=precision, final_eval=False, max_iters=4, ckpt_interval=2)
    train_quiet(cfg)
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, 'ckpt.pt'))
    assert (ckpt['scaler'] is not None) == (precision == 'fp16')
    rows = [json.loads(line) for line in open(os.path.join(cfg.out_dir, 'log.jsonl'))]
    assert all(torch.isfinite(torch.tensor(r['train_loss'])) for r in rows if 'train_loss' in r)
    train_quiet(dataclasses.replace(cfg, resume=True, max_iters=6))            # the scaler state resumes


def test_step_reads_reference_probabilities_before_the_forward(tiny_cfg):
    """On CUDA a copy queued after the forward waits for it: the P_r rows must be read first, and the
    text width taken from host tensors."""
    from data import load_splits, make_loader, make_vocab, micro_batches
    from runs.optim import make_optimizer
    from train import build_model, train_step
    cfg = dataclasses.replace(tiny_cfg, init_lm='scratch')
    splits = load_splits(cfg, names=('train',))
    vocab = make_vocab(cfg, splits['train'])
    data = splits['train'].encode(vocab)
    model = build_model(cfg, vocab, 'cpu')
    order = []
    model.register_forward_pre_hook(lambda *a: order.append('forward'))

    def ref_probs_of(rows, idx, targets, classes):
        order.append('ref_probs')
        return torch.rand(targets.shape)
    steps = dataclasses.replace(cfg, batch_size=8, grad_accum=2)
    batches = iter(make_loader(data, micro_batches(len(data), steps, 1, 0, 0, 1)))
    train_step(dataclasses.replace(cfg, batch_size=8, grad_accum=2), model, model, make_optimizer(model, 1e-3, cfg),
               data, batches, 0, ref_probs_of)
    assert order == ['ref_probs', 'forward'] * 2


@pytest.mark.filterwarnings('ignore:This DataLoader will create')
def test_images_are_decoded_once_and_shared_with_dataloader_workers(tmp_path):
    from sources.images import ImageFiles
    from test_captions import write_image
    for i in range(4):
        write_image(tmp_path / f'{i}.jpg', i)
    files = ImageFiles([str(tmp_path / f'{i}.jpg') for i in range(4)], 16)
    loader = torch.utils.data.DataLoader(files, batch_size=2, num_workers=2, collate_fn=torch.stack)
    first = torch.cat(list(loader))
    for i in range(4):
        os.remove(tmp_path / f'{i}.jpg')                  # the next epochs cannot decode them again
    assert torch.equal(torch.cat(list(loader)), first)    # other workers, another epoch: the workers' decodes
    assert torch.equal(files[3], first[3])                # and the main process's


def test_scoring_reports_progress(tiny_cfg, monkeypatch):
    from data import load_splits, make_vocab
    from model import GPT, gpt_config
    from reference import score_captions
    data = load_splits(tiny_cfg, names=('val',))['val']
    vocab = make_vocab(tiny_cfg, data)
    data.encode(vocab)
    monkeypatch.setattr('runs.progress.Progress.due', lambda self: True)
    lines = []
    score_captions(GPT(gpt_config(tiny_cfg, vocab)), data, 'cpu', batch_size=16, log=lines.append)
    assert lines[0].startswith('reference: scoring captions 16/64, ') and 'ETA' in lines[0] and len(lines) == 4
