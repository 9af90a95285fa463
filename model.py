"""
The models, smallest first:

  GPT        a GPT-2 (learned positions, pre-LayerNorm, causal attention, GELU MLP, tied
             embeddings). Alone it is PRIOR's text-only reference LM; inside an LVLM it is
             the language model that reads the image prefix and writes the caption.
  ViT        a small vision transformer (patches, learned positions, non-causal attention).
  (pretrained/vision.py)  ImageNet CNN encoders: torchvision models and EfficientNet-Lite.
  LVLM       image prefix + GPT. Two ways to make the prefix:
               arch='h'  H-LVLM (LLaVA-style): vision encoder -> 2-layer GELU MLP projector
               arch='u'  U-LVLM (Fuyu/SOLO-style, encoder-free): raw patches -> one linear layer,
                            plus learned row and column embeddings; no vision encoder

The image prefix carries its own position embeddings and the caption keeps GPT positions
0..T-1, exactly the positions the text-only reference was trained on. That is what lets an
LVLM start from (or stay frozen at) the reference without shifting every caption position.
Captions are written by decoding/generate.py. Read next: data.py.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrained.gpt2 import gpt2_shape
from pretrained.vision import cnn_encoder


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int             # text positions
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0


def gpt_config(cfg, vocab):
    """The GPT shape of a run (the reference and the LVLM's LM share it); a GPT-2 checkpoint fixes its own."""
    if cfg.init_lm == 'gpt2':
        return GPTConfig(vocab.size, cfg.block_size, *gpt2_shape(cfg.gpt2_model), cfg.dropout)
    return GPTConfig(vocab.size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout)


class SelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, dropout, causal):
        super().__init__()
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.dropout, self.causal = n_head, dropout, causal
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.extend(layer, k, v)
        if self.causal and k.size(2) > T > 1:
            raise ValueError("with a KV cache, read the first chunk at once and then one token at a time")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and k.size(2) == T,   # one new token sees all
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, n_embd, dropout):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x), approximate='tanh')))   # GPT-2's GELU


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd, n_head, dropout, causal):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout, causal)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


def init_weights(module, n_layer):
    """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
    for name, p in module.named_parameters():
        if name.endswith('bias'):
            nn.init.zeros_(p)
        elif p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith('proj.weight') else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config.n_embd, config.n_head, config.dropout, causal=True)
                               for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        init_weights(self, config.n_layer)
        self.lm_head.weight = self.wte.weight   # weight tying, after init so both are one tensor

    def forward(self, idx, prefix=None, cache=None):
        """Logits [B,T,V] of the text positions. `prefix` [B,P,C] (image embeddings that
        already carry their own positions) is read before the text, causally. With a cache
        (decoding/generate.py's KVCache), idx continues the text it has read; training passes none."""
        return self.lm_head(self.hidden(idx, prefix, cache))

    def hidden(self, idx, prefix=None, cache=None):
        """The final (LayerNormed) hidden states [B,T,C] of the text positions."""
        start, T = (cache.text_len if cache is not None else 0), idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens, block_size is {self.config.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(start, start + T, device=idx.device))
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        x = self.drop(x)
        for layer, block in enumerate(self.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.text_len += T
        return self.ln_f(x[:, x.size(1) - T:])


class ViT(nn.Module):
    def __init__(self, image_size, patch_size, n_layer, n_head, n_embd, dropout):
        super().__init__()
        n_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, n_embd, kernel_size=patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.zeros(1, n_patches, n_embd))
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, causal=False) for _ in range(n_layer))
        self.ln = nn.LayerNorm(n_embd)
        init_weights(self, n_layer)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos   # [B, P, C]
        for block in self.blocks:
            x = block(x)
        return self.ln(x)


class PatchPrefix(nn.Module):
    """Encoder-free prefix: each raw patch flattened and linearly projected to the LM width,
    plus a learned row and column embedding so the LM can tell where a patch came from."""

    def __init__(self, image_size, patch_size, n_embd):
        super().__init__()
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.proj = nn.Linear(3 * patch_size * patch_size, n_embd)
        self.row = nn.Parameter(torch.randn(self.grid, 1, n_embd) * 0.02)
        self.col = nn.Parameter(torch.randn(1, self.grid, n_embd) * 0.02)
        nn.init.normal_(self.proj.weight, std=0.02), nn.init.zeros_(self.proj.bias)

    def forward(self, images):
        p = self.patch_size
        patches = F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)   # [B, P, 3*p*p]
        return self.proj(patches) + (self.row + self.col).flatten(0, 1)


def vision_encoder(cfg):
    """The H-LVLM's encoder with random weights, its number of output tokens and their width."""
    if cfg.vision == 'vit':
        vit = ViT(cfg.image_size, cfg.patch_size, cfg.vit_layer, cfg.n_head, cfg.vit_embd, cfg.dropout)
        return vit, (cfg.image_size // cfg.patch_size) ** 2, cfg.vit_embd
    encoder = cnn_encoder(cfg.vision, cfg.image_size, cfg.vision_features)
    return encoder, encoder.n_tokens, encoder.width


class LVLM(nn.Module):
    def __init__(self, cfg, lm_config):
        super().__init__()
        self.lm = GPT(lm_config)
        width = lm_config.n_embd
        if cfg.arch == 'u':
            self.vision = PatchPrefix(cfg.image_size, cfg.patch_size, width)
            self.projector = nn.Identity()
            self.n_prefix = (cfg.image_size // cfg.patch_size) ** 2
            return
        self.vision, self.n_prefix, features = vision_encoder(cfg)   # pretrained weights: train.build_model
        self.projector = nn.Sequential(nn.Linear(features, width), nn.GELU(), nn.Linear(width, width))
        init_weights(self.projector, 1)

    def train(self, mode=True):
        super().train(mode)
        if not any(p.requires_grad for p in self.vision.parameters()):
            self.vision.eval()                   # a frozen encoder keeps its BatchNorm statistics, no dropout
        return self

    def image_prefix(self, images):
        """The LM's image prefix [B,P,C] from pixels [B,3,H,W], or from the vision encoder's
        features [B,P,F] when a frozen encoder's outputs were cached (encoder.py)."""
        return self.projector(images if images.dim() == 3 else self.vision(images))

    def forward(self, images, idx):
        """Caption logits [B,T,V] given images [B,3,H,W] (or cached features [B,P,F]) and text ids [B,T]."""
        return self.lm(idx, prefix=self.image_prefix(images))
