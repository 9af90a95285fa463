import pytest
import torch

from config import Config
from decoding.generate import generate
from model import GPT, GPTConfig, LVLM
from pretrained.gpt2 import converted_state_dict
from runs.progress import train_flops


def lvlm(arch, vocab=50):
    cfg = Config(arch=arch, n_layer=2, n_head=2, n_embd=32, vit_layer=1, vit_embd=32, image_size=32, patch_size=8)
    torch.manual_seed(0)
    return LVLM(cfg, GPTConfig(vocab, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd)).eval()


def test_gpt_is_causal():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    a, b = gpt(idx), gpt(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize('arch', ['h', 'u'])
def test_lvlm_is_causal_in_the_caption_and_sees_the_image(arch):
    model = lvlm(arch)
    images, idx = torch.randn(2, 3, 32, 32), torch.randint(0, 50, (2, 10))
    changed = idx.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 50
    logits = model(images, idx)
    assert logits.shape == (2, 10, 50)
    torch.testing.assert_close(model(images, changed)[:, :6], logits[:, :6])
    other = model(torch.randn(2, 3, 32, 32), idx)
    assert (other - logits).abs().amax(dim=-1).min() > 1e-4   # every caption position depends on the image


def test_caption_keeps_the_text_positions_of_the_reference():
    """The image prefix has its own positions; the caption reads GPT positions 0..T-1."""
    model = lvlm('u')
    seen = []
    hook = model.lm.wpe.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    model(torch.randn(1, 3, 32, 32), torch.randint(0, 50, (1, 9)))
    hook.remove()
    assert seen[0].tolist() == list(range(9))


@pytest.mark.parametrize('arch', ['h', 'u'])
def test_generate_greedy_is_deterministic_and_stops_at_eot(arch):
    model = lvlm(arch)
    images = torch.randn(3, 3, 32, 32)
    a = generate(model, images, bos=0, eot=0, max_new_tokens=8)
    assert a == generate(model, images, bos=0, eot=0, max_new_tokens=8)
    assert all(len(row) <= 8 for row in a)
    torch.manual_seed(1)
    sampled = generate(model, images, bos=0, eot=0, max_new_tokens=8, temperature=1.0, top_k=5)
    assert len(sampled) == 3


def test_flops_grow_with_caption_length():
    model = lvlm('h')
    assert 0 < train_flops(model, 10) < train_flops(model, 20)


def test_gpt2_logits_match_transformers():
    transformers = pytest.importorskip('transformers')
    hf_cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=3, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():                        # non-trivial LayerNorms and biases too
        for name, p in hf.named_parameters():
            if 'ln' in name or name.endswith('bias'):
                p.add_(0.1 * torch.randn_like(p))
    ours = GPT(GPTConfig(97, 32, 3, 4, 48))
    ours.load_state_dict(converted_state_dict(hf, 32))
    ours.eval()
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_frozen_parts_cost_fewer_flops():
    model = lvlm('h')
    full = train_flops(model, 20)
    model.lm.requires_grad_(False)              # no weight gradients in the LM: 4N instead of 6N
    frozen_lm = train_flops(model, 20)
    assert frozen_lm < full
    model.vision.requires_grad_(False)          # nothing before the projector trains: 2N there
    assert train_flops(model, 20) < frozen_lm
