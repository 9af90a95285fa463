"""
A run's files on disk, written so that nothing is lost or torn and nothing foreign is trusted:
every file is written to a unique temp name, flushed to the disk and renamed (a kill or a power cut
mid-write leaves the old file or the new one; a failed write, one line naming the file), caches of
several files are committed by a manifest written last and checked on every read, checkpoints
are read with weights_only=True (loading one never runs pickled code) and refused with one clear
line if empty, torn or of another kind, built files (the reference,
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
import warnings

import torch

from runs.errors import ConfigError, OutDirBusy, RunStopped, StorageError


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
            with contextlib.suppress(OSError):   # gone already, or read-only storage
                os.remove(tmp)
        except PermissionError:                  # alive, another user's
            pass


def storage_error(path, e):
    """A failed write (disk full, read-only storage, a path too long or through a file) as one line."""
    return StorageError(f"cannot write {path}: {e.strerror or e}")


def atomic_write(path, write):
    """Call write(f) on a binary temp file beside `path`, flush it to the disk and rename it to `path`:
    readers see the old file or the new one. A failed write leaves the old file and no temp file."""
    tmp = temp_path(path)
    try:
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        remove_stale_temps(path)
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())                 # on the disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise storage_error(path, e) from None
        raise


def save_checkpoint(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, map_location='cpu', required=(), mmap=False):
    """A checkpoint's dict; one clear ValueError if the file is not one (empty, torn, foreign, unsafe).
    mmap: tensors are read from disk only when used (eval.py never reads the optimizer state)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():          # a foreign file's odd pickle protocol: the line below says it
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise ConfigError(f"checkpoint {path} is not a plain PyTorch checkpoint (not one at all, or it would "
                         f"run code when loaded); refused without loading it") from None
    except RunStopped:                           # a signal while reading: the file is not to blame
        raise
    except Exception as e:                       # whatever a torn or foreign file trips the unpickler on
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
    the same file waits and then finds it built. The OS releases the lock if the holder dies. On
    read-only storage there is no lock: a complete cache there is read, and a build fails naming its file."""
    try:
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        f = open(path + '.lock', 'a')
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def claim_dir(path):
    """Hold a lock on the folder `path` (created if needed) or fail at once if another process
    holds it; a folder that cannot be made or written is refused here, before any work. The lock is
    on the folder itself, so it adds no file; the OS releases it if the holder dies."""
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"out_dir {path} is a file (or lies under one), not a folder") from None
    except OSError as e:
        raise StorageError(f"cannot create out_dir {path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutDirBusy(f"{path} is in use by another run (one run per out_dir at a time); wait for it "
                               f"or pick another --out_dir") from None
        probe = os.path.join(path, '.writable')
        try:                                     # read-only storage or a full disk: refused now, not later
            with open(probe, 'wb') as f:
                f.write(b'.')
                os.fsync(f.fileno())
            os.remove(probe)
        except OSError as e:
            raise StorageError(f"out_dir {path} is not writable ({e.strerror})") from None
        yield
    finally:
        os.close(fd)


def checkpoint_path(out_dir):
    """The checkpoint of the run in out_dir (train.py writes it; eval.py and sample.py read it)."""
    return os.path.join(out_dir, 'ckpt.pt')


def check_out_dir(cfg):
    """A new run must not overwrite a checkpoint, and a resumed one needs one: say so before any work."""
    ckpt_path = checkpoint_path(cfg.out_dir)
    if os.path.exists(ckpt_path) and not cfg.resume:
        raise ConfigError(f"{ckpt_path} exists: pass --resume=True to continue that run, or another "
                              f"--out_dir (or delete it) to start a new one")
    if cfg.resume and not os.path.isfile(ckpt_path):
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

    atomic_write(log_path, lambda f: f.write(''.join(kept).encode()))


def append_log(log_path, record):
    try:
        with open(log_path, 'a') as f:
            f.write(json.dumps(record) + '\n')
    except OSError as e:
        raise storage_error(log_path, e) from None


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()
