"""
The reference LM's files: where the cache keeps it (keyed by the data and its recipe), the score
cache of the training captions beside it (its manifest records the token rows' sha256, the
tokenizer, the vocabulary and the reference file's sha256), and the run folder's own copy of the
reference, named in every checkpoint by digest, so that eval.py needs no path that may have moved.
"""

import os
import time

import numpy as np

from runs.caches import cache_root, captions_fingerprint, check_cache, commit_cache, content_key, vocab_fingerprint
from runs.errors import ConfigError
from runs.files import atomic_write, file_sha256, load_checkpoint, weights_digest


def default_ref_ckpt(cfg, recipe, train, vocab):
    """Where the reference for these training captions, vocabulary and `recipe` (runs.caches.recipe of what
    it is trained with) lives in the cache, unless --ref_ckpt says otherwise."""
    key = content_key([captions_fingerprint(train), vocab_fingerprint(vocab), vars(recipe)])
    return os.path.join(cache_root(cfg), 'ref', key, 'ref.pt')


def cache_paths(ref_ckpt):
    """The score cache of the training captions, beside the reference checkpoint."""
    base = os.path.join(os.path.dirname(ref_ckpt), "ref_probs_train")
    return base + '.npy', base + '.json'


def write_cache(ref_probs, manifest, ref_ckpt):
    npy, meta = cache_paths(ref_ckpt)
    commit_cache(meta, {npy: lambda f: np.save(f, ref_probs)}, manifest)


def expected_manifest(data, vocab, ref_ckpt):
    return {'data_fingerprint': captions_fingerprint(data), 'tokenizer': 'r50k_base',
            'vocab_sha256': vocab_fingerprint(vocab),
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


def cached_scores(ref_ckpt, data, vocab, score, log=print):
    """The checked score cache of the training captions `data`; if there is none, or a stale or torn
    one, score() computes the scores [N, T] and they are written (and read back checked) first."""
    try:
        return load_cache(ref_ckpt, data, vocab)
    except (FileNotFoundError, ConfigError) as e:
        if isinstance(e, ConfigError):
            log(str(e))
    t0 = time.time()
    write_cache(score(), expected_manifest(data, vocab, ref_ckpt), ref_ckpt)
    log(f"reference: scored {len(data)} training captions in {time.time() - t0:.1f}s -> {cache_paths(ref_ckpt)[0]}")
    return load_cache(ref_ckpt, data, vocab)


def reference_file(path, gpt2_ids):
    """A reference checkpoint's dict, refused (one line) if it is another kind of file or of another
    vocabulary than the model's (`gpt2_ids`, its Vocab's)."""
    ref = load_checkpoint(path, required=('model', 'model_args', 'vocab'))
    if 'step' in ref or 'optimizer' in ref:
        raise ConfigError(f"{path} is a train.py checkpoint, not a reference LM (pass its reference.pt or ref.pt)")
    if ref['vocab']['gpt2_ids'] != gpt2_ids:
        raise ConfigError(f"reference {path} has another vocabulary than the model; pass the run's own reference")
    return ref


def reference_of(ckpt, ckpt_path, gpt2_ids):
    """The run's reference checkpoint's dict, or None (an NTP run from scratch): its copy beside the
    checkpoint at `ckpt_path` (else at the path it was trained from), checked by digest; older
    checkpoints carry it inside or name its path. `gpt2_ids`: the model's vocabulary (its Vocab's)."""
    if ckpt.get('reference_sha256'):
        path = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), 'reference.pt') if ckpt_path \
            else ckpt['ref_ckpt']
        if not os.path.isfile(path):
            raise ConfigError(f"{path}, the run's reference, is missing; pass --ref_ckpt=PATH to its ref.pt")
        ref = reference_file(path, gpt2_ids)
        if weights_digest(ref['model']) != ckpt['reference_sha256']:
            raise ConfigError(f"{path} is not the reference this run trained with (its weights differ)")
        return ref
    if ckpt.get('reference'):
        return ckpt['reference']
    path = ckpt.get('ref_ckpt')
    if path and not os.path.isfile(path):
        raise ConfigError(f"this checkpoint predates self-contained ones and its reference {path} is not "
                          f"there (relative to {os.getcwd()}); run eval.py from the directory train.py ran in")
    return reference_file(path, gpt2_ids) if path else None


def copy_file(src, dst):
    """dst becomes a copy of src (atomically), unless it is one already."""
    if not os.path.isfile(dst) or file_sha256(dst) != file_sha256(src):
        with open(src, 'rb') as f:
            atomic_write(dst, lambda out: out.write(f.read()))


def keep_reference(ref_ckpt, out_dir):
    """The run's own copy of its reference, written once (checkpoints name it by digest), so that
    the run folder holds everything eval.py needs wherever it moves."""
    copy_file(ref_ckpt, os.path.join(out_dir, 'reference.pt'))


def restore_reference(cfg, default):
    """A resumed run whose cache folder lacks its reference (the run folder moved, or --cache_dir
    changed) puts its own copy there (`default`, default_ref_ckpt's path) instead of training it again
    (ensure_reference checks it)."""
    kept = os.path.join(cfg.out_dir, 'reference.pt')
    if not cfg.ref_ckpt and os.path.isfile(kept) and not os.path.isfile(default):
        copy_file(kept, default)
