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

Beyond PRIOR (not in the paper; docs/beyond-prior.md): (1 - P_r) cannot tell a token that needs
the image from one nothing predicts (a name). The image's gain g_i = log p(t_i | image, t_<i) -
log P_r(t_i | t_<i) (detached) can: 'gain' weighs 1 + min(max(g_i, 0), 1) (NTP, up to doubled where
the image helps), 'prior_gain' (1 - P_r)^alpha * 2 sigmoid(g_i); both mean 1 per caption.
'prior_batch' is PRIOR with its weights scaled to mean 1 over the whole batch instead of per caption.

Debiased PRIOR (not in the paper; docs/beyond-prior.md). For one prefix h, the weighted loss
-sum_v q(v|h) w(v|h) log p(v|h) is smallest at p(v|h) ∝ q(v|h) w(v|h), not at the data's q: PRIOR
learns the captions tilted towards what the reference finds unlikely. The weight of every token v
after h comes from the frozen reference, so the tilt can be divided out when the model is used
(post-hoc logit adjustment: Menon et al., ICLR 2021):

    log p~(v|h) = log p(v|h) - log w(v|h) - log sum_u p(u|h) / w(u|h),    w = max(w_run, min_weight)

with w_run the run's own raw weight (alpha, floor) of v from P_r over the whole vocabulary, and a
floor min_weight because tokens with w near 0 got almost no gradient. It is exact for 'prior_batch'
up to one token's share of its batch's sum of weights (~1/400 at 32 captions): a factor shared by
the batch barely depends on any one token, so it does not tilt. PRIOR's per-caption factor c = k / sum_j w_j depends on
the whole caption, so there the minimiser is p ∝ q w E[c | h, v], and the corrected model keeps a
residual tilt E[c | h, v] / E[c | h]: small where the rest of a caption weighs about the same
whatever v is (docs/beyond-prior.md measures it).

Read next: reference.py, which trains P_r and scores the captions.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -1           # the one ignore index of the project: targets that are not caption tokens
FALLBACK_EPS = 1e-6   # a caption whose raw weights sum below this (for PRIOR: the reference is
                      # sure of every token) falls back to NTP weights instead of dividing by ~0


@dataclass(frozen=True)
class Loss:
    reads_reference: bool     # its weights come from the reference's cached P_r
    needs_classes: bool       # its weights come from the true token classes (the built-in shapes data only)


# Every objective by name (--loss), and what it reads besides the LVLM's logits and the targets.
# The ceilings 'oracle' (weight 1 on image-relevant tokens, 0 elsewhere) and 'label' (relevant
# tokens weigh twice the rest) are PRIOR with a P_r made from the true classes (train.py).
LOSSES = {'ntp': Loss(False, False), 'prior': Loss(True, False), 'prior_batch': Loss(True, False),
          'gain': Loss(True, False), 'prior_gain': Loss(True, False), 'oracle': Loss(False, True),
          'label': Loss(False, True)}
TILTED = ('prior', 'prior_batch')     # the objectives whose tilt debias() divides out


def objective(cfg, logits, targets, ref_probs=None, n_tokens=None):
    """The training loss cfg.loss: NTP without P_r; 'gain' or 'prior_gain'; else PRIOR with cfg's
    alpha and weight floor (the ceilings too, given their P_r); each token's NLL label-smoothed by
    cfg.label_smoothing. n_tokens: caption tokens of the whole step, when this is one micro-batch of it."""
    s = cfg.label_smoothing
    if ref_probs is None:
        return ntp_loss(logits, targets, n_tokens, smoothing=s)
    if cfg.loss in ('gain', 'prior_gain'):
        return gain_loss(logits, targets, ref_probs, cfg.loss, cfg.alpha, n_tokens, smoothing=s)
    if cfg.loss == 'prior_batch':
        weights = batch_mean_one(prior_weight(ref_probs, cfg.alpha, cfg.weight_floor), targets)
        return weighted_loss(logits, targets, weights, n_tokens, smoothing=s)
    return prior_loss(logits, targets, ref_probs, cfg.alpha, cfg.weight_floor, n_tokens, smoothing=s)


def token_nll(logits, targets, smoothing=0.0):
    """Per-position NLL in float32, [B,T]; 0 at ignored positions. smoothing s > 0 (training only)
    gives (1 - s) * NLL + s * the mean NLL over the whole vocabulary."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction='none',
                          label_smoothing=smoothing)
    return nll.view_as(targets)


def _count(targets, n_tokens):
    return (targets != IGNORE).sum().clamp(min=1) if n_tokens is None else n_tokens


def ntp_loss(logits, targets, n_tokens=None, smoothing=0.0):
    """Summed NLL over caption tokens, divided by their count (or n_tokens). logits [B,T,V], targets [B,T] -> 0-dim."""
    return token_nll(logits, targets, smoothing).sum() / _count(targets, n_tokens)


@torch.no_grad()
def prior_weight(ref_probs, alpha=1.0, weight_floor=0.0):
    """The raw PRIOR weight of tokens the reference gives probability ref_probs (any shape):
    (1 - P_r)^alpha. weight_floor (not in the paper; 0 is the paper's PRIOR) mixes NTP back in,
    w = floor + (1 - floor) * (1 - P_r)^alpha, so no caption token is ever abandoned; 1 is NTP."""
    w = (1.0 - ref_probs.float().clamp(0.0, 1.0)) ** alpha             # the paper's line
    return weight_floor + (1.0 - weight_floor) * w


@torch.no_grad()
def token_weights(ref_probs, targets, alpha=1.0, weight_floor=0.0):
    """PRIOR weights [B,T]: the raw weights scaled to mean 1 over each caption's tokens, 0 elsewhere."""
    return per_caption_mean_one(prior_weight(ref_probs, alpha, weight_floor), targets)


@torch.no_grad()
def per_caption_mean_one(w, targets):
    """Raw weights [B,T] scaled to mean 1 over each caption's tokens, 0 elsewhere."""
    mask = targets != IGNORE
    w = w * mask
    k = mask.sum(dim=1, keepdim=True)                                   # caption tokens per row
    total = w.sum(dim=1, keepdim=True)
    fallback = total < FALLBACK_EPS                                     # every raw weight ~0: NTP row
    w = torch.where(fallback, mask.float(), w)
    total = torch.where(fallback, k.float(), total)
    return w * k / total.clamp(min=FALLBACK_EPS)


@torch.no_grad()
def batch_mean_one(w, targets):
    """Raw weights [B,T] scaled to mean 1 over all caption tokens of the batch, 0 elsewhere ('prior_batch')."""
    mask = targets != IGNORE
    w = w * mask
    total = w.sum()
    return w * mask.sum() / total if total >= FALLBACK_EPS else mask.float()


def prior_loss(logits, targets, ref_probs, alpha=1.0, weight_floor=0.0, n_tokens=None, smoothing=0.0):
    """sum(w * nll) / (caption tokens, or n_tokens). logits [B,T,V], targets/ref_probs [B,T] -> 0-dim."""
    return weighted_loss(logits, targets, token_weights(ref_probs, targets, alpha, weight_floor), n_tokens, smoothing)


@torch.no_grad()
def gain_weights(nll, targets, ref_probs, loss, alpha=1.0):
    """The weights [B,T] of loss 'gain' or 'prior_gain' (see the top of this file), mean 1 per caption,
    from the LVLM's own per-token NLL of this step and the reference's probabilities."""
    if loss not in ('gain', 'prior_gain'):
        raise ValueError(f"gain_weights: loss must be 'gain' or 'prior_gain', got {loss!r}")
    gain = -nll.float() - ref_probs.float().clamp(min=1e-30).log()     # log p(t | image) - log P_r(t)
    if loss == 'gain':
        return per_caption_mean_one(1.0 + gain.clamp(0.0, 1.0), targets)
    return per_caption_mean_one((1.0 - ref_probs.float().clamp(0.0, 1.0)) ** alpha * 2 * torch.sigmoid(gain), targets)


def gain_loss(logits, targets, ref_probs, loss, alpha=1.0, n_tokens=None, smoothing=0.0):
    """The 'gain' or 'prior_gain' objective: one NLL pass gives both the loss and (detached) the weights
    (the weights always from the plain NLL, so a second pass when the loss is smoothed)."""
    nll = token_nll(logits, targets)
    weights = gain_weights(nll.detach(), targets, ref_probs, loss, alpha)
    if smoothing:
        nll = token_nll(logits, targets, smoothing)
    return (weights * nll).sum() / _count(targets, n_tokens)


def weighted_loss(logits, targets, weights, n_tokens=None, smoothing=0.0):
    """sum(weights * nll) / (caption tokens, or n_tokens)."""
    return (weights * token_nll(logits, targets, smoothing)).sum() / _count(targets, n_tokens)


def debias(logp, ref_probs, alpha=1.0, weight_floor=0.0, min_weight=0.0):
    """PRIOR's tilt divided out of next-token log-probabilities logp [...,V] (see the top of this file),
    given the reference's probabilities ref_probs [...,V] of every token after the same prefix and
    the run's alpha and weight floor; renormalised over the vocabulary."""
    w = prior_weight(ref_probs, alpha, weight_floor).clamp(min=max(min_weight, 1e-30))
    return torch.log_softmax(logp.float() - w.log(), dim=-1)
