"""Hostile and careless inputs: each either works or stops before training with one clear line
naming the setting, file, row or entry (or, with skip_bad, is skipped and counted)."""
import os
import pickle

import pytest
import torch

from config import load_config
from model import atomic_write, load_checkpoint, remove_stale_temps, save_checkpoint


# ---- settings ----

@pytest.mark.parametrize('flag, key', [
    ('--grad_accum=0', 'grad_accum'), ('--max_iters=0', 'max_iters'), ('--eval_batches=0', 'eval_batches'),
    ('--alpha=1e309', 'alpha'), ('--batch_size=0', 'batch_size'), ('--log_interval=0', 'log_interval'),
    ('--n_embd=0', 'n_embd'), ('--image_size=0', 'image_size'), ('--patch_size=0', 'patch_size'),
    ('--batch_size=-4', 'batch_size'), ('--learning_rate=0', 'learning_rate'), ('--learning_rate=-1e-3', 'learning_rate'),
    ('--weight_floor=1.5', 'weight_floor'), ('--dropout=1.0', 'dropout'), ('--beta2=1.0', 'beta2'),
    ('--block_size=2', 'block_size'), ('--eval_interval=0', 'eval_interval'), ('--ckpt_interval=-1', 'ckpt_interval'),
    ('--num_workers=-1', 'num_workers'), ('--max_image_pixels=0', 'max_image_pixels'), ('--val_frac=0.7', 'test_frac'),
    ('--grad_clip=-1', 'grad_clip'), ('--ref_max_iters=0', 'ref_max_iters'), ('--min_lr_ratio=2', 'min_lr_ratio'),
    ('--device=tpu', 'device')])
def test_nonsense_settings_are_refused_naming_the_key(flag, key):
    with pytest.raises(ValueError, match=key):
        load_config([flag, '--test_frac=0.5'] if key == 'test_frac' else [flag])


def test_nan_in_a_config_file_is_refused(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("alpha = float('nan')\n")
    with pytest.raises(ValueError, match="'alpha' must be a finite number"):
        load_config([str(f)])


# ---- checkpoints and temp files ----

@pytest.mark.parametrize('content', [b'', b'PK\x03\x04 torn zip', os.urandom(64),
                                     pickle.dumps(print, protocol=2)])       # print: a callable, refused by weights_only
def test_broken_checkpoint_is_one_clear_error(tmp_path, content):
    path = tmp_path / 'ckpt.pt'
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f'checkpoint {path}'):
        load_checkpoint(str(path))


def test_checkpoint_of_the_wrong_kind(tmp_path):
    torch.save([1, 2], tmp_path / 'list.pt')
    with pytest.raises(ValueError, match='not the kind expected'):
        load_checkpoint(str(tmp_path / 'list.pt'), required=('model',))


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    import socket
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    path = str(tmp_path / 'ckpt.pt')
    host = socket.gethostname()
    stale = f"{path}.tmp.{host}.{int(dead.stdout)}.abcd1234"
    alive = f"{path}.tmp.{host}.1.abcd1234"                       # pid 1 lives
    other_host = f"{path}.tmp.elsewhere.{int(dead.stdout)}.abcd1234"
    for p in (stale, alive, other_host):
        open(p, 'w').close()
    save_checkpoint({'step': 1}, path)
    assert not os.path.exists(stale) and os.path.exists(alive) and os.path.exists(other_host)
    assert load_checkpoint(path)['step'] == 1


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = str(tmp_path / 'log.jsonl')
    open(path, 'w').write('old\n')

    def torn(tmp):
        open(tmp, 'w').write('half')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, torn)
    assert open(path).read() == 'old\n' and os.listdir(tmp_path) == ['log.jsonl']
    remove_stale_temps(path)                                     # nothing to do, nothing breaks
