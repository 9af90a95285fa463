"""
Caches: where they live, keyed and checked by what they were computed from. A cache of several
files is committed by a manifest written last (each file's size and sha256, and the inputs it
was made from) and checked on every read: a torn, foreign or stale cache is never used.
"""

import hashlib
import json
import os
import types

import numpy as np
import torch

from runs.errors import ConfigError
from runs.files import atomic_write, file_sha256


def cache_root(cfg):
    """The caches' folder: --cache_dir, or 'cache' beside the run's folder (runs side by side share it)."""
    return os.path.abspath(cfg.cache_dir or os.path.join(os.path.dirname(os.path.abspath(cfg.out_dir)), 'cache'))


def content_key(inputs):
    """A short name for a cache made from `inputs` (JSON-able): other inputs, another name."""
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]


def recipe(cfg, settings):
    """The settings a cache's builder reads (`settings`, the cache's one declaration of them), as what the
    builder gets in place of cfg: reading any other setting there fails at once, so the cache's key, made
    from vars() of the same object, cannot leave out a setting its content depends on."""
    return types.SimpleNamespace(**{k: getattr(cfg, k) for k in settings})


def captions_fingerprint(data):
    """sha256 of a split's captions by content: each row's GPT-2 token ids and the row length
    (block_size); never the compact vocabulary's ids, which two vocabularies can give alike."""
    h = hashlib.sha256(f"block_size {data.block_size}".encode())
    for tokens in data.gpt2_tokens:
        row = np.asarray(tokens, dtype=np.int64)
        h.update(len(row).to_bytes(8, 'little') + row.tobytes())
    return h.hexdigest()


def vocab_fingerprint(vocab):
    """sha256 of a vocabulary (sources.tokenizer.Vocab) by content: the GPT-2 id of each of its ids."""
    return hashlib.sha256(json.dumps(vocab.gpt2_ids).encode()).hexdigest()


def images_fingerprint(data):
    """sha256 of a split's images by content: their pixels in memory, or their files' sha256 and the
    size they are read at."""
    if isinstance(data.images, torch.Tensor):
        return hashlib.sha256(data.images.numpy().tobytes()).hexdigest()
    return hashlib.sha256(json.dumps([data.images.digests, data.images.size]).encode()).hexdigest()


def image_digests(data):
    """The sha256 of each of a split's image files in order, as bytes (32 per file), or None for images
    made in memory (shapes: a function of the settings, which a resume checks)."""
    digests = getattr(data.images, 'digests', None)
    return None if digests is None else b''.join(bytes.fromhex(d) for d in digests)


def commit_cache(manifest_path, files, manifest):
    """Commit a cache of several files: each of `files` ({path: write(f)}) atomically, then the manifest
    (`manifest` plus each file's size and sha256), last: a cache with a manifest is whole. Returns it."""
    for path, write in files.items():
        atomic_write(path, write)
    record = {**manifest, 'files': {os.path.basename(p): {'size': os.path.getsize(p), 'sha256': file_sha256(p)}
                                    for p in files}}
    atomic_write(manifest_path, lambda f: f.write(json.dumps(record, indent=1).encode()))
    return record


def check_cache(manifest_path, expected):
    """The manifest of the cache at `manifest_path` if it is whole and was made from `expected` (a dict
    of its inputs), None if there is none; ConfigError naming the file if it is torn, foreign or stale."""
    if not os.path.isfile(manifest_path):
        return None
    try:
        with open(manifest_path, 'rb') as f:
            found = json.loads(f.read().decode())
    except (ValueError, OSError) as e:           # torn, foreign, not UTF-8 (all ValueErrors) or unreadable
        raise ConfigError(f"cache manifest {manifest_path} cannot be read ({type(e).__name__})") from None
    if not isinstance(found, dict) or not isinstance(found.get('files'), dict):
        raise ConfigError(f"cache manifest {manifest_path} is not one this code wrote")
    wrong = [k for k in expected if found.get(k) != expected[k]]
    if wrong:
        raise ConfigError(f"cache {manifest_path} was made from other inputs ({', '.join(wrong)} differ)")
    for name, meta in found['files'].items():
        path = os.path.join(os.path.dirname(manifest_path), name)
        whole = os.path.isfile(path) and os.path.getsize(path) == meta.get('size')
        if not whole or file_sha256(path) != meta.get('sha256'):
            raise ConfigError(f"cache file {path} is missing, truncated or changed since its manifest was written")
    return found


def load_or_build(path, load, build, user_given):
    """load(path), after build(path, why) when there is no file there yet, or a damaged or foreign one
    (load raised ConfigError: `why` says which) that the cache may replace; a file the user named
    (user_given) is never replaced: its error stands. Hold exclusive(path) around it when processes may race."""
    try:
        return load(path)
    except FileNotFoundError:
        why = f"no checkpoint at {path}"
    except ConfigError as e:
        if user_given:
            raise
        why = str(e)
    build(path, why)
    return load(path)
