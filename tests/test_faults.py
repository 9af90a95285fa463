"""What clusters and users do to a long run (issue 20), one fault injected per test on tiny runs: each
run works, or stops with one line naming the file, row, setting or cause, and keeps what it computed."""
import builtins
import dataclasses
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from runs.caches import cache_root, images_fingerprint
from runs.errors import ConfigError, Diverged, Interrupted, StorageError
from runs.files import load_checkpoint
from sources.tokenizer import Vocab
from train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
quiet = dict(log=lambda *a: None)


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl'))]
    return [(r['step'], r['train_loss']) for r in rows if 'train_loss' in r]


def flags(cfg, **overrides):
    return [f'--{k}={v}' for k, v in {**dataclasses.asdict(cfg), **overrides}.items()]


def start(args, nproc=1):
    """train.py in a process group of its own, as a terminal's foreground job."""
    cmd = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
           if nproc > 1 else [sys.executable]) + ['train.py'] + args
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_steps(out_dir, n, proc, timeout=300):
    log, deadline = os.path.join(out_dir, 'log.jsonl'), time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log) and len(losses(out_dir)) >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run ended or stalled before step {n}: {proc.stderr.read()[-2000:]}")


def fail_writes(monkeypatch, hits, err=errno.ENOSPC, after=0):
    """Every open for writing of a path for which hits(path) is true fails with `err` (a full disk,
    read-only storage), after `after` such opens went through."""
    real_open, seen = builtins.open, [0]

    def fake_open(file, mode='r', *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in 'wax+') and hits(os.fspath(file)):
            seen[0] += 1
            if seen[0] > after:
                raise OSError(err, os.strerror(err), os.fspath(file))
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, 'open', fake_open)


def named(name):
    """The file `name` or an atomic write's temp file of it."""
    return lambda path: os.path.basename(path) == name or os.path.basename(path).startswith(name + '.tmp.')


# ---- 1. preemption ----

@pytest.mark.slow
def test_sigterm_and_sigint_stop_after_the_step_and_resume_exactly(tiny_cfg, tmp_path):
    args = flags(tiny_cfg, max_iters=40, ckpt_interval=0, eval_interval=20, final_eval=False, dropout=0.1)
    whole = start(args + [f'--out_dir={tmp_path / "whole"}'])
    assert whole.wait(timeout=600) == 0, whole.stderr.read()
    for sig in (signal.SIGTERM, signal.SIGINT):
        out_dir = tmp_path / sig.name
        workers = ['--num_workers=1'] if sig == signal.SIGINT else []          # Ctrl-C reaches them too
        proc = start(args + [f'--out_dir={out_dir}'] + workers)
        wait_for_steps(out_dir, 5, proc)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)                              # as a terminal sends it: to the whole job
        else:
            proc.send_signal(sig)
        t0 = time.time()
        status, err = proc.wait(timeout=60), proc.stderr.read()
        assert time.time() - t0 < 20 and status == Interrupted.status, err
        step = load_checkpoint(str(out_dir / 'ckpt.pt'))['step']
        assert err.count('\n') == 1 and f"stopped by {sig.name} after step {step}" in err and step < 40
        assert losses(out_dir)[-1][0] == step                     # the log is written up to the checkpoint
        resumed = start(args + [f'--out_dir={out_dir}', '--resume=True'])
        assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
        assert losses(out_dir) == losses(tmp_path / 'whole')     # the same per-step losses, exactly


@pytest.mark.slow
def test_under_torchrun_every_rank_stops_after_the_same_step(tiny_cfg, tmp_path):
    out_dir = tmp_path / 'run'
    proc = start(flags(tiny_cfg, max_iters=60, ckpt_interval=0, eval_interval=60, final_eval=False, batch_size=8,
                       out_dir=out_dir), nproc=2)
    wait_for_steps(out_dir, 3, proc)
    agent = proc.pid
    workers = [int(p) for t in os.listdir(f'/proc/{agent}/task')
               for p in open(f'/proc/{agent}/task/{t}/children').read().split()]
    rank1 = next(p for p in workers if b'RANK=1\0' in open(f'/proc/{p}/environ', 'rb').read().replace(b'LOCAL_', b'_'))
    os.kill(rank1, signal.SIGTERM)                                # one rank only: it tells the other
    proc.wait(timeout=60)
    err = proc.stderr.read()
    step = load_checkpoint(str(out_dir / 'ckpt.pt'))['step']
    assert step < 60 and f"after step {step}" in err and 'stopped by SIGTERM' in err
    assert 'stopped by a signal to another process' in err        # rank 0 stopped because rank 1 was told


@pytest.mark.slow
@pytest.mark.parametrize('script', ['train.py', 'eval.py', 'sample.py'])
def test_a_signal_during_start_up_ends_in_one_line(tiny_cfg, tmp_path, script):
    """Ctrl-C or SIGTERM while the imports load, while the settings are read or as set-up begins."""
    args = flags(tiny_cfg, max_iters=40) if script == 'train.py' else [f'--ckpt={tmp_path}/none.pt']
    for sig, delay in ((signal.SIGINT, 0.3), (signal.SIGTERM, 0.3), (signal.SIGTERM, 1.5), (signal.SIGINT, 3.0)):
        proc = subprocess.Popen([sys.executable, script] + args + [f'--out_dir={tmp_path / sig.name}'] * (
            script == 'train.py'), cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        time.sleep(delay)
        os.killpg(proc.pid, sig)
        status, err = proc.wait(timeout=60), proc.stderr.read()
        if script != 'train.py' and err == f"error: --ckpt: no checkpoint at {tmp_path}/none.pt\n":
            continue                                         # it ended first, naming the missing checkpoint
        assert status == Interrupted.status and err.count('\n') == 1, (sig, delay, status, err)
        assert err.startswith(f'error: stopped by {sig.name}'), err


def test_a_stop_python_cannot_pass_on_still_ends_the_program_in_one_line(tmp_path):
    """A signal's Interrupted raised inside a weakref callback, which Python reports as "Exception ignored"
    and goes on from: the entry points' hook ends the program there; any other such exception goes on."""
    script = tmp_path / 'callback.py'
    script.write_text(
        "import sys, weakref\nsys.path.insert(0, sys.argv[1])\n"
        "from runs.errors import Interrupted\nfrom runs.startup import stop_where_unraisable\n"
        "sys.unraisablehook = stop_where_unraisable\n"
        "class Thing: pass\n"
        "def raising(ref): raise (Interrupted if sys.argv[2] == 'stop' else ValueError)('stopped by SIGINT here')\n"
        "thing = Thing(); ref = weakref.ref(thing, raising); del thing\nprint('went on')\n")
    stop, other = (subprocess.run([sys.executable, str(script), ROOT, kind], capture_output=True, text=True)
                   for kind in ('stop', 'other'))
    assert (stop.returncode, stop.stdout, stop.stderr) == (Interrupted.status, '', 'error: stopped by SIGINT here\n')
    assert other.returncode == 0 and other.stdout == 'went on\n' and 'Exception ignored' in other.stderr


def test_a_signal_during_a_checkpoint_write_keeps_a_loadable_checkpoint(tiny_cfg, monkeypatch):
    import runs.files as checkpoint
    real_save, saves = checkpoint.torch.save, []

    def signalled_save(obj, f):
        saves.append(obj['step'])
        if len(saves) == 1:
            os.kill(os.getpid(), signal.SIGTERM)                  # arrives while the file is written
        real_save(obj, f)
    monkeypatch.setattr(checkpoint.torch, 'save', signalled_save)
    with pytest.raises(Interrupted, match='stopped by SIGTERM after step 3'):
        train(dataclasses.replace(tiny_cfg, loss='ntp', init_lm='scratch'), **quiet)
    assert load_checkpoint(os.path.join(tiny_cfg.out_dir, 'ckpt.pt'))['step'] == 3 == saves[-1]

    def killed_mid_write(obj, f):
        f.write(b'PK\x03\x04 half a checkpoint')
        raise KeyboardInterrupt                                    # as a kill would leave it
    monkeypatch.setattr(checkpoint.torch, 'save', killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        train(dataclasses.replace(tiny_cfg, loss='ntp', init_lm='scratch', resume=True), **quiet)
    assert load_checkpoint(os.path.join(tiny_cfg.out_dir, 'ckpt.pt'))['step'] == 3
    assert not [f for f in os.listdir(tiny_cfg.out_dir) if '.tmp.' in f]


def test_a_signal_before_training_stops_at_once(tiny_cfg, monkeypatch):
    import train as train_mod
    monkeypatch.setattr(train_mod, 'load_splits', lambda cfg: os.kill(os.getpid(), signal.SIGINT) or time.sleep(5))
    t0 = time.time()
    with pytest.raises(Interrupted, match='stopped by SIGINT before training began'):
        train(tiny_cfg, **quiet)
    assert time.time() - t0 < 4


# ---- 4. numbers going bad ----

class NanGrad(torch.autograd.Function):
    """The identity whose gradient is NaN: a finite loss with a non-finite gradient."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float('nan')


@pytest.mark.parametrize('bad', ['loss', 'gradient'])
def test_a_non_finite_loss_or_gradient_stops_naming_the_step(tiny_cfg, bad):
    from prior_loss import objective
    calls = []

    def loss_fn(*args):
        calls.append(1)
        loss = objective(*args)
        if len(calls) < 5:
            return loss
        return loss * float('nan') if bad == 'loss' else NanGrad.apply(loss)
    cfg = dataclasses.replace(tiny_cfg, log_interval=2)
    with pytest.raises(Diverged, match=r'NaN or infinite at step 5; .* last good checkpoint, step 3'):
        train(cfg, loss_fn=loss_fn, **quiet)
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, 'ckpt.pt'))
    assert ckpt['step'] == 3 and all(torch.isfinite(v).all() for v in ckpt['model'].values())


@pytest.mark.slow
def test_fp16_loss_scaling_skipping_steps_is_not_an_error(tiny_cfg):
    from prior_loss import objective
    cfg = dataclasses.replace(tiny_cfg, precision='fp16', final_eval=False, loss='ntp', init_lm='scratch')
    train(cfg, loss_fn=lambda *args: NanGrad.apply(objective(*args)), **quiet)     # every step skipped
    assert load_checkpoint(os.path.join(cfg.out_dir, 'ckpt.pt'))['scaler']['scale'] < 2 ** 16


# ---- 5. storage and places ----

@pytest.mark.parametrize('name, after', [('ckpt.pt', 1), ('log.jsonl', 3), ('ref.pt', 0), ('ref_probs_train.npy', 0),
                                         ('loss.png', 0), ('eval_test.json', 0)])
def test_a_full_disk_at_any_write_is_one_line_naming_the_file(tiny_cfg, monkeypatch, name, after):
    fail_writes(monkeypatch, named(name), after=after)
    with pytest.raises(StorageError, match=f"cannot write .*{name}: No space left on device") as e:
        train(tiny_cfg, **quiet)
    assert '\n' not in str(e.value)
    monkeypatch.undo()
    ckpt = os.path.join(tiny_cfg.out_dir, 'ckpt.pt')
    if name in ('ckpt.pt', 'loss.png', 'eval_test.json'):      # what was computed is kept
        assert load_checkpoint(ckpt)['step'] == (3 if name == 'ckpt.pt' else 6)
    leftovers = [f for d, _, files in os.walk(os.path.dirname(tiny_cfg.out_dir)) for f in files if '.tmp.' in f]
    assert not leftovers


def test_read_only_storage(tiny_cfg, monkeypatch):
    run_dir = tiny_cfg.out_dir
    fail_writes(monkeypatch, lambda path: path.startswith(run_dir), err=errno.EROFS)
    with pytest.raises(StorageError, match=f"out_dir {run_dir} is not writable .Read-only file system"):
        train(tiny_cfg, **quiet)                                   # before any work
    assert not os.path.exists(tiny_cfg.ref_ckpt)
    monkeypatch.undo()
    cfg = dataclasses.replace(tiny_cfg, ref_ckpt='', final_eval=False)
    train(cfg, **quiet)                                            # builds the caches
    cache = cache_root(cfg)
    fail_writes(monkeypatch, lambda path: path.startswith(cache), err=errno.EROFS)
    train(dataclasses.replace(cfg, out_dir=cfg.out_dir + '2'), **quiet)     # a complete read-only cache is used


def test_an_interrupted_cache_commit_is_never_used(tmp_path):
    from runs.caches import check_cache, commit_cache
    npy, manifest = str(tmp_path / 'a.npy'), str(tmp_path / 'a.json')
    commit_cache(manifest, {npy: lambda f: f.write(b'old')}, {'data': 1})
    assert check_cache(manifest, {'data': 1})['files']['a.npy']['size'] == 3
    open(npy, 'wb').write(b'new, but the manifest was never written')      # killed between the two writes
    with pytest.raises(ConfigError, match=f"cache file {npy} is missing, truncated or changed"):
        check_cache(manifest, {'data': 1})
    with pytest.raises(ConfigError, match='made from other inputs .data differ'):
        check_cache(manifest, {'data': 2})
    os.remove(manifest)
    assert check_cache(manifest, {'data': 1}) is None              # no manifest: not a cache yet


def test_caches_live_with_the_run_and_paths_mean_the_same_anywhere(tiny_cfg, tmp_path, monkeypatch):
    work, elsewhere = tmp_path / 'work', tmp_path / 'elsewhere'
    work.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(work)
    cfg = dataclasses.replace(tiny_cfg, out_dir='runs/a', ref_ckpt='', final_eval=False)
    train(cfg, **quiet)
    assert sorted(os.listdir(work / 'runs')) == ['a', 'cache'] and os.listdir(work) == ['runs']
    ckpt = load_checkpoint(str(work / 'runs' / 'a' / 'ckpt.pt'))
    assert ckpt['config']['out_dir'] == str(work / 'runs' / 'a')
    assert ckpt['ref_ckpt'].startswith(str(work / 'runs' / 'cache'))
    monkeypatch.chdir(elsewhere)
    lines = []
    train(dataclasses.replace(cfg, out_dir=str(work / 'runs' / 'a'), resume=True, max_iters=8), log=lines.append)
    assert any(line.startswith('resumed from') for line in lines) and not os.listdir(elsewhere)
    os.rename(work / 'runs' / 'a', elsewhere / 'a')                # the run folder moves away from its cache
    lines = []
    train(dataclasses.replace(cfg, out_dir=str(elsewhere / 'a'), resume=True, max_iters=10), log=lines.append)
    assert not any('training the text-only reference' in line for line in lines)     # its own copy, not retrained


def test_eval_refuses_another_kind_or_vocabulary_and_names_outputs_apart(tiny_cfg, tmp_path):
    import eval as evaluation
    train(dataclasses.replace(tiny_cfg, final_eval=False), **quiet)
    ckpt = os.path.join(tiny_cfg.out_dir, 'ckpt.pt')
    with pytest.raises(ConfigError, match='not the kind expected'):
        evaluation.main([f'--ckpt={tiny_cfg.ref_ckpt}'])
    with pytest.raises(ConfigError, match='is a train.py checkpoint, not a reference'):
        evaluation.main([f'--ckpt={ckpt}', f'--ref_ckpt={ckpt}'])
    other = dataclasses.replace(tiny_cfg, data_seed=7, n_train=32, out_dir=str(tmp_path / 'other'),
                                ref_ckpt=str(tmp_path / 'other_ref' / 'ref.pt'), max_iters=1, final_eval=False)
    train(other, **quiet)
    with pytest.raises(ConfigError, match='another vocabulary'):
        evaluation.main([f'--ckpt={ckpt}', f'--ref_ckpt={other.ref_ckpt}'])
    a, b = (evaluation.output_path(ckpt, str(tmp_path / d / 'flickr'), 'test', 6) for d in ('x', 'y'))
    assert a != b and os.path.basename(a).startswith('eval_flickr-')


# ---- 2. edited data ----

def disk_cfg(tiny_cfg, folder, **overrides):
    return dataclasses.replace(tiny_cfg, dataset=str(folder), image_size=16, val_frac=0.25, test_frac=0.25,
                               block_size=24, final_eval=False, ref_ckpt='', **overrides)


@pytest.mark.slow
def test_an_edited_image_is_refused_on_resume_and_trains_anew_in_a_fresh_run(tiny_cfg, tmp_path):
    from data import load_splits
    from test_captions import make_folder, write_image
    folder = make_folder(tmp_path, n_images=40)
    cfg = disk_cfg(tiny_cfg, folder)
    train(cfg, **quiet)
    before = images_fingerprint(load_splits(cfg, names=('train',), log=lambda *a: None)['train'])
    image = load_splits(cfg, names=('train',), log=lambda *a: None)['train'].images.paths[0]
    os.utime(image)                                                # touched, same bytes: the same data
    assert images_fingerprint(load_splits(cfg, names=('train',), log=lambda *a: None)['train']) == before
    write_image(image, 999)                                        # other pixels, same name
    with pytest.raises(ConfigError, match=r"the training images differ from the checkpoint's"):
        train(dataclasses.replace(cfg, resume=True, max_iters=8), **quiet)
    train(dataclasses.replace(cfg, out_dir=cfg.out_dir + '_fresh'), **quiet)    # no stale cache in the way
    refs = os.listdir(os.path.join(cache_root(cfg), 'ref'))
    assert len(refs) == 1                                          # the captions did not change: one reference


# ---- 3. damaged files at any time ----

@pytest.mark.parametrize('damage', ['delete', 'truncate', 'replace'])
def test_an_image_damaged_mid_run_is_named_or_skipped_and_counted(tiny_cfg, tmp_path, monkeypatch, damage, capfd):
    import train as train_mod
    from test_captions import make_folder
    from prior_loss import objective
    folder = make_folder(tmp_path, n_images=40)
    splits, real_load = [], train_mod.load_splits
    monkeypatch.setattr(train_mod, 'load_splits', lambda cfg: splits.append(real_load(cfg)) or splits[-1])
    damaged = []

    def loss_fn(*args):                            # after the first step: damage an image not decoded yet
        files = splits[-1]['train'].images
        if not damaged:
            damaged.append(files.paths[int((files.state == 0).nonzero()[0])])
            if damage == 'delete':
                os.remove(damaged[0])
            else:
                raw = open(damaged[0], 'rb').read()
                open(damaged[0], 'wb').write(raw[:len(raw) // 2] if damage == 'truncate' else raw[::-1])
        return objective(*args)
    cfg = disk_cfg(tiny_cfg, folder, loss='ntp', init_lm='scratch', max_iters=8)
    with pytest.raises(ConfigError) as refused:
        train(cfg, loss_fn=loss_fn, **quiet)
    assert re.search(f"image {re.escape(damaged[0])} .* since the start-up check", str(refused.value))
    damaged.clear()
    lines = []
    train(dataclasses.replace(cfg, skip_bad=True, out_dir=cfg.out_dir + '_skip'), loss_fn=loss_fn, log=lines.append)
    assert any('skipped 1 training images that went bad' in line for line in lines)
    assert f'skipping image {damaged[0]}' in capfd.readouterr().err


def test_damaged_checkpoint_reference_and_caches(tiny_cfg, monkeypatch):
    from runs.reference_files import cache_paths
    cfg = dataclasses.replace(tiny_cfg, final_eval=False)
    train(cfg, **quiet)
    ckpt = os.path.join(cfg.out_dir, 'ckpt.pt')
    data = open(ckpt, 'rb').read()
    open(ckpt, 'wb').write(data[:len(data) // 2])
    with pytest.raises(ConfigError, match=f"checkpoint {ckpt} is empty, truncated"):       # before any data is read
        train(dataclasses.replace(cfg, resume=True, max_iters=8, dataset='/nowhere'), **quiet)
    npy = cache_paths(cfg.ref_ckpt)[0]
    open(npy, 'r+b').truncate(100)
    lines = []
    train(dataclasses.replace(cfg, out_dir=cfg.out_dir + '2'), log=lines.append)       # scored anew, said so
    assert any(f'cache file {npy} is missing, truncated' in line for line in lines)
    open(cfg.ref_ckpt, 'wb').write(b'not a checkpoint')       # a file given by --ref_ckpt is named, not replaced
    with pytest.raises(ConfigError, match=f"checkpoint {cfg.ref_ckpt} is not a plain PyTorch checkpoint"):
        train(dataclasses.replace(cfg, out_dir=cfg.out_dir + '3'), **quiet)
    cached = dataclasses.replace(cfg, ref_ckpt='', out_dir=cfg.out_dir + '4')
    train(cached, **quiet)
    default = load_checkpoint(os.path.join(cached.out_dir, 'ckpt.pt'))['ref_ckpt']
    open(default, 'r+b').truncate(1000)                           # one in the cache folder is trained anew
    lines = []
    train(dataclasses.replace(cached, out_dir=cfg.out_dir + '5'), log=lines.append)
    assert any(f'reference: checkpoint {default} is empty, truncated' in line for line in lines)


# ---- 6. any language, any layout ----

def test_captions_beyond_ascii_come_back_exactly_and_score_by_unicode_words(tmp_path):
    from metrics.caption_scores import bleu, words
    from data import load_splits
    from config import Config
    from prior_loss import IGNORE
    from test_captions import write_image
    texts = ['一只黑色的狗在草地上奔跑', 'un garçon mange une crêpe près du café', 'a dog 🐕 with a ball ⚽ 🇯🇵',
             'Ελληνικά και русский текст', 'naïve façade — “quoted” ½']
    root = tmp_path / 'ds'
    (root / 'images').mkdir(parents=True)
    for i, text in enumerate(texts):
        write_image(root / 'images' / f'{i}.jpg', i)
    (root / 'captions.jsonl').write_text('\n'.join(json.dumps({'image': f'{i}.jpg', 'caption': t})
                                                   for i, t in enumerate(texts)), encoding='utf-8')
    data = load_splits(Config(dataset=str(root), image_size=16), names=('all',), log=lambda *a: None)['all']
    vocab = Vocab.from_captions(data.gpt2_tokens)
    data.encode(vocab)
    for row, text in enumerate(data.texts):
        ids = data.targets[row][data.targets[row] != IGNORE].tolist()[:-1]       # the caption without EOT
        assert vocab.decode(ids) == text
    assert words(texts[0])[:3] == ['一', '只', '黑'] and 'garçon' in words(texts[1])
    assert '🐕' not in words(texts[2])
    assert bleu([words(texts[0])], [[words(texts[0])]])[3] == pytest.approx(1.0)


def test_a_folder_per_image_layout_splits(tmp_path):
    from config import Config
    from data import load_splits
    from test_captions import write_image
    root = tmp_path / 'ds'
    rows = []
    for i in range(40):
        (root / f'{i:03d}').mkdir(parents=True)
        write_image(root / f'{i:03d}' / 'image.jpg', i)
        rows.append(json.dumps({'image': f'{i:03d}/image.jpg', 'caption': f'picture number {i}'}))
    (root / 'captions.jsonl').write_text('\n'.join(rows))
    splits = load_splits(Config(dataset=str(root), image_size=16, val_frac=0.25, test_frac=0.25), log=lambda *a: None)
    assert all(len(d) >= 4 for d in splits.values()), {k: len(d) for k, d in splits.items()}


# ---- 7. mistakes people make, 8. leftovers ----

def one_line_error(capsys, argv, main=None):
    """Run train.py's command line in this process: (its exit status, its one stderr line)."""
    import config
    from runs.cli import cli
    with pytest.raises(SystemExit) as e:
        cli(main or (lambda a: train(config.load_config(a), **quiet)), argv, '')
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: '), err
    return e.value.code, err


def test_a_signal_a_library_re_raised_as_its_own_error_is_still_one_line(capsys):
    """tiktoken turns a Ctrl-C while it parses its ranks into `ValueError: Error parsing line`."""
    def main(argv, signal=True):
        try:
            if signal:
                raise Interrupted('stopped by SIGINT')
            int('x')
        except Exception as e:
            raise ValueError('Error parsing line') from e
    status, err = one_line_error(capsys, [], main)
    assert status == Interrupted.status and err == 'error: stopped by SIGINT\n'
    with pytest.raises(ValueError, match='Error parsing line'):     # with no signal inside, it stays as it is
        one_line_error(capsys, [], lambda argv: main(argv, signal=False))


def test_a_signal_while_a_checkpoint_is_read_is_not_blamed_on_the_file(tmp_path, monkeypatch):
    """It was once reported as 'checkpoint ... is empty, truncated or not a PyTorch checkpoint (Interrupted)'."""
    from runs import files
    path = tmp_path / 'ref.pt'
    torch.save({'model': {}}, path)

    def interrupted(*args, **kwargs):
        raise Interrupted('stopped by SIGINT')
    monkeypatch.setattr(files.torch, 'load', interrupted)
    with pytest.raises(Interrupted):
        load_checkpoint(str(path))


def test_under_torchrun_an_error_is_printed_once_with_the_rank_where_it_happened(capsys, monkeypatch, tmp_path):
    from runs.cli import cli

    def fails(message):
        def main(argv):
            raise ConfigError(message)
        return main
    import runs.errors
    monkeypatch.setattr(runs.errors.time, 'sleep', lambda s: None)
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', f'test-{tmp_path.name}')
    monkeypatch.setenv('WORLD_SIZE', '2')
    printed = []
    for rank, message in ((0, 'the same on every rank'), (1, 'the same on every rank'), (1, 'on rank 1 alone')):
        monkeypatch.setenv('RANK', str(rank))
        with pytest.raises(SystemExit) as e:
            cli(fails(message), [], '')
        assert e.value.code == 2
        printed.append(capsys.readouterr().err)
    assert printed == ['error: the same on every rank (rank 0 of 2)\n', '', 'error: on rank 1 alone (rank 1 of 2)\n']


@pytest.mark.slow
def test_under_torchrun_a_settings_mistake_is_one_line(tiny_cfg, tmp_path):
    proc = start(flags(tiny_cfg, out_dir=tmp_path / 'run') + ['--alpha=-1'], nproc=2)
    proc.wait(timeout=120)
    lines = [line for line in proc.stderr.read().splitlines() if 'error' in line and 'alpha' in line]
    assert len(lines) == 1 and '(rank 0 of 2)' in lines[0], lines
    assert lines[0].startswith("error: config key 'alpha' must be >= 0"), lines


@pytest.mark.parametrize('source, says', [(b'alpha = (1,\n', 'line 1: '),
                                          (b'alpha = 1\nbeta = gamma\n', "line 2: NameError"),
                                          (b'from nowhere_pkg import x\n', "line 1: ModuleNotFoundError"),
                                          (b'# caf\xe9\nalpha = 1\n', 'is not UTF-8 (byte 5)'),
                                          (b'import math\nalpha = math.sqrt(4)\nlr = 1e-3\n',
                                           'did you mean --learning_rate')])
def test_config_file_mistakes_are_one_line(tmp_path, capsys, source, says):
    path = tmp_path / 'my_config.py'
    path.write_bytes(source)
    status, err = one_line_error(capsys, [str(path)])
    assert status == 2 and f'{path}' in err and says in err


@pytest.mark.parametrize('flag, says', [('--lr=1e-3', 'did you mean --learning_rate'),
                                        ('--bs=8', 'did you mean --batch_size'),
                                        ('--steps=9', 'did you mean --max_iters'),
                                        ('--out_dir=', "'out_dir' is empty"),
                                        ('--ref_ckpt=/', "'ref_ckpt' is a folder"),
                                        ('--vision_ckpt=/no/such/resnet18.pt', "'vision_ckpt': no file")])
def test_setting_mistakes_are_one_line(capsys, flag, says):
    extra = ['--arch=h', '--vision=resnet18', '--init_vision=pretrained'] if 'vision_ckpt' in flag else []
    status, err = one_line_error(capsys, [flag] + extra)
    assert status == 2 and says in err


@pytest.mark.parametrize('kind', ['file', 'too long', 'under a file'])
def test_unusable_out_dirs_are_one_line(tmp_path, capsys, kind):
    (tmp_path / 'f').write_text('x')
    out_dir = {'file': tmp_path / 'f', 'too long': tmp_path / ('x' * 300), 'under a file': tmp_path / 'f' / 'run'}[kind]
    status, err = one_line_error(capsys, [f'--out_dir={out_dir}', '--device=cpu'])
    assert status in (2, 5) and str(out_dir) in err


def test_checkpoints_name_the_reference_they_keep_once(tiny_cfg, tmp_path):
    import eval as evaluation
    from reference import DEBIAS_MIN_WEIGHT
    from runs.files import weights_digest
    cfg = dataclasses.replace(tiny_cfg, final_eval=False, n_test=2)
    train(cfg, **quiet)
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, 'ckpt.pt'))
    kept = load_checkpoint(os.path.join(cfg.out_dir, 'reference.pt'))
    assert 'reference' not in ckpt and ckpt['reference_sha256'] == weights_digest(kept['model'])
    fig = tmp_path / 'fig.png'                     # a split of 2 captions, smaller than the figure's 4
    evaluation.main([f'--ckpt={cfg.out_dir}/ckpt.pt', '--n_generate=2', f'--figure={fig}'])
    assert fig.stat().st_size > 0
    json_out = json.load(open(os.path.join(cfg.out_dir, 'eval_test_step6.json')))
    assert json_out['n_captions'] == 2
    evaluation.main([f'--ckpt={cfg.out_dir}/ckpt.pt', '--n_generate=2', '--debias=True'])   # its own file
    debiased = json.load(open(os.path.join(cfg.out_dir, 'eval_debias_test_step6.json')))
    assert debiased['debias_min_weight'] == DEBIAS_MIN_WEIGHT and debiased['loss'] != json_out['loss']
    assert json.load(open(os.path.join(cfg.out_dir, 'eval_test_step6.json'))) == json_out


def test_a_resume_with_a_changed_reference_is_refused(tiny_cfg):
    """The same ref_ckpt path holding another reference (retrained, edited): PRIOR would weigh the
    rest of the run by other scores, so the resume is refused, naming the reference."""
    from data import load_splits, make_vocab
    from reference import load_reference, save_reference
    cfg = dataclasses.replace(tiny_cfg, max_iters=2, final_eval=False)
    train(cfg, **quiet)
    ref, _, _ = load_reference(cfg.ref_ckpt, 'cpu')
    with torch.no_grad():
        ref.lm_head.weight.mul_(1.01)
    captions = load_splits(cfg, names=('train',))['train']
    vocab = make_vocab(cfg, captions)
    save_reference(ref, vocab, cfg, captions.encode(vocab), cfg.ref_ckpt)
    with pytest.raises(ConfigError, match="the reference LM differ from the checkpoint's"):
        train(dataclasses.replace(cfg, resume=True, max_iters=4), **quiet)


def test_a_damaged_feature_cache_is_computed_anew(tiny_cfg):
    from data import load_splits, make_vocab
    from pretrained.features import use_cached_features
    from model import ViT
    cfg = dataclasses.replace(tiny_cfg, n_train=32, n_val=8, n_test=8)
    vit = ViT(cfg.image_size, cfg.patch_size, cfg.vit_layer, cfg.n_head, cfg.vit_embd, 0.0)

    def cached(log):
        splits = load_splits(cfg, names=('val',))
        splits['val'].encode(make_vocab(cfg, splits['val']))
        use_cached_features(splits, vit, 'cpu', cache_root(cfg), log=log)
        return splits['val'].images.views[0]
    first = cached(lambda *a: None)
    path, first = first.filename, np.array(first)
    open(path, 'r+b').truncate(os.path.getsize(path) - 8)
    lines = []
    again = cached(lines.append)
    assert 'is missing, truncated or changed' in lines[0] and len(lines) == 2 and (again == first).all()


def test_any_foreign_bytes_as_a_checkpoint_are_one_line(tmp_path, recwarn):
    path = tmp_path / 'ckpt.pt'
    for seed in range(300):                        # what the unpickler trips on varies with the bytes
        path.write_bytes(np.random.default_rng(seed).bytes(64))
        with pytest.raises(ConfigError, match=f"checkpoint {path} is "):
            load_checkpoint(str(path))
    assert not [w for w in recwarn if 'pickle protocol' in str(w.message)]
