"""
A run's files on disk, written so that nothing is lost or torn and nothing foreign is trusted:
every file is written to a unique temp name and renamed (a kill mid-write leaves the old file or
the new one), checkpoints are read with weights_only=True (loading one never runs pickled code)
and refused with one clear line if empty, torn or of another kind, built files (the reference,
the pretrained encoder) are refused if their weights changed or they were made from other data,
builds and runs are locked (the OS frees a lock if its holder dies), and log.jsonl is appended
line by line and, on resume, cut back atomically.
"""

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import pickle
import socket
import uuid

import torch

from config import ConfigError, OutDirBusy
from model import GPT, hf_gpt2_transformers

def temp_path(path):
    """A temp name beside `path`, unique to this process and call: PATH.tmp.HOST.PID.RANDOM."""
    return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def remove_stale_temps(path):
    """Delete temp files of `path` left by killed processes of this host (a live one's are kept)."""
    for tmp in glob.glob(glob.escape(path) + '.tmp.*'):
        host, _, pid = tmp[len(path) + 5:].rpartition('.')[0].rpartition('.')
        if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)                 # raises if no such process
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        except PermissionError:                  # alive, another user's
            pass


def atomic_write(path, write):
    """Call write(temp_path) and then rename it to `path`: readers see the old file or the new one."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def save_checkpoint(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path, map_location='cpu', required=(), mmap=False):
    """A checkpoint's dict; one clear ValueError if the file is not one (empty, torn, foreign, unsafe).
    mmap: tensors are read from disk only when used (eval.py never reads the optimizer state)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise ConfigError(f"checkpoint {path} is not a plain PyTorch checkpoint (not one at all, or it would "
                         f"run code when loaded); refused without loading it") from None
    except (EOFError, RuntimeError, OSError) as e:
        raise ConfigError(f"checkpoint {path} is empty, truncated or not a PyTorch checkpoint "
                         f"({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        raise ConfigError(f"checkpoint {path} is not the kind expected here (it lacks some of {list(required)})")
    return ckpt


def weights_digest(state_dict):
    """sha256 of a state dict's names, shapes and values: tells whether weights were changed."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_origin(ckpt, path, weights, **fingerprints):
    """Refuse a built checkpoint (the reference, the pretrained encoder) whose weights `ckpt[weights]`
    changed after it was saved, or that was made from other data than `fingerprints` describe.
    Files saved before a digest or fingerprint was stored are not refused for lacking it."""
    if 'weights_sha256' in ckpt and ckpt['weights_sha256'] != weights_digest(ckpt[weights]):
        raise ConfigError(f"{path}: its weights were changed after it was saved; delete it to have it rebuilt")
    wrong = [name for name, value in fingerprints.items() if name in ckpt and ckpt[name] != value]
    if wrong:
        raise ConfigError(f"{path} was made from other data than this run's ({', '.join(wrong)} differ); delete "
                         f"it to have it rebuilt, or pass the one made for this data")


@contextlib.contextmanager
def exclusive(path):
    """Hold an exclusive lock beside `path` while building it, so that a second process asking for
    the same file waits and then finds it built. The OS releases the lock if the holder dies."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path + '.lock', 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def claim_dir(path):
    """Hold a lock on the folder `path` (created if needed) or fail at once if another process
    holds it. The lock is on the folder itself, so it adds no file; the OS releases it if the holder dies."""
    os.makedirs(path, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutDirBusy(f"{path} is in use by another run (one run per out_dir at a time); wait for it "
                               f"or pick another --out_dir") from None
        yield
    finally:
        os.close(fd)


def check_out_dir(cfg):
    """A new run must not overwrite a checkpoint, and a resumed one needs one: say so before any work."""
    ckpt_path = os.path.join(cfg.out_dir, 'ckpt.pt')
    if os.path.exists(ckpt_path) and not cfg.resume:
        raise ConfigError(f"{ckpt_path} exists: pass --resume=True to continue that run, or another "
                              f"--out_dir (or delete it) to start a new one")
    if cfg.resume and not os.path.exists(ckpt_path):
        raise ConfigError(f"--resume=True, but there is no checkpoint at {ckpt_path}")


def start_log(log_path, step):
    """Keep what was logged up to `step` (a resumed run drops what came after its checkpoint, and
    a last line that a kill cut short). Replaced in one rename, so a kill meanwhile loses nothing."""
    lines, kept = [], []
    if step and os.path.exists(log_path):
        with open(log_path) as f:
            lines = f.readlines()
    for n, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):                  # torn by a kill mid-write
                break
            raise ConfigError(f"{log_path} line {n} is not JSON; repair or delete that line to resume") from None
        if record['step'] <= step:
            kept.append(line.rstrip('\n') + '\n')

    def write(tmp):
        with open(tmp, 'w') as f:
            f.writelines(kept)

    atomic_write(log_path, write)


def append_log(log_path, record):
    with open(log_path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def load_hf_gpt2_into(gpt, name):
    """Initialise `gpt` (same shape, any block_size up to the checkpoint's) from Hugging Face
    weights: a hub name (needs network or a local HF cache) or a save_pretrained() folder."""
    state = GPT.from_hf_gpt2(hf_gpt2_transformers().GPT2LMHeadModel.from_pretrained(name)).state_dict()
    if len(state['wpe.weight']) < gpt.config.block_size:
        raise ConfigError(f"block_size {gpt.config.block_size} exceeds the {len(state['wpe.weight'])} "
                         f"positions of {name}")
    state['wpe.weight'] = state['wpe.weight'][:gpt.config.block_size]
    gpt.load_state_dict(state)
