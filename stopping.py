"""
Stopping a run cleanly on SIGTERM (what torchrun, Slurm and Kubernetes send before a kill) or
SIGINT (Ctrl-C), one handler for both.

In the training loop a signal only raises a flag: the step in progress finishes, every process
learns of it at the end of that step (one all-reduce of one number, so all stop after the same
step), the master writes a checkpoint, and the run ends with one line. Anywhere else (data, the
reference, the final eval) the signal stops the run at once: every file is written atomically,
so nothing is left half-written. A second signal while the loop winds down stops it at once.
DataLoader workers ignore both signals (a Ctrl-C reaches them too); the main process ends them.
"""

import signal
import threading

from config import Interrupted
from device import any_process

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """Context manager: while inside, SIGTERM and SIGINT stop the run (see above). While `deferring`
    (the training loop), a signal only sets the flag that requested() reads; `where` says, in the
    message of an immediate stop, what was kept."""

    def __init__(self):
        self.received, self.deferring, self.where, self.previous = None, False, '', {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():      # Python handles signals there only
            self.previous = {s: signal.signal(s, self.handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.deferring and self.received is None:
            self.received = name
            return
        raise Interrupted(f"stopped by {name}" + (f" {self.where}" if self.where else ''))

    def requested(self):
        """Whether this or any other process received a signal (the same answer on every process)."""
        return any_process(self.received is not None)


def ignore_stop_signals(worker_id=None):
    """A DataLoader worker's init: leave SIGTERM and SIGINT to the main process."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
