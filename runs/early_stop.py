"""
Early stopping (the `patience` setting; 0 = off): the run keeps the weights of its best val value so
far in best.pt, a checkpoint that eval.py and sample.py read like ckpt.pt, and stops once that value
has not improved for `patience` evaluations in a row. The final test evaluation reads best.pt.
The value is val loss by default; `stop_on` names another teacher-forced val metric. PRIOR's plain
val loss is a poor judge of PRIOR: its optimum is p ∝ q·w, not q, so the loss of the tokens it
down-weights can rise while the image is still being learned. The state travels in ckpt.pt, so a
resumed run stops where the uninterrupted one would have.
"""

import math
import os

import torch
import torch.distributed as dist

# The val metrics a run can stop on, and whether higher is better: loss_relevant and attr_acc need the
# shapes data's token classes and attributes, retrieval by likelihood ratio a reference (eval.py).
STOP_METRICS = {'loss': False, 'loss_relevant': False, 'attr_acc': True, 'retrieval_ratio_r1': True}


def best_path(out_dir):
    return os.path.join(out_dir, 'best.pt')


class EarlyStop:
    def __init__(self, patience, metric='loss', state=None):
        self.patience, self.metric, self.higher = patience, metric, STOP_METRICS[metric]
        state = state or {}
        self.best = state.get('best', -math.inf if self.higher else math.inf)
        self.best_step = state.get('best_step')
        self.evals_since = state.get('evals_since', 0)    # evaluations since the best

    def state(self):
        return {'metric': self.metric, 'best': self.best, 'best_step': self.best_step,
                'evals_since': self.evals_since}

    def improved(self, step, value):
        """Note one evaluation: True when its value is the best so far (keep these weights). A NaN never is,
        nor a tie."""
        if (value > self.best) if self.higher else (value < self.best):
            self.best, self.best_step, self.evals_since = value, step, 0
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
