"""
The H-LVLM's vision encoder, pretrained here: our stand-in for the paper's CLIP. (ImageNet CNNs
and the cached features of a frozen encoder are in pretrained/.)

The paper's H-LVLM reads images through a pretrained, frozen CLIP ViT and first trains only
the projector (LLaVA's first stage). We cannot download CLIP, so we pretrain the encoder here,
on the training split alone, in one of two ways (--init_vision); both work for any --vision
(model.py's ViT or a torchvision model from scratch), and only the image encoder is kept:

  clip   the way CLIP was made: the image encoder (mean-pooled) and a text encoder (a GPT read
         at the caption's last token, as CLIP reads its causal text transformer at end-of-text)
         learn to place each image nearest to its own caption among the batch (symmetric
         InfoNCE with a learned temperature).
  words  tagging, as Joulin et al. (2016) learned visual features from the words of photos'
         captions: a linear head on the pooled features predicts, for each of the commonest
         caption tokens, the share of the image's captions that use it (binary cross-entropy),
         on randomly cropped and flipped images. An image's several captions make one soft
         target. On Flickr8k the contrastive encoders learned the 6,400 training photos by
         heart; this one generalises, a little (docs/real-photos.md).

Like the reference, the encoder is trained on first use and cached, keyed by the data and recipe:

    python encoder.py configs/flickr_cpu.py     # only pretrain it, print its val score (settings: --help)
"""

import runs.startup  # noqa: F401  (first of all: a signal while the imports below load ends in one line)

import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import as_dict, load_config, settings_help
from data import batch_indices, load_splits, make_vocab, text_width
from model import GPT, gpt_config, vision_encoder
from prior_loss import IGNORE
from runs.caches import (cache_root, captions_fingerprint, content_key, images_fingerprint, load_or_build, recipe,
                         vocab_fingerprint)
from runs.cli import cli
from runs.devices import barrier, resolve_device
from runs.errors import ConfigError
from runs.files import check_origin, exclusive, load_checkpoint, save_checkpoint, weights_digest
from runs.optim import lr_at, make_optimizer, optimizer_step, set_lr
from runs.progress import Progress
from sources.images import to_unit_range


class CLIP(nn.Module):
    def __init__(self, cfg, vocab):
        super().__init__()
        self.vision, _, width = vision_encoder(cfg)     # the LVLM's encoder: model.py's ViT or a torchvision CNN
        self.text = GPT(gpt_config(cfg, vocab))
        self.image_proj = nn.Linear(width, cfg.vit_embd, bias=False)
        self.text_proj = nn.Linear(self.text.config.n_embd, cfg.vit_embd, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))     # CLIP's initial temperature

    def embed_images(self, images):
        return F.normalize(self.image_proj(self.vision(images).mean(dim=1)), dim=-1)

    def embed_texts(self, idx, targets):
        last = (targets != IGNORE).sum(dim=1) - 1          # the position that predicts end-of-text
        h = self.text.hidden(idx)[torch.arange(len(idx)), last]
        return F.normalize(self.text_proj(h), dim=-1)

    def forward(self, images, idx, targets):
        """Symmetric InfoNCE: row i's image and caption are the positive pair, the rest negatives."""
        logits = self.log_scale.clamp(max=math.log(100)).exp() * self.embed_images(images) @ \
            self.embed_texts(idx, targets).t()
        labels = torch.arange(len(images), device=images.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def first_of_each_image(image_ids):
    """Positions of the first occurrence of each image id in a 1-D tensor."""
    seen, keep = set(), []
    for pos, img in enumerate(image_ids.tolist()):
        if img not in seen:
            seen.add(img)
            keep.append(pos)
    return torch.tensor(keep)


def batch(data, rows, device):
    T = text_width(data.targets[rows])           # on the host: no device sync
    images, idx, targets, _ = data.batch(rows, device)
    return images, idx[:, :T], targets[:, :T]


class WordTagger(nn.Module):
    """The encoder (mean-pooled) and a linear head: which of the words does each image show?"""

    def __init__(self, cfg, words):
        super().__init__()
        self.vision, _, width = vision_encoder(cfg)
        self.words = words                       # token ids, one per output
        self.head = nn.Linear(width, len(words))

    def forward(self, images, targets):
        return F.binary_cross_entropy_with_logits(self.head(self.vision(images).mean(dim=1)), targets)


N_WORDS = 1000           # the tagger's vocabulary: the caption tokens found with the most images


def word_targets(data, words=None):
    """([n_images, n_words] share of each image's captions that use each word, the words). The words
    (token ids) are the N_WORDS tokens used for the most images of `data`, leaving out those of more
    than half of them ('a', '.', end-of-text): they would say little about any one image."""
    V = int(max(data.targets.max(), -1 if words is None else words.max())) + 1
    image_word = torch.cat([int(data.image_index[r]) * V + t[t != IGNORE].unique() for r, t in enumerate(data.targets)])
    pairs, n_captions_with = torch.unique(image_word, return_counts=True)    # one caption counts a word once
    if words is None:
        n_images_with = torch.bincount(pairs % V, minlength=V)
        n_images_with[n_images_with > len(data.image_index.unique()) / 2] = 0
        words = n_images_with.argsort(descending=True, stable=True)[:N_WORDS]
        words = words[n_images_with[words] > 0]
    column = torch.full((V,), -1)
    column[words] = torch.arange(len(words))
    image, word = pairs // V, pairs % V
    keep = column[word] >= 0
    n_captions = torch.bincount(data.image_index, minlength=len(data.images)).clamp(min=1)
    targets = torch.zeros(len(data.images), len(words))
    targets[image[keep], column[word[keep]]] = n_captions_with[keep] / n_captions[image[keep]]
    return targets, words


def random_crop_flip(images, generator, min_scale=0.7):
    """Each image cropped to a random min_scale..1 of its sides, resized back and mirrored half the
    time: the same photo is never seen twice alike, which keeps a small dataset from being learned by heart."""
    _, _, H, W = images.shape
    out = torch.empty_like(images)
    for i, image in enumerate(images):
        scale = min_scale + (1 - min_scale) * torch.rand(1, generator=generator).item()
        h, w = max(1, round(H * scale)), max(1, round(W * scale))
        top = torch.randint(0, H - h + 1, (1,), generator=generator).item()
        left = torch.randint(0, W - w + 1, (1,), generator=generator).item()
        crop = F.interpolate(image[None, :, top:top + h, left:left + w], size=(H, W), mode='bilinear',
                             align_corners=False)[0]
        out[i] = crop.flip(-1) if torch.rand(1, generator=generator).item() < 0.5 else crop
    return out


def pixels(data, image_ids):
    return to_unit_range(torch.stack([data.images[i] for i in image_ids.tolist()]))


def optimise(model, cfg, loss_at, log, what):
    """cfg.enc_max_iters steps of the project's optimiser on loss_at(step)."""
    optimizer = make_optimizer(model, cfg.enc_learning_rate, cfg)
    warmup, progress = max(1, cfg.enc_max_iters // 20), Progress(cfg.enc_max_iters)
    for it in range(cfg.enc_max_iters):
        set_lr(optimizer, lr_at(it, cfg.enc_learning_rate, warmup, cfg.enc_max_iters, cfg.min_lr_ratio))
        loss = loss_at(it)
        loss.backward()
        optimizer_step(model, optimizer, cfg.grad_clip)
        if it % 100 == 0 or it == cfg.enc_max_iters - 1:
            log(f"encoder iter {progress.line(it + 1)}: {what} loss {loss.item():.4f}")
    return model.eval()


def pretrain_clip(cfg, train, vocab, device, log=print):
    model = CLIP(cfg, vocab).to(device).train()

    def loss_at(it):
        rows = batch_indices(len(train), cfg.enc_batch_size, it * cfg.enc_batch_size, 0)
        # a second caption of an image in the batch would be a false negative: keep one per image
        rows = rows[first_of_each_image(train.image_index[rows])]
        return model(*batch(train, rows, device))
    return optimise(model, cfg, loss_at, log, 'contrastive')


def pretrain_words(cfg, train, device, log=print):
    targets, words = word_targets(train)
    model = WordTagger(cfg, words).to(device).train()
    image_ids, augment = train.image_index.unique(), torch.Generator().manual_seed(0)

    def loss_at(it):
        ids = image_ids[batch_indices(len(image_ids), cfg.enc_batch_size, it * cfg.enc_batch_size, 0)]
        return model(random_crop_flip(pixels(train, ids), augment).to(device), targets[ids].to(device))
    return optimise(model, cfg, loss_at, log, 'word')


@torch.no_grad()
def retrieval_r1(model, data, device, n=256):
    """Image -> caption R@1 among the first n distinct images (chance 1/n)."""
    first = {}
    for row, img in enumerate(data.image_index.tolist()):
        first.setdefault(img, row)
    rows = torch.tensor(list(first.values())[:n])
    images, idx, targets = batch(data, rows, device)
    sims = model.embed_images(images) @ model.embed_texts(idx, targets).t()
    return (sims.argmax(dim=1) == torch.arange(len(rows), device=sims.device)).float().mean().item()


@torch.no_grad()
def word_loss(model, train, val, device):
    """(the tagger's loss on val images, the loss of predicting each word by its training frequency alone)."""
    train_targets, _ = word_targets(train, model.words)
    targets, _ = word_targets(val, model.words)
    ids = val.image_index.unique()
    targets = targets[ids]
    loss = sum(model(pixels(val, chunk).to(device), targets[k:k + 256].to(device)).item() * len(chunk)
               for k, chunk in zip(range(0, len(ids), 256), ids.split(256))) / len(ids)
    prior = train_targets[train.image_index.unique()].mean(0).clamp(1e-6, 1 - 1e-6).expand_as(targets)
    return loss, F.binary_cross_entropy(prior, targets).item()


def val_report(cfg, model, train, val, device):
    if cfg.init_vision == 'clip':
        n = min(256, len(val.image_index.unique()))
        return f"val image->caption R@1 {retrieval_r1(model, val, device):.3f} among {n} (chance {1 / n:.3f})"
    loss, prior = word_loss(model, train, val, device)
    return f"val word loss {loss:.4f} (by word frequency alone, not looking: {prior:.4f})"


# The settings the encoder's pretraining reads, and all it is given (encoder_recipe): the encoder cache's key.
ENCODER_SETTINGS = ('init_vision', 'vision', 'vision_features', 'image_size', 'patch_size', 'vit_layer', 'vit_embd',
                    'n_head', 'dropout', 'init_lm', 'gpt2_model', 'block_size', 'n_layer', 'n_embd', 'enc_max_iters',
                    'enc_batch_size', 'enc_learning_rate', 'weight_decay', 'beta1', 'beta2', 'grad_clip',
                    'min_lr_ratio')


def encoder_recipe(cfg):
    """cfg's ENCODER_SETTINGS (runs.caches.recipe); of init_lm, CLIP's text tower depends only on
    whether it has GPT-2's shape (reference.reference_recipe likewise)."""
    r = recipe(cfg, ENCODER_SETTINGS)
    if r.init_lm != 'gpt2':
        r.init_lm, r.gpt2_model = 'scratch', ''
    return r


def default_vision_ckpt(cfg, train, vocab):
    """Where the cache keeps the encoder pretrained on these captions (by content), vocabulary, images and recipe."""
    key = content_key([captions_fingerprint(train), vocab_fingerprint(vocab), images_fingerprint(train),
                       vars(encoder_recipe(cfg))])
    return os.path.join(cache_root(cfg), 'encoder', key, 'encoder.pt')


def pretrain(recipe, train, vocab, device, log=print, val=None):
    """The vision encoder pretrained on the training split as `recipe` (encoder_recipe) says, reported on `val`."""
    torch.manual_seed(0)                         # one encoder per data and recipe, whatever the run's seed
    model = pretrain_clip(recipe, train, vocab, device, log) if recipe.init_vision == 'clip' \
        else pretrain_words(recipe, train, device, log)
    if val is not None:
        log(f"encoder: {val_report(recipe, model, train, val, device)}")
    return model.vision


def ensure_encoder(cfg, train, vocab, device, log=print, is_master=True, val=None):
    """Path of the pretrained encoder for this data and recipe (cfg.vision_ckpt, or trained on first use;
    a damaged or foreign file in the cache is trained anew, as the reference's and the features' are).
    Under DDP only the master process builds it; the others wait at a barrier."""
    path = cfg.vision_ckpt or default_vision_ckpt(cfg, train, vocab)
    origin = {'data_fingerprint': captions_fingerprint(train), 'image_fingerprint': images_fingerprint(train)}

    def load(where):
        check_origin(load_checkpoint(where, required=('vision',)), where, 'vision', **origin)

    def build(where, why):
        how = 'contrastively (CLIP-style)' if cfg.init_vision == 'clip' else 'to tag caption words'
        log(f"encoder: {why}; pretraining the {cfg.vision} {how} first")
        vision = pretrain(encoder_recipe(cfg), train, vocab, device, log, val).state_dict()
        save_checkpoint({'vision': vision, **origin, 'config': as_dict(cfg), 'weights_sha256': weights_digest(vision)},
                        where)
    if is_master:
        with exclusive(path):                    # a second run asking for the same encoder waits for it
            load_or_build(path, load, build, bool(cfg.vision_ckpt))
    barrier()
    return path


def load_encoder_into(vision, path):
    try:
        vision.load_state_dict(load_checkpoint(path, required=('vision',))['vision'])
    except RuntimeError as e:                    # names of missing or misshapen weights
        raise ConfigError(f"vision encoder {path} does not fit this {type(vision).__name__} (vision, vit_layer, "
                          f"vit_embd, image_size, patch_size?): {' '.join(str(e).split())[:200]}") from None


def main(argv):
    cfg = load_config(argv)
    device = resolve_device(cfg.device)
    splits = load_splits(cfg, names=('train', 'val'))
    vocab = make_vocab(cfg, splits['train'])
    for data in splits.values():
        data.encode(vocab)
    print(f"encoder: {ensure_encoder(cfg, splits['train'], vocab, device, val=splits['val'])}")


if __name__ == '__main__':
    cli(main, sys.argv[1:], __doc__, settings_help())
