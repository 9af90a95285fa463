"""
The optimisation recipe shared by the reference LM and the LVLM: AdamW with weight decay on
matrices only, linear warmup then cosine decay, gradient-norm clipping.
"""

import math

import torch


def lr_at(it, max_lr, warmup_iters, max_iters, min_lr_ratio):
    """Linear warmup over warmup_iters, then cosine decay to max_lr * min_lr_ratio at max_iters,
    and that minimum after it (a run extended past its planned end)."""
    if it < warmup_iters:
        return max_lr * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return max_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, lr, cfg):
    """AdamW (the fused kernel, on CPU too) over the trained parameters; weight decay on
    matrices only (embeddings and linear weights), not on biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': cfg.weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr


def optimizer_step(model, optimizer, grad_clip, scaler=None):
    """Clip the gradient norm (if grad_clip > 0), update, and clear the gradients. With an fp16
    GradScaler: unscale before clipping, skip the update if the gradients overflowed. Returns the
    gradient norm before clipping, as a device tensor (reading it would wait for the device)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm
