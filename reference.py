"""
The text-only reference LM P_r of PRIOR: train it on the training captions (no images),
then score every training caption token once and cache P_r(t_i | t_<i) on disk.

    python reference.py [config.py] [--key=value ...]

Training the LVLM then reads the cached probabilities (memory-mapped), so PRIOR costs one
reference pass over the data, paid once, not one per epoch. A cache records what it was made
from (the token rows' sha256, the tokenizer, the vocabulary, the reference checkpoint's
sha256) and is refused if any of them does not match what it is loaded for.
"""

import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch

import config as config_mod
from data import IGNORE, Vocab, batch_indices, load_splits, text_width
from model import GPT, GPTConfig, hf_gpt2_shape, load_checkpoint, load_hf_gpt2_into, save_checkpoint
from prior_loss import ntp_loss, token_nll


def make_vocab(cfg, train):
    """Compact vocabulary of the training captions, or all of GPT-2's (needed by --init_lm=gpt2)."""
    return Vocab(None) if cfg.init_lm == 'gpt2' or cfg.vocab == 'gpt2' else Vocab.from_captions(train.gpt2_tokens)


def gpt_config(cfg, vocab):
    if cfg.init_lm == 'gpt2':                    # the checkpoint fixes the shape; n_layer etc. are unused
        return GPTConfig(vocab.size, cfg.block_size, *hf_gpt2_shape(cfg.gpt2_model), cfg.dropout)
    return GPTConfig(vocab.size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout)


def default_ref_path(cfg, train):
    """Where the reference for this data and reference recipe lives unless --ref_ckpt says otherwise."""
    recipe = [train.fingerprint(), cfg.init_lm == 'gpt2' and cfg.gpt2_model, cfg.n_layer, cfg.n_head, cfg.n_embd,
              cfg.dropout, cfg.ref_max_iters, cfg.ref_learning_rate, cfg.ref_batch_size, cfg.seed,
              cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.grad_clip]
    key = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:12]
    return os.path.join('out', 'ref', key, 'ref.pt')


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def train_reference(cfg, train, vocab, device, log=print):
    """Fit the GPT on the captions alone with plain NTP (AdamW, warmup + cosine)."""
    torch.manual_seed(cfg.seed)
    model = GPT(gpt_config(cfg, vocab)).to(device)
    if cfg.init_lm == 'gpt2':
        load_hf_gpt2_into(model, cfg.gpt2_model)
    params = list(model.parameters())           # the LVLM's optimiser: decay on matrices only, fused
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': cfg.weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.ref_learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)
    warmup = max(1, cfg.ref_max_iters // 20)
    t0 = time.time()
    model.train()
    for it in range(cfg.ref_max_iters):
        lr = cfg.ref_learning_rate * (it + 1) / warmup if it < warmup else cfg.ref_learning_rate * \
            (0.1 + 0.45 * (1 + math.cos(math.pi * (it - warmup) / max(1, cfg.ref_max_iters - warmup))))
        for group in opt.param_groups:
            group['lr'] = lr       # the LVLM's schedule (train.lr_at), with its own warmup
        rows = batch_indices(len(train), cfg.ref_batch_size, it * cfg.ref_batch_size, cfg.seed)
        idx, targets, _ = train.text_batch(rows, device)
        T = text_width(targets)
        loss = ntp_loss(model(idx[:, :T]), targets[:, :T])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if it % 100 == 0 or it == cfg.ref_max_iters - 1:
            log(f"reference iter {it}: loss {loss.item():.4f} ({time.time() - t0:.1f}s)")
    return model.eval()


def target_probs(model, idx, targets):
    """P_r(target | prefix) [B,T] from a text-only GPT; 0 where ignored."""
    p = torch.exp(-token_nll(model(idx), targets))
    return torch.where(targets == IGNORE, 0.0, p)


@torch.inference_mode()
def score(model, data, device, batch_size=256):
    """P_r(target | prefix) at every position of every row, [N, T] float32; 0 where ignored."""
    out = np.zeros((len(data), data.block_size), dtype=np.float32)
    model.eval()
    for start in range(0, len(data), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(data)))
        idx, targets, _ = data.text_batch(rows, device)
        T = text_width(targets)
        out[start:start + len(rows), :T] = target_probs(model, idx[:, :T], targets[:, :T]).cpu().numpy()
    return out


def save_reference(model, vocab, cfg, train, path):
    save_checkpoint({'model': model.state_dict(), 'model_args': vars(model.config), 'vocab': vocab.state(),
                     'config': config_mod.as_dict(cfg), 'data_fingerprint': train.fingerprint()}, path)


def load_reference(path, device):
    ckpt = load_checkpoint(path, map_location=device)
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    return model.to(device).eval(), Vocab(ckpt['vocab']['gpt2_ids']), ckpt


def cache_paths(ref_path):
    """The score cache of the training captions, beside the reference checkpoint."""
    base = os.path.join(os.path.dirname(ref_path), "ref_probs_train")
    return base + '.npy', base + '.json'


def write_cache(probs, manifest, ref_path):
    npy, meta = cache_paths(ref_path)
    tmp = npy + '.tmp.npy'
    arr = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.float32, shape=probs.shape)
    arr[:] = probs
    arr.flush()
    del arr
    os.replace(tmp, npy)
    with open(meta + '.tmp', 'w') as f:
        json.dump(manifest, f, indent=1)
    os.replace(meta + '.tmp', meta)


def expected_manifest(data, vocab, ref_path):
    return {'data_fingerprint': data.fingerprint(), 'tokenizer': 'r50k_base',
            'vocab_sha256': hashlib.sha256(json.dumps(vocab.gpt2_ids).encode()).hexdigest(),
            'ref_sha256': file_sha256(ref_path), 'shape': list(data.targets.shape)}


def load_cache(ref_path, data, vocab):
    """The cached P_r of the training captions `data` as a read-only memory map, after checking
    it belongs to this data, vocabulary and reference. Raises ValueError naming the mismatch."""
    npy, meta = cache_paths(ref_path)
    if not (os.path.isfile(npy) and os.path.isfile(meta)):
        raise FileNotFoundError(f"no reference score cache at {npy}")
    with open(meta) as f:
        found = json.load(f)
    expected = expected_manifest(data, vocab, ref_path)
    wrong = [k for k in expected if found.get(k) != expected[k]]
    if wrong:
        raise ValueError(f"reference cache {npy} does not match: {', '.join(wrong)} differ "
                         f"(it was made for other data or another reference). Delete it and {meta} "
                         f"to have it rebuilt, or pass another --ref_ckpt.")
    probs = np.load(npy, mmap_mode='r')
    if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise ValueError(f"reference cache {npy} holds values outside [0, 1] or NaN/inf")
    return probs


def ensure_reference(cfg, train, vocab, device, log=print, is_master=True, scored=True):
    """Return (reference path, cached P_r of the training captions, or None unless `scored`),
    training and scoring on first use.

    Under DDP only the master process builds; the others wait at a barrier and then load."""
    path, probs = cfg.ref_ckpt or default_ref_path(cfg, train), None
    if is_master:
        if not os.path.isfile(path):
            log(f"reference: no checkpoint at {path}; training the text-only reference LM first")
            save_reference(train_reference(cfg, train, vocab, device, log), vocab, cfg, train, path)
        if scored:
            try:
                probs = load_cache(path, train, vocab)
            except FileNotFoundError:
                model, ref_vocab, _ = load_reference(path, device)
                if ref_vocab.gpt2_ids != vocab.gpt2_ids:
                    raise ValueError(f"reference {path} uses another vocabulary than this data")
                t0 = time.time()
                scores = score(model, train, device)
                write_cache(scores, expected_manifest(train, vocab, path), path)
                log(f"reference: scored {len(scores)} training captions in {time.time() - t0:.1f}s -> "
                    f"{cache_paths(path)[0]}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if scored and probs is None:                 # just written (read back checked), or by the master
        probs = load_cache(path, train, vocab)
    return path, probs


def main(argv):
    cfg = config_mod.load_config(argv)
    device = config_mod.resolve_device(cfg.device)
    train = load_splits(cfg, names=('train',))['train']
    vocab = make_vocab(cfg, train)
    train.encode(vocab)
    path, probs = ensure_reference(cfg, train, vocab, device)
    mask = (train.targets != IGNORE).numpy()
    print(f"reference: {path}; mean P_r over the training caption tokens {float(probs[mask].mean()):.4f}")


if __name__ == '__main__':
    main(sys.argv[1:])
