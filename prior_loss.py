r"""
The PRIOR objective, in one place. It needs nothing but torch.

Next-token prediction (NTP) gives every caption token the same weight:

    L_NTP = - 1/k \sum_i log p(t_i | image, t_<i)

PRIOR first trains a text-only reference LM P_r on the captions (no images), then weights
each caption token by how badly the reference predicts it, i.e. by how much the image is
needed to predict it:

    w_i     = (1 - P_r(t_i | t_<i)) ** alpha                      (alpha = 1 in the paper)
    L_PRIOR = - \sum_i  (k * w_i / \sum_j w_j) * log p(t_i | image, t_<i) / k

The weights are normalised inside each caption to mean 1 over its k caption tokens (every
position with a target: the caption's tokens and the closing end-of-text), so alpha = 0
gives w_i = 1 and L_PRIOR = L_NTP exactly. They are constants: no gradient flows into them
(the reference is frozen and its probabilities are cached).

`targets` already hold the next token of each position (the label shift is done once, in
data.py) and IGNORE marks positions that are not caption tokens (image prefix, padding).
The loss divides by the number of caption tokens in the batch, or by `n_tokens` when the
batch is one micro-batch of a larger step (gradient accumulation, DDP): dividing every part
by the whole step's count makes the step's loss the same however it is cut.
"""

import torch
import torch.nn.functional as F

IGNORE = -1           # the one ignore index of the project: targets that are not caption tokens
FALLBACK_EPS = 1e-6   # a caption whose weights sum below this (the reference is sure of
                      # every token) falls back to NTP weights instead of dividing by ~0


def token_nll(logits, targets):
    """Per-position NLL in float32, [B,T]; 0 at ignored positions."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction='none')
    return nll.view_as(targets)


def _count(targets, n_tokens):
    return (targets != IGNORE).sum().clamp(min=1) if n_tokens is None else n_tokens


def ntp_loss(logits, targets, n_tokens=None):
    """Summed NLL over caption tokens, divided by their count (or n_tokens). logits [B,T,V], targets [B,T] -> 0-dim."""
    return token_nll(logits, targets).sum() / _count(targets, n_tokens)


@torch.no_grad()
def token_weights(ref_probs, targets, alpha=1.0, weight_floor=0.0):
    """PRIOR weights [B,T]: (1 - P_r)^alpha scaled to mean 1 over each caption's tokens, 0 elsewhere.

    weight_floor (not in the paper; 0 is the paper's PRIOR) mixes NTP back in before normalising,
    w = floor + (1 - floor) * (1 - P_r)^alpha, so no caption token is ever abandoned; 1 is NTP."""
    mask = targets != IGNORE
    w = (1.0 - ref_probs.float().clamp(0.0, 1.0)) ** alpha             # the paper's line
    w = (weight_floor + (1.0 - weight_floor) * w) * mask
    k = mask.sum(dim=1, keepdim=True)                                   # caption tokens per row
    total = w.sum(dim=1, keepdim=True)
    fallback = total < FALLBACK_EPS                                     # reference sure of everything: NTP row
    w = torch.where(fallback, mask.float(), w)
    total = torch.where(fallback, k.float(), total)
    return w * k / total.clamp(min=FALLBACK_EPS)


def prior_loss(logits, targets, ref_probs, alpha=1.0, weight_floor=0.0, n_tokens=None):
    """sum(w * nll) / (caption tokens, or n_tokens). logits [B,T,V], targets/ref_probs [B,T] -> 0-dim."""
    weights = token_weights(ref_probs, targets, alpha, weight_floor)
    return (weights * token_nll(logits, targets)).sum() / _count(targets, n_tokens)
