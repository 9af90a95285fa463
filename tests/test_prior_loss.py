import pytest
import torch
import torch.nn.functional as F

from config import Config
from prior_loss import IGNORE, gain_loss, gain_weights, ntp_loss, objective, prior_loss, token_nll, token_weights


def make_batch(B=3, T=7, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 5:] = IGNORE                      # padding at the end
    targets[1, :2] = IGNORE                      # ignored prefix
    ref_probs = torch.rand(B, T, generator=g)
    return logits, targets, ref_probs


def test_ntp_is_mean_nll_over_caption_tokens():
    logits, targets, _ = make_batch()
    mask = targets != IGNORE
    expected = F.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(ntp_loss(logits, targets), expected)


def test_alpha_zero_is_exactly_ntp():
    logits, targets, ref_probs = make_batch()
    assert torch.equal(prior_loss(logits, targets, ref_probs, alpha=0.0), ntp_loss(logits, targets))


def test_weights_follow_the_paper_formula():
    _, targets, ref_probs = make_batch()
    for alpha in (0.5, 1.0, 2.0):
        w = token_weights(ref_probs, targets, alpha)
        for b in range(targets.size(0)):
            m = targets[b] != IGNORE
            raw = (1 - ref_probs[b][m]) ** alpha
            torch.testing.assert_close(w[b][m], m.sum() * raw / raw.sum())
            assert (w[b][~m] == 0).all()
            torch.testing.assert_close(w[b][m].mean(), torch.tensor(1.0))


def test_prior_loss_is_weighted_sum_over_all_caption_tokens():
    logits, targets, ref_probs = make_batch()
    w = token_weights(ref_probs, targets, 1.0)
    mask = targets != IGNORE
    nll = -torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    expected = (w * nll)[mask].sum() / mask.sum()
    torch.testing.assert_close(prior_loss(logits, targets, ref_probs), expected)


def test_confident_reference_row_falls_back_to_ntp_weights():
    _, targets, ref_probs = make_batch()
    ref_probs[2] = 1.0                           # the reference is sure of every token
    w = token_weights(ref_probs, targets, 1.0)
    m = targets[2] != IGNORE
    assert torch.equal(w[2][m], torch.ones(int(m.sum())))
    assert torch.isfinite(w).all()


def test_ignored_positions_do_not_matter():
    logits, targets, ref_probs = make_batch()
    base = prior_loss(logits, targets, ref_probs)
    logits2, ref2 = logits.clone(), ref_probs.clone()
    ignored = targets == IGNORE
    logits2[ignored] = 100 * torch.randn_like(logits2[ignored])
    ref2[ignored] = 0.0
    torch.testing.assert_close(prior_loss(logits2, targets, ref2), base)


def test_weights_carry_no_gradient_and_upweight_hard_tokens():
    logits, targets, ref_probs = make_batch()
    logits.requires_grad_(True)
    ref_probs.requires_grad_(True)
    prior_loss(logits, targets, ref_probs).backward()
    assert ref_probs.grad is None and logits.grad is not None
    # a token the reference finds hard (p small) gets more weight than an easy one
    targets = torch.tensor([[1, 2, 3]])
    w = token_weights(torch.tensor([[0.9, 0.1, 0.5]]), targets)
    assert w[0, 1] > w[0, 2] > w[0, 0]


def test_bf16_logits_give_float32_loss():
    logits, targets, ref_probs = make_batch()
    loss = prior_loss(logits.bfloat16(), targets, ref_probs)
    assert loss.dtype == torch.float32


def test_weight_floor_mixes_in_ntp():
    logits, targets, ref_probs = make_batch()
    assert torch.equal(prior_loss(logits, targets, ref_probs, weight_floor=1.0), ntp_loss(logits, targets))
    assert torch.equal(prior_loss(logits, targets, ref_probs, weight_floor=0.0), prior_loss(logits, targets, ref_probs))
    # floor 0.2: 0.2 + 0.8 * (1 - [0, .5, 1]) = [1, .6, .2], to mean 1 over 3 tokens: 3 * [1, .6, .2] / 1.8
    w = token_weights(torch.tensor([[0.0, 0.5, 1.0, 0.3]]), torch.tensor([[1, 2, 3, IGNORE]]), 1.0, weight_floor=0.2)
    torch.testing.assert_close(w, torch.tensor([[5 / 3, 1.0, 1 / 3, 0.0]]))


# ---- beyond PRIOR: the gain weightings ----

def own_probs(logits, targets):
    """The model's own probability of each target: a reference that knows exactly what the LVLM knows."""
    return torch.softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)


def test_gain_is_ntp_where_the_image_adds_nothing():
    logits, targets, _ = make_batch()
    # the reference as good as the LVLM (gain 0) or better (gain < 0): every weight 1
    torch.testing.assert_close(gain_loss(logits, targets, own_probs(logits, targets), 'gain'), ntp_loss(logits, targets))
    assert torch.equal(gain_loss(logits, targets, torch.ones(targets.shape), 'gain'), ntp_loss(logits, targets))


def test_prior_gain_is_prior_where_the_image_adds_nothing():
    logits, targets, _ = make_batch()
    ref = own_probs(logits, targets)
    torch.testing.assert_close(gain_loss(logits, targets, ref, 'prior_gain'), prior_loss(logits, targets, ref))
    torch.testing.assert_close(gain_loss(logits, targets, ref, 'prior_gain', alpha=0.0), ntp_loss(logits, targets))


def test_gain_weights_follow_their_formulas():
    logits, targets, ref_probs = make_batch()
    nll = token_nll(logits, targets)
    gain = -nll - ref_probs.log()
    for loss, raw in (('gain', 1 + gain.clamp(0, 1)), ('prior_gain', (1 - ref_probs) * 2 * torch.sigmoid(gain))):
        w = gain_weights(nll, targets, ref_probs, loss)
        for b in range(targets.size(0)):
            m = targets[b] != IGNORE
            torch.testing.assert_close(w[b][m], m.sum() * raw[b][m] / raw[b][m].sum())
            assert (w[b][~m] == 0).all()
    with pytest.raises(ValueError, match="'gain' or 'prior_gain'"):    # a typo is not silently prior_gain
        gain_weights(nll, targets, ref_probs, 'gian')


def test_gain_upweights_what_the_image_explains_not_what_nothing_predicts():
    """Three tokens the reference finds equally hard (P_r = 0.1); the image makes the first certain and
    leaves the second and third as hard as without it (a name nothing predicts). PRIOR weighs them
    alike; both gain weightings put the first above the others."""
    targets = torch.tensor([[0, 1, 2]])
    logits = torch.full((1, 3, 10), -10.0)
    logits[0, 0, 0] = 10.0                                   # p(t_0 | image) ~ 1
    logits[0, 1, :] = 0.0
    logits[0, 1, 1] = torch.log(torch.tensor(0.1 * 9 / 0.9))     # p(t_1 | image) = 0.1 = P_r
    logits[0, 2] = logits[0, 1].roll(1)                      # the same for t_2
    ref = torch.full((1, 3), 0.1)
    nll = token_nll(logits, targets)
    for loss in ('gain', 'prior_gain'):
        w = gain_weights(nll, targets, ref, loss)
        assert w[0, 0] > w[0, 1] and w[0, 1] == pytest.approx(w[0, 2].item(), rel=1e-5)
    assert torch.allclose(token_weights(ref, targets), torch.ones(1, 3))


def test_gain_weights_carry_no_gradient():
    logits, targets, ref_probs = make_batch()
    logits.requires_grad_(True)
    gain_loss(logits, targets, ref_probs, 'gain').backward()
    constant = gain_weights(token_nll(logits, targets).detach(), targets, ref_probs, 'gain')
    expected = torch.autograd.grad((constant * token_nll(logits, targets)).sum() / (targets != IGNORE).sum(), logits)[0]
    torch.testing.assert_close(logits.grad, expected)


def test_micro_batches_add_up_to_the_whole_step():
    """Each caption's weights depend on that caption alone, so with the step's token count the parts
    of a batch (accumulation, DDP) add up to the whole batch's loss, for every weighting."""
    logits, targets, ref_probs = make_batch(B=6, seed=1)
    n = (targets != IGNORE).sum()
    for loss in (lambda *a, **k: ntp_loss(a[0], a[1], **k), prior_loss,
                 lambda *a, **k: gain_loss(*a, 'gain', **k), lambda *a, **k: gain_loss(*a, 'prior_gain', **k)):
        whole = loss(logits, targets, ref_probs, n_tokens=n)
        parts = sum(loss(logits[i:i + 2], targets[i:i + 2], ref_probs[i:i + 2], n_tokens=n) for i in (0, 2, 4))
        torch.testing.assert_close(parts, whole)


def test_label_smoothing_mixes_in_the_mean_nll_over_the_vocabulary():
    """s > 0: each token's loss is (1 - s) * its NLL + s * the mean NLL over all V entries, worked out
    here from log_softmax; PRIOR's weights multiply it unchanged (alpha = 0 stays NTP), and s = 0 is
    the plain loss bit for bit."""
    logits, targets, ref_probs = make_batch()
    mask = targets != IGNORE
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    smoothed = 0.9 * nll - 0.1 * logp.mean(-1)
    torch.testing.assert_close(ntp_loss(logits, targets, smoothing=0.1), smoothed[mask].mean())
    w = token_weights(ref_probs, targets, 1.0)
    torch.testing.assert_close(prior_loss(logits, targets, ref_probs, smoothing=0.1),
                               (w * smoothed)[mask].sum() / mask.sum())
    assert torch.equal(prior_loss(logits, targets, ref_probs, alpha=0.0, smoothing=0.1),
                       ntp_loss(logits, targets, smoothing=0.1))
    assert torch.equal(ntp_loss(logits, targets, smoothing=0.0), ntp_loss(logits, targets))
    uniform = torch.zeros_like(logits)             # every entry 1/V: smoothing changes nothing
    torch.testing.assert_close(ntp_loss(uniform, targets, smoothing=0.3), torch.log(torch.tensor(11.0)))


def test_label_smoothing_leaves_the_gain_weights_on_the_plain_nll():
    logits, targets, ref_probs = make_batch()
    mask = targets != IGNORE
    plain = token_nll(logits, targets)
    w = gain_weights(plain, targets, ref_probs, 'gain')
    expected = (w * token_nll(logits, targets, 0.2))[mask].sum() / mask.sum()
    torch.testing.assert_close(gain_loss(logits, targets, ref_probs, 'gain', smoothing=0.2), expected)


def test_the_objective_reads_label_smoothing_from_the_config():
    logits, targets, ref_probs = make_batch()
    for loss in ('ntp', 'prior'):
        cfg = Config(loss=loss, label_smoothing=0.1)
        expected = (ntp_loss(logits, targets, smoothing=0.1) if loss == 'ntp'
                    else prior_loss(logits, targets, ref_probs, smoothing=0.1))
        assert torch.equal(objective(cfg, logits, targets, None if loss == 'ntp' else ref_probs), expected)
        assert not torch.equal(objective(Config(loss=loss), logits, targets, None if loss == 'ntp' else ref_probs),
                               expected)
