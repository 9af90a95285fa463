"""Hostile and careless inputs: each either works or stops before training with one clear line
naming the setting, file, row or entry (or, with skip_bad, is skipped and counted)."""
import dataclasses
import io
import json
import os
import pickle
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from sources.captions import read_records
from runs.files import (append_log, atomic_write, claim_dir, load_checkpoint, remove_stale_temps, save_checkpoint,
                        start_log, weights_digest)
from config import Config, load_config
from data import load_splits
from runs.caches import captions_fingerprint
from runs.errors import ConfigError
from sources.images import BadData
from test_captions import make_folder, records


# ---- settings ----

@pytest.mark.parametrize('flag, key', [
    ('--grad_accum=0', 'grad_accum'), ('--max_iters=0', 'max_iters'), ('--eval_batches=0', 'eval_batches'),
    ('--alpha=1e309', 'alpha'), ('--batch_size=0', 'batch_size'), ('--log_interval=0', 'log_interval'),
    ('--n_embd=0', 'n_embd'), ('--image_size=0', 'image_size'), ('--patch_size=0', 'patch_size'),
    ('--batch_size=-4', 'batch_size'), ('--learning_rate=0', 'learning_rate'),
    ('--learning_rate=-1e-3', 'learning_rate'),
    ('--weight_floor=1.5', 'weight_floor'), ('--label_smoothing=1.0', 'label_smoothing'), ('--dropout=1.0', 'dropout'), ('--beta2=1.0', 'beta2'),
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

@pytest.mark.parametrize('content', [b'', b'PK\x03\x04 torn zip', np.random.default_rng(0).bytes(64),
                                     pickle.dumps(print, protocol=2)])   # a callable: refused by weights_only
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

    def torn(f):
        f.write(b'half')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, torn)
    assert open(path).read() == 'old\n' and os.listdir(tmp_path) == ['log.jsonl']
    remove_stale_temps(path)                                     # nothing to do, nothing breaks


# ---- image files ----

def png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def png_bytes(size=(32, 32)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, 'PNG')
    return buf.getvalue()


def damaged_png():
    """A PNG whose signature, header, chunk CRCs and IEND are right but whose image data is cut short."""
    b = png_bytes()
    start = b.index(b'IDAT') - 4
    n = struct.unpack('>I', b[start:start + 4])[0]
    return b[:start] + png_chunk(b'IDAT', b[start + 8:start + 8 + n // 3]) + b[start + 12 + n:]


def replace_image(folder, name, content):
    (folder / 'images' / '3.jpg').unlink()
    (folder / 'images' / name).write_bytes(content)
    csv = re.sub(r'^3\.jpg,', f'{name},', (folder / 'captions.csv').read_text(), flags=re.M)
    (folder / 'captions.csv').write_text(csv)


def assert_refused(folder, kind, name, line='line 8'):
    with pytest.raises(BadData) as e:
        records(folder)
    assert kind in str(e.value) and name in str(e.value) and line in str(e.value), str(e.value)
    logs = []
    assert len(read_records(str(folder), skip_bad=True, log=logs.append)) == 58      # both captions of it
    assert f"'{kind}': 2" in logs[0]
    return str(e.value)


def test_damaged_png_is_named_up_front_not_a_segfault(tmp_path):
    folder = make_folder(tmp_path)
    replace_image(folder, 'bad.png', damaged_png())
    assert 'decoder crashed' in assert_refused(folder, 'undecodable', 'bad.png')


def test_corrupt_jpeg_body_is_named_up_front(tmp_path):
    folder = make_folder(tmp_path)
    b = bytearray((folder / 'images' / '3.jpg').read_bytes())
    dht = b.index(b'\xff\xc4')
    b[dht + 5:dht + 21] = b'\xff' * 16            # a Huffman table with more codes than there can be
    (folder / 'images' / '3.jpg').write_bytes(bytes(b))
    assert_refused(folder, 'undecodable', '3.jpg')


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    b = png_bytes()
    ihdr = b.index(b'IHDR') - 4
    bomb = b[:ihdr] + png_chunk(b'IHDR', struct.pack('>II', 50000, 50000) + b[ihdr + 16:ihdr + 21]) + b[ihdr + 25:]
    folder = make_folder(tmp_path)
    replace_image(folder, 'bomb.png', bomb)
    assert '50000x50000' in assert_refused(folder, 'too_large', 'bomb.png')


def test_animation_bomb_is_stopped_by_the_memory_cap(tmp_path):
    frames = [Image.new('RGB', (1, 1), (5 * i, 0, 0)) for i in range(40)]
    buf = io.BytesIO()
    frames[0].save(buf, 'GIF', save_all=True, append_images=frames[1:], duration=10)
    gif = bytearray(buf.getvalue())
    gif[6:10] = struct.pack('<HH', 9000, 9000)   # 81M pixels (under the limit) x 40 frames
    folder = make_folder(tmp_path)
    replace_image(folder, 'many.gif', bytes(gif))
    assert 'memory' in assert_refused(folder, 'undecodable', 'many.gif')


@pytest.mark.parametrize('name, content', [('x.bmp', None), ('movie.jpg', b'RIFF\x10\x00\x00\x00AVI LIST' + bytes(64)),
                                           ('tiff.jpg', b'II*\x00' + bytes(64))])
def test_formats_torchvision_cannot_decode_are_refused(tmp_path, name, content):
    if content is None:
        buf = io.BytesIO()
        Image.new('RGB', (8, 8)).save(buf, 'BMP')
        content = buf.getvalue()
    folder = make_folder(tmp_path)
    replace_image(folder, name, content)
    assert_refused(folder, 'not_an_image', name)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new('RGB', (20, 16), (40 * i, 0, 0)) for i in range(3)]
    folder = make_folder(tmp_path, n_images=12)
    frames[0].save(folder / 'images' / 'anim.gif', save_all=True, append_images=frames[1:])
    csv = re.sub(r'^3\.jpg,', 'anim.gif,', (folder / 'captions.csv').read_text(), flags=re.M)
    (folder / 'captions.csv').write_text(csv)
    cfg = Config(dataset=str(folder), image_size=8, val_frac=0.0001, test_frac=0.0001)
    data = load_splits(cfg, names=('all',), log=lambda *a: None)['all']
    images = data.image_batch(torch.arange(len(data)))           # torch.stack of every image
    assert images.shape == (24, 3, 8, 8)


def test_animated_webp_is_refused_up_front(tmp_path):
    frames = [Image.new('RGB', (20, 16), (40 * i, 0, 0)) for i in range(2)]
    folder = make_folder(tmp_path)
    buf = io.BytesIO()
    frames[0].save(buf, 'WEBP', save_all=True, append_images=frames[1:])
    replace_image(folder, 'anim.webp', buf.getvalue())
    assert_refused(folder, 'undecodable', 'anim.webp')


# ---- paths that leave the dataset ----

def test_paths_outside_the_image_folder_are_refused_without_echoing_them(tmp_path):
    secret = tmp_path / 'secret.txt'
    secret.write_text('SECRET-CONTENT')
    folder = make_folder(tmp_path)
    os.symlink(secret, folder / 'images' / 'link.jpg')
    os.symlink(folder / 'images' / '0.jpg', folder / 'images' / 'inside.jpg')     # stays inside: fine
    rows = ['../../secret.txt,"a dog"', f'{secret},"a dog"', 'link.jpg,"a dog"', 'inside.jpg,"a dog"']
    (folder / 'captions.csv').write_text((folder / 'captions.csv').read_text() + '\n' + '\n'.join(rows))
    with pytest.raises(BadData) as e:
        records(folder)
    msg = str(e.value)
    assert "'outside_root': 3" in msg and 'SECRET' not in msg
    for line in (62, 63, 64):
        assert f'line {line}: image' in msg
    assert len(records(folder, skip_bad=True)) == 61
    allowed = records(folder, confine=False, skip_bad=True)       # opted out: the non-images still refused
    assert len(allowed) == 61


def test_outside_images_work_when_allowed(tmp_path):
    folder = make_folder(tmp_path, n_images=3)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    os.replace(folder / 'images' / '2.jpg', elsewhere / '2.jpg')
    os.symlink(elsewhere / '2.jpg', folder / 'images' / '2.jpg')
    with pytest.raises(BadData, match='outside_root'):
        records(folder)
    assert len(records(folder, confine=False)) == 6


# ---- wrongly typed JSON fields ----

@pytest.mark.parametrize('entry', [{'image': 5, 'caption': 'a dog'}, {'image': ['0.jpg'], 'caption': 'a dog'},
                                   {'image': {'a': 1}, 'caption': 'a dog'}, {'image': '0.jpg', 'caption': ['a']},
                                   {'image': '0.jpg\u0000x', 'caption': 'a dog'}])
def test_jsonl_fields_of_the_wrong_type(tmp_path, entry):
    folder = make_folder(tmp_path, fmt='jsonl', rows=[json.dumps(entry)])
    with pytest.raises(BadData, match='captions.jsonl line 61'):
        records(folder)
    assert len(records(folder, skip_bad=True)) == 60


def test_coco_and_llava_fields_of_the_wrong_type(tmp_path):
    folder = make_folder(tmp_path, n_images=3)
    coco = {'images': [{'id': 0, 'file_name': '0.jpg'}, {'id': [1], 'file_name': '1.jpg'}, {'id': 2, 'file_name': 7}],
            'annotations': [{'image_id': 0, 'caption': 'a dog'}, {'image_id': [0], 'caption': 'a cat'},
                            {'image_id': 1, 'caption': 'a car'}, {'image_id': 2, 'caption': 'a mat'}]}
    (folder / 'coco.json').write_text(json.dumps(coco))
    llava = [{'image': '0.jpg', 'conversations': [{'from': 'gpt', 'value': 'a dog'}]},
             {'image': '1.jpg', 'conversations': 3}, {'image': '2.jpg', 'conversations': [{'from': 'gpt', 'value': 4}]},
             {'image': 2.5, 'conversations': [{'from': 'gpt', 'value': 'a dog'}]}]
    (folder / 'llava.json').write_text(json.dumps(llava))
    root = str(folder / 'images')
    with pytest.raises(BadData) as e:
        records(folder / 'coco.json', image_root=root)
    assert 'annotation 1: image_id is a list' in str(e.value) and 'annotation 2' in str(e.value)
    assert 'annotation 3: image name is a int' in str(e.value)
    assert len(records(folder / 'coco.json', image_root=root, skip_bad=True)) == 1
    with pytest.raises(BadData) as e:
        records(folder / 'llava.json', image_root=root)
    assert "entry 1: 'conversations' is a int" in str(e.value) and 'entry 2: caption is a int' in str(e.value)
    assert 'entry 3: image name is a float' in str(e.value)
    assert len(records(folder / 'llava.json', image_root=root, skip_bad=True)) == 1


# ---- the reference, its score cache and the pretrained encoder ----

@pytest.fixture
def tiny_ref(tiny_cfg):
    """A saved (untrained) reference and the encoded training captions it was made for."""
    from data import make_vocab
    from model import GPT, gpt_config
    from reference import save_reference
    cfg = dataclasses.replace(tiny_cfg, n_train=48, n_val=8, n_test=8)
    splits = load_splits(cfg)
    vocab = make_vocab(cfg, splits['train'])
    for split in splits.values():
        split.encode(vocab)
    torch.manual_seed(0)
    save_reference(GPT(gpt_config(cfg, vocab)), vocab, cfg, splits['train'], cfg.ref_ckpt)
    return cfg, splits, vocab


def test_reference_cache_of_the_wrong_shape_is_refused(tiny_ref):
    from reference import ensure_reference
    from runs.reference_files import cache_paths, expected_manifest, load_cache, write_cache
    cfg, splits, vocab = tiny_ref
    _, probs = ensure_reference(cfg, splits['train'], vocab, 'cpu', log=lambda *a: None)
    npy = cache_paths(cfg.ref_ckpt)[0]
    good = np.array(probs)
    manifest = expected_manifest(splits['train'], vocab, cfg.ref_ckpt)
    for wrong in (np.concatenate([good, good]), good[:10]):               # doubled, short
        np.save(npy, wrong)
        with pytest.raises(ValueError, match=f'cache file {npy} is missing, truncated or changed'):
            load_cache(cfg.ref_ckpt, splits['train'], vocab)
        write_cache(wrong, manifest, cfg.ref_ckpt)                        # even with a manifest that fits it
        with pytest.raises(ValueError, match=f'reference cache {npy} holds a float32 array of shape'):
            load_cache(cfg.ref_ckpt, splits['train'], vocab)
    write_cache(good, manifest, cfg.ref_ckpt)
    open(npy, 'wb').write(b'\x93NUMPY torn')
    with pytest.raises(ValueError, match='changed since its manifest'):
        load_cache(cfg.ref_ckpt, splits['train'], vocab)


def test_reference_from_other_data_or_with_changed_weights_is_refused(tiny_ref):
    from reference import ensure_reference
    cfg, splits, vocab = tiny_ref
    quiet = dict(log=lambda *a: None, scored=False)
    ensure_reference(cfg, splits['train'], vocab, 'cpu', **quiet)            # its own data: fine
    with pytest.raises(ValueError, match='made from other data'):
        ensure_reference(cfg, splits['val'], vocab, 'cpu', **quiet)
    ckpt = torch.load(cfg.ref_ckpt, weights_only=True)
    ckpt['model']['wte.weight'][0, 0] += 1
    torch.save(ckpt, cfg.ref_ckpt)
    with pytest.raises(ValueError, match='weights were changed'):
        ensure_reference(cfg, splits['train'], vocab, 'cpu', **quiet)


def test_pretrained_encoder_from_other_data_is_refused(tiny_ref):
    from encoder import ensure_encoder, load_encoder_into
    from model import ViT
    cfg, splits, vocab = tiny_ref
    cfg = dataclasses.replace(cfg, arch='h', init_vision='clip', vision_ckpt=os.path.join(os.path.dirname(cfg.ref_ckpt),
                                                                                          'vit.pt'))
    vit = ViT(cfg.image_size, cfg.patch_size, cfg.vit_layer, cfg.n_head, cfg.vit_embd, cfg.dropout)
    save_checkpoint({'vision': vit.state_dict(), 'data_fingerprint': captions_fingerprint(splits['val']),
                     'weights_sha256': weights_digest(vit.state_dict())}, cfg.vision_ckpt)
    with pytest.raises(ValueError, match='made from other data'):
        ensure_encoder(cfg, splits['train'], vocab, 'cpu', log=lambda *a: None)
    small = ViT(cfg.image_size, cfg.patch_size, cfg.vit_layer, cfg.n_head, 2 * cfg.vit_embd, cfg.dropout)
    with pytest.raises(ValueError, match='does not fit this ViT'):
        load_encoder_into(small, cfg.vision_ckpt)


# ---- out_dir: one run at a time, no overwrite, the log ----

def test_one_run_per_out_dir_and_a_killed_holder_frees_it(tiny_cfg):
    import signal
    import subprocess
    import sys
    from train import train
    os.makedirs(tiny_cfg.out_dir)
    holder = subprocess.Popen([sys.executable, '-c', 'import fcntl, os, sys, time; '
                               'fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); '
                               'print("held", flush=True); time.sleep(60)',
                               tiny_cfg.out_dir], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == 'held\n'                 # another run holds out_dir
    with pytest.raises(RuntimeError, match=f"{tiny_cfg.out_dir} is in use by another run"):
        train(tiny_cfg, log=lambda *a: None)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with claim_dir(tiny_cfg.out_dir):                           # the dead holder left no stuck lock
        pass
    assert os.listdir(tiny_cfg.out_dir) == []


def test_a_new_run_does_not_overwrite_a_checkpoint(tiny_cfg):
    from train import train
    ckpt = os.path.join(tiny_cfg.out_dir, 'ckpt.pt')
    os.makedirs(tiny_cfg.out_dir)
    with pytest.raises(ConfigError, match='no checkpoint at'):                # resume needs one
        train(dataclasses.replace(tiny_cfg, resume=True), log=lambda *a: None)
    open(ckpt, 'wb').write(b'an earlier run')
    with pytest.raises(ConfigError, match='--resume=True'):
        train(tiny_cfg, log=lambda *a: None)
    assert open(ckpt, 'rb').read() == b'an earlier run' and not os.path.exists(tiny_cfg.ref_ckpt)   # nothing ran


def test_resume_log_drops_a_torn_last_line_and_is_replaced_atomically(tmp_path):
    log = str(tmp_path / 'log.jsonl')
    for step in range(1, 6):
        append_log(log, {'step': step, 'train_loss': 1.0})
    with open(log, 'a') as f:
        f.write('{"step": 6, "train_lo')                         # a kill mid-write
    inode = os.stat(log).st_ino
    start_log(log, 4)
    assert [json.loads(line)['step'] for line in open(log)] == [1, 2, 3, 4]
    assert os.stat(log).st_ino != inode                          # a new file renamed over the old one
    append_log(log, {'step': 5})
    with open(log, 'a') as f:
        f.write('{"step": 6}')                                   # whole JSON, but its newline was lost
    start_log(log, 6)
    append_log(log, {'step': 7})
    assert [json.loads(line)['step'] for line in open(log)] == [1, 2, 3, 4, 5, 6, 7]
    open(log, 'w').write('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match='log.jsonl line 2 is not JSON'):
        start_log(log, 2)

