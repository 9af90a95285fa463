"""
The features of a frozen pretrained encoder, computed once. A frozen encoder maps each image to the
same features in every epoch, so they are computed once per split, stored memory-mapped (float16)
and served in place of the pixels: training then skips decoding and the encoder entirely. The
cache is keyed by the images' content and the encoder's weights, and checked against both.
"""

import os
import time

import numpy as np
import torch

from runs.caches import check_cache, commit_cache, content_key, images_fingerprint
from runs.devices import barrier
from runs.errors import ConfigError
from runs.files import exclusive, weights_digest
from sources.images import to_unit_range


class Features:
    """A split's cached features [n_images, P, F] standing in for its images (see CaptionData); with a
    second view (flipped), image n_images + i is image i's second view."""

    def __init__(self, *views):
        self.views = views

    def __len__(self):
        return len(self.views) * len(self.views[0])

    def __getitem__(self, i):
        view, i = divmod(int(i), len(self.views[0]))
        return torch.from_numpy(np.array(self.views[view][i], dtype=np.float32))


@torch.no_grad()
def compute_features(vision, data, device, flipped=False, batch_size=128):
    """[n_images, P, F] float16 features of the split's images (mirrored left-right if `flipped`)."""
    vision.eval()
    out = None
    for start in range(0, len(data.images), batch_size):
        rows = range(start, min(start + batch_size, len(data.images)))
        pixels = to_unit_range(torch.stack([data.images[i] for i in rows]).to(device))
        pixels = pixels.flip(-1) if flipped else pixels
        f = vision(pixels).float().cpu().numpy()
        if out is None:
            out = np.empty((len(data.images), *f.shape[1:]), dtype=np.float16)
        out[start:start + len(f)] = f
    return out


def caches_features(cfg):
    """Whether a run reads its images through cached features: an H-LVLM whose pretrained encoder stays frozen
    (every pass would give the same features again; on CPU the encoder costs more than the rest)."""
    return cfg.arch == 'h' and cfg.freeze_vision and cfg.init_vision != 'scratch' and cfg.cache_features


def use_cached_features(splits, vision, device, folder, log=print, is_master=True, flip=()):
    """Replace every split's images by the frozen `vision` encoder's features, computed on first use
    into folder/features/<key of the images' content + encoder weights>/ and checked against both
    (and the array file's sha256) when read; a torn or stale cache is computed anew. The splits named
    in `flip` get a second view, the photos mirrored left-right and cached the same way: such a split
    is replaced in `splits` by one holding each caption twice, once with each view."""
    encoder_sha = weights_digest(vision.state_dict())
    for name, data in list(splits.items()):
        views = [cached_view(data, vision, device, folder, encoder_sha, name, flipped, log, is_master)
                 for flipped in (False, True)[:1 + (name in flip)]]
        data.images = Features(*views)
        if len(views) == 2:
            splits[name] = data.with_second_view()
            log(f"data: {name} {len(data)} captions x 2 views (as is, mirrored) = {len(splits[name])} rows")


def cached_view(data, vision, device, folder, encoder_sha, name, flipped, log, is_master):
    """One view of a split's features as a read-only memory map, computed by the master on first use."""
    inputs = {'images': images_fingerprint(data), 'encoder_sha256': encoder_sha,        # the same weights can
              'encoder': [type(vision).__name__, getattr(vision, 'features', '')]}   # give other features
    if flipped:                                  # (the unflipped key stays what it was before flip_view)
        inputs['view'] = 'flipped'
    path = os.path.join(folder, 'features', content_key(inputs), 'features.npy')
    manifest_path, found = path[:-4] + '.json', None
    if is_master:
        with exclusive(path):
            try:
                found = check_cache(manifest_path, inputs)
            except ConfigError as e:
                log(f"encoder: {e}; computing the features again")
            if found is None:
                t0 = time.time()
                features = compute_features(vision, data, device, flipped)
                found = commit_cache(manifest_path, {path: lambda f: np.save(f, features)},
                                     {**inputs, 'shape': list(features.shape)})
                log(f"encoder: {name} features{' (flipped)' if flipped else ''} {features.shape} in "
                    f"{time.time() - t0:.1f}s -> {path}")
    barrier()
    found = found or check_cache(manifest_path, inputs)
    array = np.load(path, mmap_mode='r') if found else None
    if array is None or list(array.shape) != found.get('shape') or len(array) != len(data.images):
        raise ConfigError(f"feature cache {path} does not match its images or encoder; delete its folder")
    return array
