"""
Continuing a run: what a resume may change and what it checks. A resume continues the same
computation, or is refused with one line saying why: settings before any data is read, then the
training captions, images and reference by content.
"""

import dataclasses

import torch

from runs.caches import image_digests
from runs.errors import ConfigError
from runs.files import load_checkpoint

# What a resume may change: how long, how often, where and how fast, never what is computed.
# The data's and caches' places may move too: what they hold is checked by content.
RESUMABLE = ('max_iters', 'log_interval', 'eval_interval', 'ckpt_interval', 'final_eval', 'num_workers',
             'device', 'compile', 'out_dir', 'resume', 'wandb_project', 'dataset', 'image_root', 'cache_dir')
# What a checkpoint records of its inputs, checked on resume: {key: what it is}. The val and test
# images too: the val curve and the test metrics would not be those of an uninterrupted run.
INPUTS = {'data_fingerprint': 'training captions (token rows)', 'image_fingerprint': 'training images',
          'eval_image_fingerprint': 'val or test images', 'reference_sha256': 'reference LM'}
SHOWN = 3                                        # changed image files named in a refusal


def check_resume(cfg, ckpt_path, global_batch):
    """Before any data is read: (the checkpoint a resume continues, cfg with its schedule), or (None,
    cfg) for a new run. A resume may change the RESUMABLE settings and nothing else, nor the global
    batch. Extending max_iters keeps the checkpoint's learning-rate schedule: the cosine still ends
    where the run first planned (lr_decay_iters) and the added steps run at its minimum rate."""
    if not cfg.resume:
        return None, cfg
    ckpt = load_checkpoint(ckpt_path, required=('model', 'optimizer', 'config', 'step', 'rng'))
    saved = {**dataclasses.asdict(type(cfg)()), **ckpt['config']}     # keys added since: defaults
    saved['lr_decay_iters'] = saved['lr_decay_iters'] or saved['max_iters']
    cfg = dataclasses.replace(cfg, lr_decay_iters=cfg.lr_decay_iters or saved['lr_decay_iters'])
    now = dataclasses.asdict(cfg)
    changed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in now if k not in RESUMABLE and saved.get(k) != now[k]]
    if changed:
        raise ConfigError(f"--resume would change the result: {', '.join(changed)} (a resume may change only "
                          f"{', '.join(RESUMABLE)})")
    if ckpt['data_position'] != ckpt['step'] * global_batch:
        raise ConfigError(f"--resume: the global batch is {global_batch}, not the checkpoint's (other process count?)")
    return ckpt, cfg


def resume(ckpt, model, optimizer, scaler, inputs, log, ckpt_path, cfg, splits=None):
    """Load model, optimiser (and loss scaler) from a checked checkpoint (check_resume); returns its step,
    or 0 for a new run. Refused if the training captions, the images of any split (the first few changed
    files of `splits` named) or the reference are not the ones it was trained with (`inputs`, as INPUTS):
    the run would not continue the same computation."""
    if ckpt is None:
        return 0
    changed = [what for key, what in INPUTS.items() if key in ckpt and ckpt[key] != inputs[key]]
    if changed:
        files = changed_images(ckpt.get('image_digests') or {}, splits or {})
        raise ConfigError(f"--resume: the {' and the '.join(changed)} differ from the checkpoint's{files}, so the "
                          f"run would not continue the same computation; restore them, or start a new out_dir")
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    if scaler is not None:
        scaler.load_state_dict(ckpt['scaler'])
    saved = ckpt['config']
    moved = [f"{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUMABLE
             if k != 'resume' and saved.get(k, getattr(cfg, k)) != getattr(cfg, k)]
    log(f"resumed from {ckpt_path} at step {ckpt['step']}" + (f" ({', '.join(moved)})" if moved else ''))
    return ckpt['step']


def changed_images(saved, splits):
    """' (changed: FILE, ...)', the first SHOWN image files of `splits` whose sha256 differs from the
    checkpoint's record (`saved`: {split: runs.caches.image_digests}), or '' if it cannot tell."""
    found, n = [], 0
    for name, before in saved.items():
        now = image_digests(splits[name]) if name in splits else None
        if now is None or before is None:
            continue
        if len(now) != len(before):
            found.append(f"the {name} split has {len(now) // 32} image files, the checkpoint's {len(before) // 32}")
            n += 1
            continue
        differ = [i for i in range(len(now) // 32) if now[32 * i:32 * i + 32] != before[32 * i:32 * i + 32]]
        found += [splits[name].images.paths[i] for i in differ[:SHOWN]]
        n += len(differ)
    more = f" and {n - SHOWN} more" if n > SHOWN else ''
    return f" (changed: {', '.join(found[:SHOWN])}{more})" if found else ''


def restore_rng(ckpt, cuda):
    """Dropout masks continue as if never interrupted (call last: other set-up draws from the RNG)."""
    torch.set_rng_state(ckpt['rng']['cpu'])
    if cuda and ckpt['rng']['cuda'] is not None:
        torch.cuda.set_rng_state(ckpt['rng']['cuda'])
