"""
Caption your own images with a trained LVLM.

    python sample.py --ckpt=out/shapes_u/ckpt.pt photo.jpg [more.png FOLDER ...]
    python sample.py --ckpt=... photo.jpg --beam=3
    python sample.py --ckpt=... photo.jpg --temperature=0.8 --top_k=20 --num_samples=3
    python sample.py --ckpt=... photo.jpg --weights="a red circle in the north"
    python sample.py --ckpt=... photo.jpg --debias=True           # a PRIOR run with its tilt divided out

The run's own decoding by default (its config's `beam`: 1 is greedy), --beam=K for beam search of
width K, or --temperature > 0 to sample, optionally from the top_k tokens only. --debias=True
writes from the distribution with PRIOR's tilt divided out by the run's reference (any decoding).
A folder stands for every image file in it. --weights=CAPTION prints, for that caption and
each image, every token with the reference's P_r, its PRIOR weight (1 - P_r)^alpha normalised
to mean 1, and the LVLM's loss given the image: which words the text alone already predicts,
and which the model had to learn from the image. Paths are relative to where you run it.
"""

import runs.startup  # noqa: F401  (first of all: a signal while the imports below load ends in one line)

import os
import sys

import torch

from decoding.generate import generate
from eval import load_trained
from prior_loss import token_nll, token_weights
from reference import DEBIAS_MIN_WEIGHT, debias_for, reference_from, target_probs
from runs.cli import Flag, cli, flags_help, parse_flags
from runs.devices import resolve_device
from runs.errors import ConfigError
from runs.reference_files import reference_file, reference_of
from sources.images import checked_images, to_unit_range
from sources.tokenizer import EOT, get_tokenizer

FLAGS = {'ckpt': Flag('out/shapes_u/ckpt.pt', help='a train.py checkpoint'),
         'beam': Flag(0, low=0, help="1 greedy, K > 1 beam search of width K (0: the run's own setting, beam)"),
         'length_penalty': Flag(-1.0, help="beam search ranks log p / length^this (negative: the run's own setting)"),
         'temperature': Flag(0.0, low=0, help='0: greedy or beam search; above 0: sampled, more varied as it grows'),
         'top_k': Flag(0, low=0, help='sample from the k likeliest tokens only (0: from all)'),
         'num_samples': Flag(1, low=1, help='captions per image'),
         'max_new_tokens': Flag(0, low=0, help="tokens per caption at most (0: the model's block_size)"),
         'seed': Flag(1337, low=0, help='the sampling seed'),
         'device': Flag('auto', help='auto, cpu, cuda, cuda:N'),
         'weights': Flag('', help="a caption: print each token's P_r, PRIOR weight and LVLM loss per image"),
         'ref_ckpt': Flag('', help="--weights' reference LM ('' = the run's own)"),
         'debias': Flag(False, help="divide PRIOR's tilt out with the run's own reference (a loss=prior or prior_batch "
                                    "run; docs/beyond-prior.md)"),
         'debias_min_weight': Flag(DEBIAS_MIN_WEIGHT, low=0, high=1,
                                   help='with --debias: the weight floor w_min of the correction')}
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.webp')     # what torchvision.io decodes


def image_paths(args):
    """The image files named on the command line, a folder standing for the images in it."""
    paths = []
    for arg in args:
        if os.path.isdir(arg):
            paths += sorted(os.path.join(arg, f) for f in os.listdir(arg) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(arg):
            paths.append(arg)
        else:
            raise ConfigError(f"no such image or folder: {arg}")
    if not paths:
        raise ConfigError("no images given (see --help)")
    return paths


def caption_rows(text, vocab, block_size):
    """One caption as model inputs: idx (BOS + tokens) and targets (tokens + EOT), [1, k]."""
    tokens = get_tokenizer().encode_ordinary(text)[:block_size - 1]
    ids = torch.as_tensor(vocab.encode(tokens + [EOT]))
    idx = torch.cat([torch.tensor([vocab.eot]), ids[:-1]])
    return idx[None], ids[None], [get_tokenizer().decode([t]) for t in tokens] + ['<eot>']


@torch.no_grad()
def print_weights(model, images, paths, text, vocab, cfg, reference, device):
    ref, _ = reference_from(reference, device)
    idx, targets, pieces = (x.to(device) if torch.is_tensor(x) else x for x in caption_rows(text, vocab, cfg.block_size))
    ref_probs = target_probs(ref, idx, targets)
    weights = token_weights(ref_probs, targets, cfg.alpha, cfg.weight_floor)[0]
    for path, image in zip(paths, images):
        nll = token_nll(model(image[None], idx), targets)[0]
        print(f"\n{path}: {text!r}\n  {'token':>14} {'P_r':>6} {'weight':>7} {'LVLM loss':>10}")
        for k, piece in enumerate(pieces):
            mark = '  <- surprising to the text alone' if weights[k] > 1.5 else ''
            print(f"  {piece!r:>14} {ref_probs[0, k].item():6.3f} {weights[k].item():7.2f} {nll[k].item():10.3f}{mark}")


def main(argv):
    args = parse_flags([a for a in argv if a.startswith('--')], FLAGS)
    if args['beam'] > 1 and args['temperature'] > 0:
        raise ConfigError("--beam searches for the likeliest caption and --temperature samples one: choose one")
    device = resolve_device(args['device'])
    if not os.path.isfile(args['ckpt']):
        raise ConfigError(f"--ckpt: no checkpoint at {args['ckpt']}")
    model, vocab, cfg, ckpt = load_trained(args['ckpt'], device)
    debias = debias_for(cfg, reference_of(ckpt, args['ckpt'], vocab.gpt2_ids), device,
                        args['debias_min_weight']) if args['debias'] else None
    paths = image_paths([a for a in argv if not a.startswith('--')])
    files = checked_images(paths, cfg.image_size, cfg.max_image_pixels)      # as training reads its images
    images = to_unit_range(torch.stack([files[i] for i in range(len(paths))]).to(device))
    beam = 1 if args['temperature'] > 0 else args['beam'] or cfg.beam
    length_penalty = cfg.length_penalty if args['length_penalty'] < 0 else args['length_penalty']
    torch.manual_seed(args['seed'])
    max_new = args['max_new_tokens'] or cfg.block_size
    for n in range(args['num_samples']):
        ids = generate(model, images, bos=vocab.eot, eot=vocab.eot, max_new_tokens=max_new,
                       temperature=args['temperature'], top_k=args['top_k'] or None, beam=beam,
                       length_penalty=length_penalty, debias=debias)
        for path, row in zip(paths, ids):
            row = row[:row.index(vocab.eot)] if vocab.eot in row else row
            print(f"{path}{f' [{n + 1}]' if args['num_samples'] > 1 else ''}: {vocab.decode(row)}")
    if args['weights']:
        reference = reference_file(args['ref_ckpt'], vocab.gpt2_ids) if args['ref_ckpt'] else \
            reference_of(ckpt, args['ckpt'], vocab.gpt2_ids)
        if reference is None:
            raise ConfigError("--weights needs a reference LM and this run has none (an NTP run); "
                              "pass --ref_ckpt=PATH")
        print_weights(model, images, paths, args['weights'], vocab, cfg, reference, device)


if __name__ == '__main__':
    cli(main, sys.argv[1:], __doc__, flags_help(FLAGS))
