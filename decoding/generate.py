"""
Caption generation with an LVLM (model.py): the image prefix is computed once, then the caption
grows one token at a time. Greedy (temperature 0) or sampled, optionally from the top_k tokens.
"""

import torch
import torch.nn.functional as F


@torch.no_grad()
def generate(model, images, bos, eot, max_new_tokens, temperature=0.0, top_k=None):
    """Caption each image. temperature=0 is greedy; otherwise sample (optionally top-k).
    Returns one list of token ids per image, without BOS; a caption that ended early ends
    in EOT (repeated to the longest one's length), so callers cut at the first EOT."""
    prefix = model.image_prefix(images)
    idx = torch.full((images.size(0), 1), bos, dtype=torch.long, device=images.device)
    done = torch.zeros(images.size(0), dtype=torch.bool, device=images.device)
    for _ in range(min(max_new_tokens, model.lm.config.block_size - 1)):
        logits = model.lm(idx, prefix=prefix)[:, -1].float()
        if temperature == 0:
            nxt = logits.argmax(dim=-1)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float('-inf'))
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, eot), nxt)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        done |= nxt == eot
        if done.all():
            break
    return [[t for t in row[1:].tolist()] for row in idx.cpu()]
