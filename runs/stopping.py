"""
Stopping a run early, cleanly: on SIGTERM (what torchrun, Slurm and Kubernetes send before a kill)
or SIGINT (Ctrl-C), one handler for both; and on a loss or gradient that is not finite.

In the training loop a signal only raises a flag: the step in progress finishes, every process
learns of it at the end of that step (one all-reduce of one number, so all stop after the same
step), the master writes a checkpoint, and the run ends with one line. Anywhere else (data, the
reference, the final eval) the signal stops the run at once: every file is written atomically,
so nothing is left half-written. A second signal while the loop winds down stops it at once.
DataLoader workers ignore both signals (a Ctrl-C reaches them too); the main process ends them.
"""

import signal
import threading

import torch

from runs.devices import any_process, barrier
from runs.errors import Diverged, Interrupted
from runs.startup import SIGNALS

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

    def stop_if_requested(self, step, ckpt_path, check, save=None):
        """At the end of a step of the training loop: if any process received a signal, check() the
        weights, save() them (the master, unless this step saved already), and all stop together."""
        if not self.requested():
            return
        check()
        if save:
            save()
        barrier()                                # the others wait for the master's checkpoint
        raise Interrupted(f"stopped by {self.received or 'a signal to another process'} after step {step}: "
                          f"{ckpt_path} holds it; --resume=True continues the run")


def ignore_stop_signals(worker_id=None):
    """A DataLoader worker's init: leave SIGTERM and SIGINT to the main process."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class FiniteGuard:
    """The first step whose loss or gradient was not finite, kept on the device (noting it costs no
    sync). check() reads it, so call it where the loop waits for the device anyway: it stops the run
    without saving the bad weights, naming the last good checkpoint."""

    def __init__(self, max_iters, device):
        self.max_iters = max_iters
        self.first_bad = torch.tensor(max_iters + 1, device=device)

    def note(self, loss_sum, step):
        """loss_sum: the step's loss, NaN if its gradient was not finite (train.train_step)."""
        seen = self.first_bad <= self.max_iters
        self.first_bad = torch.where(torch.isfinite(loss_sum) | seen, self.first_bad, step)

    def check(self, saved_step, ckpt_path):
        bad = int(self.first_bad)
        if bad <= self.max_iters:
            kept = f"the last good checkpoint, step {saved_step}, is {ckpt_path}" if saved_step is not None else \
                "no checkpoint was written before it"
            raise Diverged(f"the loss or gradient became NaN or infinite at step {bad}; stopped without saving; "
                           f"{kept} (a lower --learning_rate or a --grad_clip may help)")
