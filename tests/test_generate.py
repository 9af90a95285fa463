"""decoding.generate on a stand-in LVLM whose next-token logits are set by hand: where a caption
ends, when the loop stops, and what top_k lets through."""
from types import SimpleNamespace

import pytest
import torch

from decoding.generate import generate

EOT, V = 0, 6


class ScriptedLM(torch.nn.Module):
    """Row r says script[r][i] as its i-th new token, whatever it said before; or, without a script,
    has the same `logits` at every step. Reads the tokens it is given after those in its KV cache,
    as model.GPT does, and counts its forward passes."""
    def __init__(self, script=None, logits=None, block_size=64):
        super().__init__()
        self.script, self.logits, self.calls = script, logits, 0
        self.config = SimpleNamespace(block_size=block_size, n_layer=1)

    def forward(self, idx, prefix=None, cache=None):
        self.calls += 1
        cache.text_len += idx.size(1)
        out = torch.full((idx.size(0), idx.size(1), V), -100.0)
        if self.script is None:
            out[:, -1] = self.logits
        for r, tokens in enumerate(self.script or []):
            out[r, -1, tokens[cache.text_len - 1]] = 100.0
        return out


class Scripted(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()
        self.lm = ScriptedLM(*args, **kwargs)

    def image_prefix(self, images):
        return images


def test_a_caption_ends_at_its_first_eot_and_the_loop_stops_when_all_have():
    model = Scripted([[3, 4, EOT, 5, 1, 2], [2, 2, 2, 2, 2, 2]])
    out = generate(model, torch.zeros(2, 1), bos=EOT, eot=EOT, max_new_tokens=6)
    assert out == [[3, 4, EOT, EOT, EOT, EOT], [2, 2, 2, 2, 2, 2]]   # after its EOT a row says nothing else
    model = Scripted([[3, EOT, 5, 5, 5, 5], [4, 4, EOT, 5, 5, 5]])
    assert generate(model, torch.zeros(2, 1), bos=EOT, eot=EOT, max_new_tokens=6) == [[3, EOT, EOT], [4, 4, EOT]]
    assert model.lm.calls == 3                                           # stopped once both had ended
    model = Scripted([[1] * 10], block_size=5)
    assert generate(model, torch.zeros(1, 1), bos=EOT, eot=EOT, max_new_tokens=10) == [[1] * 4]   # BOS + 4 fill it


def test_top_k_samples_only_the_k_likeliest_in_proportion():
    logits = torch.tensor([-100.0, 1.0, 0.9, 0.8, 0.7, 0.6])          # EOT never: one token per image
    images = torch.zeros(4000, 1)
    sample = lambda **kw: torch.tensor(generate(Scripted(logits=logits), images, EOT, EOT, 1, **kw))[:, 0]
    torch.manual_seed(0)
    top2 = sample(temperature=1.0, top_k=2)
    assert set(top2.tolist()) == {1, 2}
    assert (top2 == 1).float().mean().item() == pytest.approx(torch.softmax(torch.tensor([1.0, 0.9]), 0)[0].item(),
                                                              abs=0.03)   # 0.525, the two renormalised
    assert set(sample(temperature=1.0).tolist()) == {1, 2, 3, 4, 5}
    assert set(sample(temperature=1.0, top_k=1).tolist()) == {1}
    assert set(sample().tolist()) == {1}                              # temperature 0: greedy
