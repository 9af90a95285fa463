"""
The text-only reference LM P_r of PRIOR: train it on the training captions (no images),
then score every training caption token once and cache P_r(t_i | t_<i) on disk.

    python reference.py [config.py] [--key=value ...]      # every setting: --help

Training the LVLM then reads the cached probabilities (memory-mapped), so PRIOR costs one
reference pass over the data, paid once, not one per epoch. A cache's manifest, written last,
records what it was made from (the token rows' sha256, the tokenizer, the vocabulary, the
reference checkpoint's sha256) and the array file's size and sha256; a cache that does not match
what it is loaded for is never used (ensure_reference scores the captions anew).
"""

import hashlib
import json
import os
import sys
import time

import numpy as np
import torch

import config as config_mod
from checkpoint import (cache_root, check_cache, check_origin, commit_cache, content_key, exclusive, file_sha256,
                        load_checkpoint, load_hf_gpt2_into, save_checkpoint, weights_digest)
from config import ConfigError
from data import Vocab, batch_indices, load_splits, make_vocab, text_width
from device import barrier, resolve_device
from model import GPT, GPTConfig, gpt_config
from optim import lr_at, make_optimizer, optimizer_step, set_lr
from prior_loss import IGNORE, ntp_loss, token_nll
from progress import Progress


def default_ref_ckpt(cfg, train):
    """Where the reference for this data and reference recipe lives unless --ref_ckpt says otherwise."""
    recipe = [train.fingerprint(), cfg.init_lm == 'gpt2' and cfg.gpt2_model, cfg.n_layer, cfg.n_head, cfg.n_embd,
              cfg.dropout, cfg.ref_max_iters, cfg.ref_learning_rate, cfg.ref_batch_size, cfg.seed,
              cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.grad_clip, cfg.min_lr_ratio]
    return os.path.join(cache_root(cfg), 'ref', content_key(recipe), 'ref.pt')


def train_reference(cfg, train, vocab, device, log=print):
    """Fit the GPT on the captions alone with plain NTP, with the LVLM's optimiser and step
    (optim.py); its warmup is a twentieth of its iterations."""
    torch.manual_seed(cfg.seed)
    model = GPT(gpt_config(cfg, vocab)).to(device)
    if cfg.init_lm == 'gpt2':
        load_hf_gpt2_into(model, cfg.gpt2_model)
    optimizer = make_optimizer(model, cfg.ref_learning_rate, cfg)
    warmup = max(1, cfg.ref_max_iters // 20)
    progress = Progress(cfg.ref_max_iters)
    model.train()
    for it in range(cfg.ref_max_iters):
        set_lr(optimizer, lr_at(it, cfg.ref_learning_rate, warmup, cfg.ref_max_iters, cfg.min_lr_ratio))
        rows = batch_indices(len(train), cfg.ref_batch_size, it * cfg.ref_batch_size, cfg.seed)
        T = text_width(train.targets[rows])      # on the host: no device sync
        idx, targets, _ = train.text_batch(rows, device)
        loss = ntp_loss(model(idx[:, :T]), targets[:, :T])
        loss.backward()
        optimizer_step(model, optimizer, cfg.grad_clip)
        if it % 100 == 0 or it == cfg.ref_max_iters - 1:
            log(f"reference iter {progress.line(it + 1)}: loss {loss.item():.4f}")
    return model.eval()


def target_probs(model, idx, targets):
    """P_r(target | prefix) [B,T] from a text-only GPT; 0 where ignored."""
    p = torch.exp(-token_nll(model(idx), targets))
    return torch.where(targets == IGNORE, 0.0, p)


@torch.inference_mode()
def score_captions(model, data, device, batch_size=256, log=None):
    """P_r(target | prefix) at every position of every row, [N, T] float32; 0 where ignored.
    With `log`, a progress line every few seconds."""
    out = np.zeros((len(data), data.block_size), dtype=np.float32)
    model.eval()
    progress = Progress(len(data))
    for start in range(0, len(data), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(data)))
        T = text_width(data.targets[rows])
        idx, targets, _ = data.text_batch(rows, device)
        out[start:start + len(rows), :T] = target_probs(model, idx[:, :T], targets[:, :T]).cpu().numpy()
        if log and progress.due():
            log(f"reference: scoring captions {progress.line(start + len(rows))}")
    return out


def save_reference(model, vocab, cfg, train, ref_ckpt):
    save_checkpoint({'model': model.state_dict(), 'model_args': vars(model.config), 'vocab': vocab.state(),
                     'config': config_mod.as_dict(cfg), 'data_fingerprint': train.fingerprint(),
                     'weights_sha256': weights_digest(model.state_dict())}, ref_ckpt)


def load_reference(ref_ckpt, device, train=None):
    """(GPT, vocabulary, checkpoint) of a reference; refused if its weights changed since it was
    saved or (given `train`, the training captions it is for) it was trained on other captions."""
    ckpt = load_checkpoint(ref_ckpt, map_location=device, required=('model', 'model_args', 'vocab'))
    check_origin(ckpt, ref_ckpt, 'model', **({'data_fingerprint': train.fingerprint()} if train else {}))
    return (*reference_from(ckpt, device), ckpt)


def reference_from(state, device):
    """(GPT, Vocab) of a reference checkpoint's dict: its own file, or the copy that travels in
    every LVLM checkpoint (train.py), so eval.py needs no path that may have moved."""
    model = GPT(GPTConfig(**state['model_args']))
    model.load_state_dict(state['model'])
    return model.to(device).eval(), Vocab(state['vocab']['gpt2_ids'])


def reference_file(path, vocab):
    """A reference checkpoint's dict, refused (one line) if it is another kind of file or of another vocabulary."""
    ref = load_checkpoint(path, required=('model', 'model_args', 'vocab'))
    if 'step' in ref or 'optimizer' in ref:
        raise ConfigError(f"{path} is a train.py checkpoint, not a reference LM (pass its reference.pt or ref.pt)")
    if ref['vocab']['gpt2_ids'] != vocab.gpt2_ids:
        raise ConfigError(f"reference {path} has another vocabulary than the model; pass the run's own reference")
    return ref


def reference_of(ckpt, ckpt_path=None, vocab=None):
    """The run's reference checkpoint's dict, or None (an NTP run from scratch): its copy beside the
    checkpoint at `ckpt_path` (else at the path it was trained from), checked by digest; older
    checkpoints carry it inside or name its path. `vocab`: the model's (default: the checkpoint's)."""
    vocab = vocab or Vocab(ckpt['vocab']['gpt2_ids'])
    if ckpt.get('reference_sha256'):
        path = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), 'reference.pt') if ckpt_path \
            else ckpt['ref_ckpt']
        if not os.path.isfile(path):
            raise ConfigError(f"{path}, the run's reference, is missing; pass --ref_ckpt=PATH to its ref.pt")
        ref = reference_file(path, vocab)
        if weights_digest(ref['model']) != ckpt['reference_sha256']:
            raise ConfigError(f"{path} is not the reference this run trained with (its weights differ)")
        return ref
    if ckpt.get('reference'):
        return ckpt['reference']
    path = ckpt.get('ref_ckpt')
    if path and not os.path.isfile(path):
        raise ConfigError(f"this checkpoint predates self-contained ones and its reference {path} is not "
                          f"there (relative to {os.getcwd()}); run eval.py from the directory train.py ran in")
    return reference_file(path, vocab) if path else None


def cache_paths(ref_ckpt):
    """The score cache of the training captions, beside the reference checkpoint."""
    base = os.path.join(os.path.dirname(ref_ckpt), "ref_probs_train")
    return base + '.npy', base + '.json'


def write_cache(ref_probs, manifest, ref_ckpt):
    npy, meta = cache_paths(ref_ckpt)
    commit_cache(meta, {npy: lambda f: np.save(f, ref_probs)}, manifest)


def expected_manifest(data, vocab, ref_ckpt):
    return {'data_fingerprint': data.fingerprint(), 'tokenizer': 'r50k_base',
            'vocab_sha256': hashlib.sha256(json.dumps(vocab.gpt2_ids).encode()).hexdigest(),
            'ref_sha256': file_sha256(ref_ckpt), 'shape': list(data.targets.shape)}


def load_cache(ref_ckpt, data, vocab):
    """The cached P_r of the training captions `data` as a read-only memory map, after checking
    it is whole and belongs to this data, vocabulary and reference. Raises ValueError naming the mismatch."""
    npy, meta = cache_paths(ref_ckpt)
    advice = "(train.py and reference.py score the captions anew in its place)"
    expected = expected_manifest(data, vocab, ref_ckpt)
    try:
        found = check_cache(meta, expected)
    except ConfigError as e:
        raise ConfigError(f"reference cache: {e} {advice}") from None
    if found is None:
        raise FileNotFoundError(f"no reference score cache at {npy}")
    try:
        ref_probs = np.load(npy, mmap_mode='r')
    except (ValueError, OSError) as e:           # a foreign file that its manifest was made for
        raise ConfigError(f"reference cache {npy} cannot be read ({type(e).__name__}). {advice}") from None
    if list(ref_probs.shape) != expected['shape'] or ref_probs.dtype != np.float32:
        raise ConfigError(f"reference cache {npy} holds a {ref_probs.dtype} array of shape {list(ref_probs.shape)}, "
                         f"its manifest and this data say float32 {expected['shape']}. {advice}")
    if not np.isfinite(ref_probs).all() or ref_probs.min() < 0 or ref_probs.max() > 1:
        raise ConfigError(f"reference cache {npy} holds values outside [0, 1] or NaN/inf. {advice}")
    return ref_probs


def ensure_reference(cfg, train, vocab, device, log=print, is_master=True, scored=True):
    """Return (reference checkpoint path, cached P_r of the training captions, or None unless `scored`),
    training and scoring on first use.

    Under DDP only the master process builds; the others wait at a barrier and then load."""
    ref_ckpt, ref_probs = cfg.ref_ckpt or default_ref_ckpt(cfg, train), None
    if is_master:
        with exclusive(ref_ckpt):              # a second run asking for the same reference waits for it
            try:
                model, ref_vocab, _ = load_reference(ref_ckpt, device, train)
            except FileNotFoundError:
                model, why = None, f"no checkpoint at {ref_ckpt}"
            except ConfigError as e:
                if cfg.ref_ckpt:                 # a file given by --ref_ckpt is named, never replaced;
                    raise
                model, why = None, str(e)        # a damaged one in the cache folder is built anew
            if model is None:
                log(f"reference: {why}; training the text-only reference LM first")
                save_reference(train_reference(cfg, train, vocab, device, log), vocab, cfg, train, ref_ckpt)
                model, ref_vocab, _ = load_reference(ref_ckpt, device, train)
            if ref_vocab.gpt2_ids != vocab.gpt2_ids:
                raise ConfigError(f"reference {ref_ckpt} uses another vocabulary than this data")
            if scored:
                try:
                    ref_probs = load_cache(ref_ckpt, train, vocab)
                except (FileNotFoundError, ConfigError) as e:     # none yet, or a stale or torn one: score anew
                    if isinstance(e, ConfigError):
                        log(str(e))
                    t0 = time.time()
                    scores = score_captions(model, train, device, log=log)
                    write_cache(scores, expected_manifest(train, vocab, ref_ckpt), ref_ckpt)
                    log(f"reference: scored {len(train)} training captions in {time.time() - t0:.1f}s -> "
                        f"{cache_paths(ref_ckpt)[0]}")
    barrier()
    if scored and ref_probs is None:                 # just written (read back checked), or by the master
        ref_probs = load_cache(ref_ckpt, train, vocab)
    return ref_ckpt, ref_probs


def main(argv):
    cfg = config_mod.load_config(argv)
    device = resolve_device(cfg.device)
    train = load_splits(cfg, names=('train',))['train']
    vocab = make_vocab(cfg, train)
    train.encode(vocab)
    ref_ckpt, ref_probs = ensure_reference(cfg, train, vocab, device)
    mask = (train.targets != IGNORE).numpy()
    print(f"reference: {ref_ckpt}; mean P_r over the training caption tokens {float(ref_probs[mask].mean()):.4f}")


if __name__ == '__main__':
    config_mod.cli(main, sys.argv[1:], __doc__, config_mod.settings_help())
