"""
Data: the caption arrays, and the seeded stream of batches that feeds training.

A caption becomes one row of three aligned arrays of length block_size (nanoGPT's x, y):

    idx      BOS  a    red  circle ...  .    pad  pad        (BOS = GPT-2's <|endoftext|>)
    targets  a    red  circle ...  .    EOT  -1   -1         (the one label shift of the project)
    classes  F    R    R      ...  F    F    -1   -1         (true token class of each target)

Everything the model must predict (every caption token and the closing EOT) has a target;
the rest is IGNORE (-1). `classes` says, for evaluation only, whether a target token is
image-relevant (colour, shape, position, count), filler that the text alone predicts
("a photo of"), or noise that neither text nor image predicts ("taken by Ana in Lima"); see
sources/shapes.py. Captions from disk (sources/captions.py) are UNLABELLED. Read next: train.py.
"""

import functools

import numpy as np
import torch

from prior_loss import IGNORE
from runs.devices import to_device
from runs.errors import ConfigError
from runs.stopping import ignore_stop_signals
from sources import shapes
from sources.captions import caption_splits
from sources.images import ImageFiles, to_unit_range
from sources.tokenizer import EOT, Vocab

UNLABELLED = 3                                  # real captions: token class unknown


def make_vocab(cfg, train):
    """The model's vocabulary (sources/tokenizer.py): the GPT-2 ids of the training captions, mapped to
    0..n-1 plus one unknown id (a tiny model needs no 50,257 output rows), or all of GPT-2's
    (needed by --init_lm=gpt2). It travels in every checkpoint."""
    return Vocab(None) if cfg.init_lm == 'gpt2' or cfg.vocab == 'gpt2' else Vocab.from_captions(train.gpt2_tokens)


class CaptionData:
    """One split: an image store and aligned text rows [N,T] (one row per caption).

    `images[image_index[row]]` is the uint8 [3,H,W] image of a row: a tensor for shapes,
    images.ImageFiles (decoded on demand) for data on disk."""

    def __init__(self, images, image_index, texts, gpt2_tokens, token_classes, token_attrs, block_size,
                 objects=None):
        self.images, self.image_index, self.texts, self.objects = images, image_index, texts, objects
        self.gpt2_tokens, self.block_size = gpt2_tokens, block_size
        self.token_classes, self.token_attrs = token_classes, token_attrs
        self.idx = self.targets = self.classes = self.attrs = None

    def __len__(self):
        return len(self.texts)

    def encode(self, vocab):
        """Fill idx/targets/classes/attrs with `vocab` ids; captions must fit block_size."""
        n, T = len(self), self.block_size
        idx = np.full((n, T), vocab.eot, dtype=np.int64)
        targets = np.full((n, T), IGNORE, dtype=np.int64)
        classes = np.full((n, T), IGNORE, dtype=np.int8)
        attrs = np.full((n, T), -1, dtype=np.int8)
        for i, tokens in enumerate(self.gpt2_tokens):
            k = len(tokens) + 1                  # caption tokens + closing EOT
            if k > T:
                raise ConfigError(f"caption {i} has {k} tokens with EOT, block_size is {T}: {self.texts[i]!r}")
            ids = vocab.encode(list(tokens) + [EOT])
            idx[i, 1:k] = ids[:-1]               # idx[0] stays BOS
            targets[i, :k] = ids
            classes[i, :k] = self.token_classes[i]       # includes the closing EOT's class
            attrs[i, :k - 1] = self.token_attrs[i]
        self.idx, self.targets = torch.from_numpy(idx), torch.from_numpy(targets)
        self.classes, self.attrs = torch.from_numpy(classes), torch.from_numpy(attrs)
        return self

    def subset(self, rows):
        """These rows (a list of row numbers) as a CaptionData of their own, encoded like this one."""
        rows = list(rows)
        pick = lambda items: None if items is None else [items[r] for r in rows]
        out = CaptionData(self.images, self.image_index[rows], pick(self.texts), pick(self.gpt2_tokens),
                          pick(self.token_classes), pick(self.token_attrs), self.block_size, pick(self.objects))
        for name in ('idx', 'targets', 'classes', 'attrs'):
            encoded = getattr(self, name)
            setattr(out, name, None if encoded is None else encoded[rows])
        return out

    def with_second_view(self):
        """Each caption twice: row len(self) + r is row r read with its image's second view, image
        n + i of `images` (n images a view; pretrained/features.py's flipped view)."""
        n_rows, n_images = len(self), len(self.images) // 2
        out = self.subset(list(range(n_rows)) * 2)
        out.image_index = torch.cat([self.image_index, self.image_index + n_images])
        return out

    def __getitem__(self, row):                  # for a DataLoader: (uint8 image, row)
        return self.images[int(self.image_index[row])], row

    def image_batch(self, rows):
        if isinstance(self.images, torch.Tensor):
            return self.images[self.image_index[rows]]
        return torch.stack([self.images[i] for i in self.image_index[rows].tolist()])

    def text_batch(self, rows, device):
        return to_device(self.idx[rows], device), to_device(self.targets[rows], device), \
            to_device(self.classes[rows], device)

    def batch(self, rows, device, images=None):
        """(images as float in [-1, 1], idx, targets, classes) on `device`; `images` (uint8)
        when a DataLoader already fetched them. A split whose images were replaced by a frozen
        encoder's cached features (encoder.use_cached_features) serves those instead. The captions
        of images skipped as bad (ImageFiles, --skip_bad) have no targets: nothing learns from them."""
        images = self.image_batch(rows) if images is None else images
        images = to_device(images, device)
        images = to_unit_range(images) if images.dtype == torch.uint8 else images.float()  # or features
        idx, targets, classes = self.text_batch(rows, device)
        bad = self.images.broken(self.image_index[rows]) if isinstance(self.images, ImageFiles) else None
        if bad is not None and bad.any():        # read on the host: no device sync
            bad = to_device(bad, device)[:, None]
            targets, classes = targets.masked_fill(bad, IGNORE), classes.masked_fill(bad, IGNORE)
        return images, idx, targets, classes


def make_caption_splits(cfg, names, log=print):
    """Splits of real image-caption data, read and checked by sources/captions.py. Real captions carry
    no token classes."""
    out = {}
    for name, split in caption_splits(cfg, names, log).items():
        images = ImageFiles(split.paths, cfg.image_size, split.digests, cfg.skip_bad)
        out[name] = CaptionData(images, torch.tensor(split.image_index), split.texts, split.tokens,
                                [np.full(len(t) + 1, UNLABELLED, dtype=np.int8) for t in split.tokens],  # + closing EOT
                                [np.full(len(t), -1, dtype=np.int8) for t in split.tokens], cfg.block_size)
    return out


def load_splits(cfg, names=('train', 'val', 'test'), log=print):
    """The named splits of cfg.dataset ('shapes', or a path to data on disk; 'all' = every
    caption of a dataset on disk as one split), unencoded (call .encode(vocab) next)."""
    if cfg.dataset != 'shapes':
        return make_caption_splits(cfg, tuple(names), log)
    # Disjoint, reproducible splits: each split draws from its own seed stream.
    sizes = {'train': cfg.n_train, 'val': cfg.n_val, 'test': cfg.n_test}
    unknown = set(names) - set(sizes)
    if unknown:
        raise ConfigError(f"shapes has no split {sorted(unknown)} (it has {list(sizes)})")
    # caption noise is a property of the training captions; val and test describe what is there
    return {name: shapes_split(n, [cfg.data_seed, k], cfg.image_size, cfg.noise_rate, cfg.pixel_noise,
                               cfg.block_size, cfg.filler, cfg.caption_noise if name == 'train' else 0.0)
            for k, (name, n) in enumerate(sizes.items()) if name in names}


def shapes_split(n, seed, image_size, noise_rate, pixel_noise, block_size, filler='default', caption_noise=0.0):
    """n images of the built-in shapes data (sources/shapes.py), one caption each, as a CaptionData."""
    images, texts, tokens, classes, attrs, objects = shapes.make_shapes(n, seed, image_size, noise_rate,
                                                                        pixel_noise, filler, caption_noise)
    return CaptionData(torch.from_numpy(images), torch.arange(n), texts, tokens, classes, attrs, block_size, objects)


def global_batch(cfg, world=1):
    """Captions per training step: batch_size per process and micro-step, grad_accum micro-steps, world processes."""
    return cfg.batch_size * cfg.grad_accum * world


def micro_batches(n_items, cfg, world, rank, start_step, end_step):
    """Row lists of one process's micro-batches, step after step. Micro-step m of rank r
    takes slice m*world + r of the step's global batch: the same partition of the global
    batch whatever the split between processes and accumulation steps (so DDP == 1 process)."""
    for step in range(start_step, end_step):
        rows = step_rows(n_items, global_batch(cfg, world), step, cfg.seed)
        for micro in range(cfg.grad_accum):
            part = micro * world + rank
            yield rows[part * cfg.batch_size:(part + 1) * cfg.batch_size].tolist()


def step_rows(n_items, n_rows, step, seed):
    """The n_rows rows of training step `step`'s global batch."""
    return batch_indices(n_items, n_rows, step * n_rows, seed)


def step_token_count(data, n_rows, step, seed):
    """Caption tokens in training step `step`'s global batch of n_rows: the denominator of its loss."""
    return int((data.targets[step_rows(len(data), n_rows, step, seed)] != IGNORE).sum())


def text_width(targets):
    """Columns up to the last caption token of the longest row; the ones after are all padding."""
    return int((targets != IGNORE).sum(1).max())


def _collate(items):
    return torch.stack([image for image, _ in items]), torch.tensor([row for _, row in items])


def make_loader(data, row_batches, num_workers=0, pin_memory=False):
    """A DataLoader yielding (uint8 images, rows) for each row list of `row_batches`, with
    worker processes decoding images ahead of the training step."""
    return torch.utils.data.DataLoader(data, batch_sampler=row_batches, collate_fn=_collate,
                                       num_workers=num_workers, pin_memory=pin_memory,
                                       persistent_workers=False, worker_init_fn=ignore_stop_signals)


def batch_indices(n_items, batch_size, position, seed):
    """Indices of `batch_size` consecutive samples starting at sample `position` of an
    endless stream that visits the data in a fresh seeded permutation every epoch. The
    stream is a pure function of (seed, position): resuming needs only the position."""
    pos = torch.arange(position, position + batch_size)
    epochs, within = pos // n_items, pos % n_items
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        sel = epochs == epoch
        out[sel] = epoch_order(n_items, seed, epoch)[within[sel]]
    return out


@functools.lru_cache(maxsize=4)      # one shuffle per epoch, shared by every caller in that epoch
def epoch_order(n_items, seed, epoch):
    """The seeded permutation of the data for one epoch (read-only: callers index it)."""
    return torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
