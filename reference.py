"""
PRIOR's text-only reference LM P_r: train a GPT on the training captions alone (no images), then
score every training caption token once, P_r(t_i | t_<i), and cache the scores on disk.

    python reference.py [config.py] [--key=value ...]      # every setting: --help

The LVLM reads the cached scores (memory-mapped): PRIOR costs one reference pass, paid once, not one
per epoch. Where the reference and its checked score cache live: runs/reference_files.py. At use time
the same reference can divide PRIOR's tilt back out of the trained model (Debias, --debias in eval.py
and sample.py; prior_loss.debias). Next: model.py.
"""

import runs.startup  # noqa: F401  (first of all: a signal while the imports below load ends in one line)

import functools
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from config import as_dict, load_config, settings_help
from data import batch_indices, load_splits, make_vocab, text_width
from model import GPT, GPTConfig, gpt_config
from pretrained.gpt2 import load_gpt2_into
from prior_loss import IGNORE, TILTED, debias, ntp_loss, token_nll
from runs.caches import captions_fingerprint, load_or_build, recipe
from runs.cli import cli
from runs.devices import barrier, resolve_device
from runs.errors import ConfigError
from runs.files import check_origin, exclusive, load_checkpoint, save_checkpoint, weights_digest
from runs.optim import lr_at, make_optimizer, optimizer_step, set_lr
from runs.progress import Progress
from runs.reference_files import cached_scores, default_ref_ckpt, load_cache
from sources.tokenizer import Vocab


# The settings train_reference reads, and all it is given (reference_recipe): the reference cache's key.
REFERENCE_SETTINGS = ('init_lm', 'gpt2_model', 'block_size', 'n_layer', 'n_head', 'n_embd', 'dropout', 'seed',
                      'ref_max_iters', 'ref_learning_rate', 'ref_batch_size', 'weight_decay', 'beta1', 'beta2',
                      'grad_clip', 'min_lr_ratio')


def reference_recipe(cfg):
    """cfg's REFERENCE_SETTINGS (runs.caches.recipe). init_lm says how the LVLM starts; of it, the
    reference depends only on whether GPT-2 starts it too, so 'ref' and 'scratch' runs share one."""
    r = recipe(cfg, REFERENCE_SETTINGS)
    if r.init_lm != 'gpt2':
        r.init_lm, r.gpt2_model = 'scratch', ''
    return r


def reference_path(cfg, train, vocab):
    """--ref_ckpt, or the cache's place for the reference of these captions, vocabulary and recipe."""
    return cfg.ref_ckpt or default_ref_ckpt(cfg, reference_recipe(cfg), train, vocab)


def train_reference(cfg, train, vocab, device, log=print):
    """Fit the GPT on the captions alone with plain NTP, with the LVLM's optimiser and step
    (runs/optim.py); its warmup is a twentieth of its iterations. `cfg`: a Config or its reference_recipe."""
    torch.manual_seed(cfg.seed)
    model = GPT(gpt_config(cfg, vocab)).to(device)
    if cfg.init_lm == 'gpt2':
        load_gpt2_into(model, cfg.gpt2_model)
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
                     'config': as_dict(cfg), 'data_fingerprint': captions_fingerprint(train),
                     'weights_sha256': weights_digest(model.state_dict())}, ref_ckpt)


def load_reference(ref_ckpt, device, train=None):
    """(GPT, vocabulary, checkpoint) of a reference; refused if its weights changed since it was
    saved or (given `train`, the training captions it is for) it was trained on other captions."""
    ckpt = load_checkpoint(ref_ckpt, map_location=device, required=('model', 'model_args', 'vocab'))
    check_origin(ckpt, ref_ckpt, 'model', **({'data_fingerprint': captions_fingerprint(train)} if train else {}))
    return (*reference_from(ckpt, device), ckpt)


def reference_from(state, device):
    """(GPT, Vocab) of a reference checkpoint's dict (its file's, or a run's own copy)."""
    model = GPT(GPTConfig(**state['model_args']))
    model.load_state_dict(state['model'])
    return model.to(device).eval(), Vocab(state['vocab']['gpt2_ids'])


def ensure_reference(cfg, train, vocab, device, log=print, is_master=True, scored=True):
    """(reference checkpoint path, cached P_r of the training captions, or None unless `scored`),
    trained and scored on first use. Under DDP only the master builds; the others wait, then load."""
    ref_ckpt, ref_probs = reference_path(cfg, train, vocab), None

    def build(path, why):
        log(f"reference: {why}; training the text-only reference LM first")
        save_reference(train_reference(reference_recipe(cfg), train, vocab, device, log), vocab, cfg, train, path)
    if is_master:
        with exclusive(ref_ckpt):                # a second run asking for the same reference waits for it
            load = functools.partial(load_reference, device=device, train=train)
            model, ref_vocab, _ = load_or_build(ref_ckpt, load, build, bool(cfg.ref_ckpt))
            if ref_vocab.gpt2_ids != vocab.gpt2_ids:
                raise ConfigError(f"reference {ref_ckpt} uses another vocabulary than this data")
            if scored:
                ref_probs = cached_scores(ref_ckpt, train, vocab, lambda: score_captions(model, train, device, log=log),
                                          log)
    barrier()
    if scored and ref_probs is None:             # the master wrote it
        ref_probs = load_cache(ref_ckpt, train, vocab)
    return ref_ckpt, ref_probs


DEBIAS_MIN_WEIGHT = 0.2   # the correction's weight floor w_min, chosen on val (docs/beyond-prior.md#debiased-prior)


@dataclass
class Debias:
    """PRIOR's tilt divided out of a trained LVLM wherever it is used (prior_loss.debias): the run's
    reference reads the same text beside the LVLM and gives P_r of every next token."""
    reference: GPT
    alpha: float
    weight_floor: float
    min_weight: float

    def __call__(self, logits, ref_logits):
        """Corrected log-probabilities [...,V] from the LVLM's logits and the reference's after the same text."""
        return debias(F.log_softmax(logits.float(), dim=-1), F.softmax(ref_logits.float(), dim=-1),
                      self.alpha, self.weight_floor, self.min_weight)

    def scores(self, model, images, idx):
        """Teacher-forced: corrected log-probabilities [B,T,V], used where model(images, idx)'s logits would be."""
        return self(model(images, idx), self.reference(idx))


def debias_for(cfg, reference, device, min_weight):
    """The Debias of a run (cfg: its config; reference: its reference checkpoint's dict, or None),
    refused in one line where there is no tilt to divide out or no reference to do it with."""
    if cfg.loss not in TILTED:
        raise ConfigError(f"--debias divides out the tilt of loss={' or '.join(TILTED)}; this run trained with "
                          f"loss={cfg.loss}, which has none (or not that one)")
    if reference is None:
        raise ConfigError("--debias needs the run's reference LM and this run has none; pass --ref_ckpt=PATH")
    ref, _ = reference_from(reference, device)
    return Debias(ref, cfg.alpha, cfg.weight_floor, min_weight)


def main(argv):
    cfg = load_config(argv)
    device = resolve_device(cfg.device)
    train = load_splits(cfg, names=('train',))['train']
    vocab = make_vocab(cfg, train)
    train.encode(vocab)
    ref_ckpt, ref_probs = ensure_reference(cfg, train, vocab, device)
    mask = (train.targets != IGNORE).numpy()
    print(f"reference: {ref_ckpt}; mean P_r over the training caption tokens {float(ref_probs[mask].mean()):.4f}")


if __name__ == '__main__':
    cli(main, sys.argv[1:], __doc__, settings_help())
