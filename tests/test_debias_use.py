"""Debiased PRIOR where a trained model is used (reference.Debias): the correction read through the
KV caches of decoding/generate.py equals the teacher-forced one, alpha = 0 changes nothing, eval.py's
metrics read it, and runs without PRIOR's tilt are refused in one line."""

import math
from types import SimpleNamespace

import pytest
import torch

from config import Config
from decoding.generate import NextToken, generate
from eval import retrieval_metrics, teacher_forced_metrics
from model import GPT, LVLM, GPTConfig
from prior_loss import debias
from reference import Debias, debias_for
from runs.errors import ConfigError

EOT, V, BLOCK = 0, 40, 12


def models(seed=0, arch='h', lvlm_scale=5.0):
    """A random LVLM and a random text-only reference of one vocabulary; the reference confident
    (weights x5), the LVLM as confident as lvlm_scale makes it."""
    torch.manual_seed(seed)
    cfg = Config(arch=arch, image_size=24, patch_size=8, vision='vit', vit_layer=1, vit_embd=32)
    lvlm, ref = LVLM(cfg, GPTConfig(V, BLOCK, 2, 4, 32)).eval(), GPT(GPTConfig(V, BLOCK, 1, 2, 16)).eval()
    for p in lvlm.parameters():
        p.data.mul_(lvlm_scale)
    for p in ref.parameters():
        p.data.mul_(5)
    return lvlm, ref, torch.rand(5, 3, 24, 24)


def test_the_cached_correction_equals_the_teacher_forced_one():
    """NextToken runs the reference beside the LVLM with a KV cache of its own; each step's corrected
    log-probabilities equal Debias.scores() over the whole text, and differ from the plain model's."""
    lvlm, ref, images = models()
    fix = Debias(ref, alpha=1.0, weight_floor=0.2, min_weight=0.1)
    idx = torch.cat([torch.full((5, 1), EOT), torch.randint(1, V, (5, 7))], dim=1)
    with torch.no_grad():
        full = fix.scores(lvlm, images, idx)
        step = NextToken(lvlm, images, debias=fix)
        cached = torch.stack([step(idx[:, t]) for t in range(idx.size(1))], dim=1)
        plain = torch.log_softmax(lvlm(images, idx), -1)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    want = debias(plain, torch.softmax(ref(idx), -1), 1.0, 0.2, 0.1)
    torch.testing.assert_close(full, want, atol=1e-5, rtol=1e-5)
    assert (full - plain).abs().max() > 0.1


def test_beam_search_moves_both_caches_together():
    """Beam search reorders hypotheses with NextToken.select: after a reordering, the corrected
    log-probabilities are still those of the whole text each row now holds (the reference's cache moved too)."""
    lvlm, ref, images = models(seed=2, arch='u')
    fix = Debias(ref, alpha=1.0, weight_floor=0.0, min_weight=0.05)
    idx = torch.cat([torch.full((5, 1), EOT), torch.randint(1, V, (5, 4))], dim=1)
    rows = torch.tensor([3, 3, 0, 4, 1])                             # repeated and reordered, as beams move
    with torch.no_grad():
        step = NextToken(lvlm, images, debias=fix)
        for t in range(3):
            step(idx[:, t])
        step.select(rows)
        cached = torch.stack([step(idx[rows, t]) for t in range(3, 5)], dim=1)
        full = fix.scores(lvlm, images[rows], idx[rows])[:, 3:5]
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def test_debiased_greedy_writes_the_argmax_of_the_corrected_model():
    lvlm, ref, images = models(seed=3, arch='u', lvlm_scale=1.0)
    fix = Debias(ref, alpha=1.0, weight_floor=0.0, min_weight=0.05)
    with torch.no_grad():
        out = generate(lvlm, images, bos=EOT, eot=EOT, max_new_tokens=BLOCK, debias=fix)
        assert out != generate(lvlm, images, bos=EOT, eot=EOT, max_new_tokens=BLOCK)
        for b, ids in enumerate(out):
            ids = ids[:ids.index(EOT) + 1] if EOT in ids else ids
            idx = torch.tensor([[EOT] + ids[:-1]])
            assert fix.scores(lvlm, images[b:b + 1], idx)[0].argmax(-1).tolist() == ids


@pytest.mark.parametrize('beam', [1, 2])
def test_alpha_zero_changes_no_caption_and_no_metric(beam):
    lvlm, ref, images = models(seed=1)
    identity = Debias(ref, alpha=0.0, weight_floor=0.0, min_weight=0.0)
    with torch.no_grad():
        assert generate(lvlm, images, EOT, EOT, BLOCK, beam=beam, debias=identity) == \
            generate(lvlm, images, EOT, EOT, BLOCK, beam=beam)


def test_eval_metrics_read_the_corrected_model(tiny_cfg):
    """teacher_forced_metrics and retrieval_metrics of a shapes split: identical under alpha = 0, and
    the loss under a real correction is that of the corrected log-probabilities."""
    from data import load_splits, make_vocab
    from model import gpt_config
    data = load_splits(tiny_cfg, names=('train', 'test'))
    vocab = make_vocab(tiny_cfg, data['train'])
    test = data['test'].encode(vocab)
    torch.manual_seed(0)
    lvlm = LVLM(tiny_cfg, gpt_config(tiny_cfg, vocab)).eval()
    ref = GPT(gpt_config(tiny_cfg, vocab)).eval()
    for p in ref.parameters():
        p.data.mul_(5)                                                # a confident reference: weights far from 1
    rows = torch.arange(len(test))
    plain = teacher_forced_metrics(lvlm, test, vocab, rows, 'cpu')
    same = teacher_forced_metrics(lvlm, test, vocab, rows, 'cpu', debias=Debias(ref, 0.0, 0.0, 0.0))
    assert all(math.isclose(plain[k], same[k], rel_tol=1e-5) or (math.isnan(plain[k]) and math.isnan(same[k]))
               for k in plain)
    fix = Debias(ref, 1.0, 0.0, 0.1)
    fixed = teacher_forced_metrics(lvlm, test, vocab, rows, 'cpu', debias=fix)
    images, idx, targets, _ = test.batch(rows, 'cpu')
    with torch.no_grad():
        logp = fix.scores(lvlm, images, idx)
    mask = targets != -1
    want = -logp.gather(2, targets.clamp(min=0)[..., None])[..., 0][mask].mean().item()
    assert math.isclose(fixed['loss'], want, rel_tol=1e-6) and not math.isclose(fixed['loss'], plain['loss'],
                                                                                rel_tol=1e-5)
    assert repr(retrieval_metrics(lvlm, test, 'cpu', n_images=8, debias=Debias(ref, 0.0, 0.0, 0.0))) == \
        repr(retrieval_metrics(lvlm, test, 'cpu', n_images=8))          # repr: NaN (no ratio here) equals itself


@pytest.mark.parametrize('loss', ['ntp', 'gain', 'prior_gain', 'oracle', 'label'])
def test_runs_without_prior_s_tilt_are_refused_in_one_line(loss):
    with pytest.raises(ConfigError, match=f'loss={loss}') as e:
        debias_for(SimpleNamespace(loss=loss, alpha=1.0, weight_floor=0.0), {'model': {}}, 'cpu', 0.1)
    assert '\n' not in str(e.value)
    with pytest.raises(ConfigError, match="no reference|has none"):
        debias_for(SimpleNamespace(loss='prior', alpha=1.0, weight_floor=0.0), None, 'cpu', 0.1)
