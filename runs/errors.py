"""
How a run ends when it cannot go on: entry points print the message as one line (runs.cli,
print_error) and exit with the error's status. Every error names the setting, file or row at fault.
"""

import hashlib
import os
import signal
import sys
import tempfile
import threading
import time


class ConfigError(ValueError):
    """A mistake in the settings or the input (data, checkpoints, caches): exit status 2."""


class OutDirBusy(RuntimeError):
    """Another run holds this out_dir (one run per out_dir at a time)."""


class RunStopped(RuntimeError):
    """A run that ended early for a cause outside the settings; the message says what happened and
    what was kept. Entry points print it as one line and exit with `status`."""
    status = 3


class Interrupted(RunStopped):
    """SIGTERM or SIGINT: the run saved what it had and stopped (--resume=True continues it)."""
    status = 3


class Diverged(RunStopped):
    """A non-finite loss or gradient: the run stopped without saving the bad weights."""
    status = 4


class StorageError(RunStopped):
    """A write failed (disk full, read-only or missing storage, a path too long): names the path."""
    status = 5


def print_error(message):
    """'error: MESSAGE' on stderr. Under torchrun every rank meets most errors alike: each message is
    printed once per job, with the rank where it happened (rank 0 first, then what another rank met
    alone), and rank 0 lingers a moment so that torchrun, which stops the others once one has ended,
    does not cut another rank's own error off."""
    world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    if world == 1:
        print(f"error: {message}", file=sys.stderr)
        return
    if threading.current_thread() is threading.main_thread():       # stopped by the agent now: said already
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda *a: os._exit(Interrupted.status))
    if rank:
        time.sleep(0.5)
    if first_to_say(message):
        print(f"error: {message} (rank {rank} of {world})", file=sys.stderr, flush=True)
    if not rank:
        time.sleep(1.0)


def first_to_say(message):
    """Whether no other rank of this torchrun job said `message` yet (a file per message, made atomically)."""
    job = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}-{os.getppid()}"     # the ranks of a node share their agent
    folder = os.path.join(tempfile.gettempdir(), f"prior-errors-{hashlib.sha256(job.encode()).hexdigest()[:12]}")
    try:
        os.makedirs(folder, exist_ok=True)
        os.close(os.open(os.path.join(folder, hashlib.sha256(message.encode()).hexdigest()[:16]),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:                              # no temp folder: say it anyway
        pass
    return True
