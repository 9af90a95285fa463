"""prior_loss.debias: PRIOR's tilt p ∝ q w divided out, checked on free categoricals trained to
convergence with the real losses, where the answer is known in closed form."""

from types import SimpleNamespace

import pytest
import torch

from prior_loss import IGNORE, debias, objective, prior_weight, token_nll


def fit(logits_of, params, loss_of):
    """Minimise loss_of(logits_of()) over params to convergence (a convex problem: LBFGS)."""
    opt = torch.optim.LBFGS(params, lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = loss_of(logits_of())
        loss.backward()
        return loss
    for _ in range(5):
        opt.step(closure)


@pytest.mark.parametrize('alpha,floor', [(1.0, 0.0), (2.0, 0.0), (1.0, 0.3)])
def test_batch_normalised_prior_corrected_recovers_the_data(alpha, floor):
    """One context, a data distribution q given as exact counts; 'prior_batch' trains the free logits
    to p ∝ q w, and debias() with the full-vocabulary P_r gives q back."""
    counts = torch.tensor([40, 25, 15, 10, 6, 3, 1])
    q = counts / counts.sum()
    p_ref = torch.tensor([0.9, 0.05, 0.6, 0.01, 0.3, 0.5, 0.2])         # the reference's P_r of each token
    targets = torch.repeat_interleave(torch.arange(7), counts)[None]    # one 'batch' of 100 positions
    theta = torch.zeros(7, requires_grad=True)
    cfg = SimpleNamespace(loss='prior_batch', alpha=alpha, weight_floor=floor, label_smoothing=0.0)
    fit(lambda: theta.expand(1, targets.size(1), 7), [theta],
        lambda logits: objective(cfg, logits, targets, p_ref[targets]))
    learned = torch.log_softmax(theta.detach(), -1)
    tilted = q * prior_weight(p_ref, alpha, floor)
    torch.testing.assert_close(learned.exp(), tilted / tilted.sum(), atol=5e-4, rtol=0)  # the tilt is real
    assert (learned.exp() - q).abs().max() > 0.05
    torch.testing.assert_close(debias(learned, p_ref, alpha, floor).exp(), q, atol=1e-3, rtol=0)


def test_per_caption_prior_keeps_the_stated_residual_tilt():
    """Captions of two tokens (v, u). PRIOR's per-caption factor c = 2 / (w1 + w2) depends on u, so the
    corrected first-token distribution is q1(v) E[c | v] renormalised, not q1: the residual
    prior_loss.py states. Exact counts: q1 = (1, 2, 3, 4)/10, q2(u | v) in quarters."""
    q1 = torch.tensor([1., 2., 3., 4.]) / 10
    q2 = torch.tensor([[1, 1, 1, 1], [3, 1, 0, 0], [0, 2, 2, 0], [1, 0, 0, 3]]) / 4.
    r1 = torch.tensor([0.7, 0.1, 0.4, 0.2])                             # P_r of the first token
    r2 = torch.tensor([[0.1, 0.8, 0.3, 0.5], [0.9, 0.2, 0.5, 0.5], [0.5, 0.05, 0.6, 0.5], [0.3, 0.5, 0.5, 0.95]])
    counts = (q1[:, None] * q2 * 40).round().long()                      # exact: 40 captions
    v, u = torch.nonzero(counts, as_tuple=True)
    v, u = v.repeat_interleave(counts[v, u]), u.repeat_interleave(counts[v, u])
    targets = torch.stack([v, u], dim=1)
    ref_probs = torch.stack([r1[v], r2[v, u]], dim=1)
    theta1, theta2 = torch.zeros(4, requires_grad=True), torch.zeros(4, 4, requires_grad=True)
    cfg = SimpleNamespace(loss='prior', alpha=1.0, weight_floor=0.0, label_smoothing=0.0)
    fit(lambda: torch.stack([theta1.expand(len(v), 4), theta2[v]], dim=1), [theta1, theta2],
        lambda logits: objective(cfg, logits, targets, ref_probs))
    corrected = debias(torch.log_softmax(theta1.detach(), -1), r1).exp()
    c = 2 / ((1 - r1)[:, None] + (1 - r2))                               # the factor of caption (v, u)
    residual = q1 * (q2 * c).sum(1)                                      # q1(v) E[c | v]
    torch.testing.assert_close(corrected, residual / residual.sum(), atol=1e-3, rtol=0)
    assert (corrected - q1).abs().max() > 0.01                           # not q1: the correction is inexact here


def test_alpha_zero_or_a_floor_of_one_is_the_identity():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(3, 5, 11), -1)
    p_ref = torch.softmax(torch.randn(3, 5, 11) * 3, -1)
    torch.testing.assert_close(debias(logp, p_ref, alpha=0.0), logp)
    torch.testing.assert_close(debias(logp, p_ref, alpha=1.0, min_weight=1.0), logp)
    torch.testing.assert_close(debias(logp, p_ref, alpha=2.0, weight_floor=1.0), logp)


def test_it_renormalises_and_divides_out_exactly_the_log_weight():
    torch.manual_seed(1)
    logits = torch.randn(4, 7) * 3                                       # not normalised
    p_ref = torch.softmax(torch.randn(4, 7), -1)
    out = debias(logits, p_ref, alpha=1.0, min_weight=0.2)
    torch.testing.assert_close(out.logsumexp(-1), torch.zeros(4))
    w = (1 - p_ref).clamp(min=0.2)
    torch.testing.assert_close(out, torch.log_softmax(logits - w.log(), -1))
    diff = out - torch.log_softmax(logits, -1)                           # per row: -log w up to a constant
    torch.testing.assert_close(diff + w.log(), (diff + w.log())[:, :1].expand(-1, 7), atol=1e-5, rtol=0)


def test_ignored_positions_and_a_certain_reference_stay_finite():
    """As in the loss: NLL 0 at ignored positions; a reference sure of a token (w = 0, no floor) gives
    a finite, very likely token instead of inf or NaN."""
    logits = torch.zeros(2, 3, 5)
    p_ref = torch.full((2, 3, 5), 0.2)
    p_ref[0, 0] = torch.tensor([1.0, 0, 0, 0, 0])
    targets = torch.tensor([[0, 1, IGNORE], [2, IGNORE, IGNORE]])
    nll = token_nll(debias(logits, p_ref), targets)
    assert torch.isfinite(nll).all() and (nll[targets == IGNORE] == 0).all()
    assert nll[0, 0] < 1e-6                                               # all the mass on the w = 0 token


def test_prior_batch_scales_once_per_batch_and_equals_prior_for_one_caption():
    """'prior_batch' = the raw weights times one factor for the whole batch (mean 1 over its caption
    tokens); with a single caption in the batch it is exactly the per-caption PRIOR."""
    torch.manual_seed(0)
    logits, targets, ref = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5)), torch.rand(2, 5)
    targets[1, 3:] = IGNORE
    cfg = SimpleNamespace(loss='prior_batch', alpha=1.0, weight_floor=0.0, label_smoothing=0.0)
    w = prior_weight(ref) * (targets != IGNORE)
    want = (w * 8 / w.sum() * token_nll(logits, targets)).sum() / 8
    assert torch.allclose(objective(cfg, logits, targets, ref), want)
    per_caption = SimpleNamespace(loss='prior', alpha=1.0, weight_floor=0.0, label_smoothing=0.0)
    assert not torch.allclose(objective(cfg, logits, targets, ref), objective(per_caption, logits, targets, ref))
    assert torch.allclose(objective(cfg, logits[:1], targets[:1], ref[:1]),
                          objective(per_caption, logits[:1], targets[:1], ref[:1]))
