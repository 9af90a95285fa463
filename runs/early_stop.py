"""
Early stopping on val loss (the `patience` setting; 0 = off): the run keeps the weights of its best
val loss so far in best.pt, a checkpoint that eval.py and sample.py read like ckpt.pt, and stops once
val loss has not improved for `patience` evaluations in a row. The final test evaluation reads best.pt.
The state travels in ckpt.pt, so a resumed run stops where the uninterrupted one would have.
"""

import math
import os

import torch
import torch.distributed as dist


def best_path(out_dir):
    return os.path.join(out_dir, 'best.pt')


class EarlyStop:
    def __init__(self, patience, state=None):
        self.patience = patience
        state = state or {}
        self.best_loss = state.get('best_loss', math.inf)
        self.best_step = state.get('best_step')
        self.evals_since = state.get('evals_since', 0)    # evaluations since the best

    def state(self):
        return {'best_loss': self.best_loss, 'best_step': self.best_step, 'evals_since': self.evals_since}

    def improved(self, step, val_loss):
        """Note one evaluation: True when its val loss is the best so far (keep these weights). A NaN
        loss never is."""
        if val_loss < self.best_loss:
            self.best_loss, self.best_step, self.evals_since = val_loss, step, 0
            return True
        self.evals_since += 1
        return False

    @property
    def done(self):
        return self.patience > 0 and self.evals_since >= self.patience

    def everyone_stops(self, device, ddp):
        """Whether every process stops now: the master alone evaluated, so it tells the others."""
        stop = torch.tensor([self.done], device=device)
        if ddp:
            dist.broadcast(stop, 0)
        return bool(stop.item())
