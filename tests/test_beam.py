"""Beam search and the KV cache of decoding/generate.py, against greedy decoding, exhaustive search
and the cache-free forward pass."""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from config import Config
from decoding.generate import KVCache, beam_search, generate, normalised
from model import LVLM, GPTConfig

EOT = 0


class Markov(nn.Module):
    """A hand-built captioner whose next token depends only on the last one: log-probabilities
    table[last token]. It ignores the image and keeps its cache only so beam search can reorder it."""

    def __init__(self, table, block_size=8):
        super().__init__()
        self.table, self.lm = table, self
        self.config = SimpleNamespace(block_size=block_size, n_layer=1)

    def image_prefix(self, images):
        return images

    def forward(self, idx, prefix=None, cache=None):
        if cache is not None:
            cache.extend(0, idx[:, None, :, None].float(), idx[:, None, :, None].float())
        return self.table[idx]


def peaky_lvlm(arch, seed=0, vocab=40, block_size=12):
    torch.manual_seed(seed)
    cfg = Config(arch=arch, image_size=24, patch_size=8, vision='vit', vit_layer=1, vit_embd=32)
    model = LVLM(cfg, GPTConfig(vocab, block_size, 2, 4, 32)).eval()
    for p in model.parameters():
        p.data.mul_(5)                          # confident, varied predictions instead of near-uniform ones
    return model, torch.rand(6, 3, 24, 24)


def cut(ids):
    return ids[:ids.index(EOT) + 1] if EOT in ids else ids


@pytest.mark.parametrize('arch', ['u', 'h'])
def test_beam_one_is_greedy(arch):
    model, images = peaky_lvlm(arch)
    greedy = generate(model, images, bos=EOT, eot=EOT, max_new_tokens=12)
    assert [cut(g) for g in greedy] == beam_search(model, images, EOT, EOT, 12, beam=1)
    assert len({tuple(g) for g in greedy}) > 1                 # the images do lead to different captions


def test_beam_finds_what_greedy_misses():
    # From BOS (token 3): 'a' (1) is likelier than 'b' (2), but after 'a' every token is equally
    # likely, so a+EOT has p = 0.6 * 0.25 = 0.15 while b+EOT has 0.4 * 1.0 = 0.4.
    table = torch.full((4, 4), -1e9)
    table[3, 1], table[3, 2] = math.log(0.6), math.log(0.4)
    table[1] = math.log(0.25)
    table[2, EOT] = 0.0
    table[EOT, EOT] = 0.0
    model, images = Markov(table), torch.zeros(2, 1, 1)
    assert cut(generate(model, images, bos=3, eot=EOT, max_new_tokens=6)[0]) == [1, EOT]     # greedy: p = 0.15
    assert beam_search(model, images, 3, EOT, 6, beam=2) == [[2, EOT], [2, EOT]]


@pytest.mark.parametrize('length_penalty', [0.0, 0.7, 1.0])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_wide_beam_equals_exhaustive_search(seed, length_penalty):
    """With a beam wider than the number of prefixes, beam search is exact: it must return the best
    caption of all (EOT-ended or cut at the step limit) under the same length normalisation."""
    torch.manual_seed(seed)
    V, steps = 4, 3
    table = torch.log_softmax(torch.randn(V, V) * 2, dim=-1)
    model = Markov(table, block_size=steps + 1)
    best, best_score = None, -math.inf
    for n in range(1, steps + 1):
        for seq in itertools.product(range(V), repeat=n):
            if EOT in seq[:-1] or (n < steps and seq[-1] != EOT):
                continue                                       # ends at its first EOT, or runs to the limit
            logp = sum(table[a, b].item() for a, b in zip((3,) + seq[:-1], seq))
            if normalised(logp, n, length_penalty) > best_score:
                best, best_score = list(seq), normalised(logp, n, length_penalty)
    assert beam_search(model, torch.zeros(1, 1, 1), 3, EOT, steps, beam=64, length_penalty=length_penalty) == [best]


@pytest.mark.parametrize('beam', [2, 3, 5])
def test_finished_hypotheses_never_grow(beam):
    model, images = peaky_lvlm('u', seed=1)
    for ids in beam_search(model, images, EOT, EOT, 12, beam=beam, length_penalty=1.0):
        assert EOT not in ids[:-1] and 1 <= len(ids) <= 11     # one EOT at most, at the end; within the limit


def test_wider_beam_scores_at_least_as_well_on_average():
    model, images = peaky_lvlm('u', seed=2)

    def logp(captions):
        out = []
        for ids, image in zip(captions, images):
            idx = torch.tensor([[EOT] + ids[:-1]])
            out.append(torch.log_softmax(model(image[None], idx), -1)[0, range(len(ids)), ids].sum().item())
        return sum(out)
    greedy = [cut(g) for g in generate(model, images, bos=EOT, eot=EOT, max_new_tokens=12)]
    assert logp(beam_search(model, images, EOT, EOT, 12, beam=4)) >= logp(greedy) - 1e-4


def test_kv_cache_gives_the_logits_of_the_full_pass():
    model, images = peaky_lvlm('h')
    idx = torch.randint(0, 40, (3, 10))
    prefix = model.image_prefix(images[:3])
    full = model.lm(idx, prefix=prefix)
    cache = KVCache(model.lm.config.n_layer)
    steps = [model.lm(idx[:, :4], prefix=prefix, cache=cache)]               # a first chunk, then one at a time
    steps += [model.lm(idx[:, t:t + 1], cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match='one token at a time'):
        model.lm(idx[:, :2], cache=cache)


def test_cached_greedy_equals_recomputing_the_whole_sequence():
    model, images = peaky_lvlm('u', seed=3)
    idx = torch.full((len(images), 1), EOT)
    for _ in range(11):                                          # the cache-free way: the whole text each step
        idx = torch.cat([idx, model(images, idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = [cut(row) for row in idx[:, 1:].tolist()]
    assert [cut(g) for g in generate(model, images, bos=EOT, eot=EOT, max_new_tokens=12)] == expected
