"""
Post-hoc look at where PRIOR puts the training weight in the noisy-caption condition: the mean
weight on the wrong shape words (the noise the text prior predicts), on the true shape words,
and on names and cities, per seed, from each PRIOR run's own reference cache. Not part of the
fixed protocol; it reads the finished runs.

    python -m study.token_weights [--results=study/results]
"""

import glob
import json
import os
import sys

import numpy as np
import torch

from checkpoint import load_checkpoint
from config import from_dict, parse_flags
from data import load_splits, make_vocab
from prior_loss import token_weights
from reference import load_cache
from shapes import NOISE, RELEVANT, SHAPES
from study.plan import ROOT
from tokenizer import get_tokenizer


def main(argv):
    args = parse_flags(argv, {'results': os.path.join(ROOT, 'study', 'results')})
    for path in sorted(glob.glob(os.path.join(args['results'], 'runs', '*_prior_*caption_noise*.json'))):
        run = json.load(open(path))
        cfg = from_dict(run['config'])
        train = load_splits(cfg, names=('train',))['train']
        vocab = make_vocab(cfg, train)
        train.encode(vocab)
        ref_probs = torch.from_numpy(np.array(load_cache(load_checkpoint(os.path.join(cfg.out_dir, 'ckpt.pt'))['ref_ckpt'],
                                                         train, vocab)))
        w = token_weights(ref_probs, train.targets, cfg.alpha, cfg.weight_floor)
        shape = torch.isin(train.targets, torch.as_tensor(vocab.encode([get_tokenizer().encode(' ' + s)[0]
                                                                         for s in SHAPES])))
        groups = {'wrong shape words': shape & (train.classes == NOISE),
                  'true shape words': shape & (train.classes == RELEVANT),
                  'names and cities': ~shape & (train.classes == NOISE)}
        print(run['name'] + ': ' + ', '.join(f"{k} weight {w[m].mean():.2f} (P_r {ref_probs[m].mean():.2f})"
                                             for k, m in groups.items()))


if __name__ == '__main__':
    main(sys.argv[1:])
