"""
How far is an LVLM from a retrieval bar? eval.py ranks each image's true caption among 10 by the
LVLM's mean per-token NLL given the image. This prints, on the same candidates, how much more
the true caption gains from its image than the others do (in nats per token, against the
run's text-only reference), how much caption NLLs differ from one caption to the next, and
the R@1 the model would reach if the true caption gained d nats/token more.

    python -m study.retrieval_margin --ckpt=out/flickr_study/ntp_seed1/ckpt.pt --split=val
"""

import sys

import numpy as np
import torch

from data import load_splits
from eval import load_trained
from metrics.retrieval import retrieval_candidates
from prior_loss import IGNORE, token_nll
from reference import reference_from
from runs.cli import cli, parse_flags
from runs.errors import ConfigError
from runs.reference_files import reference_of

FLAGS = {'ckpt': '', 'split': 'val', 'n_images': 200, 'n_candidates': 10, 'seed': 0}


@torch.no_grad()
def margins(model, ref, data, n_images, n_candidates, seed):
    """Per image: (the best other caption's mean NLL minus the true one's, the true caption's gain over
    the reference minus the others' mean gain), both in nats/token; and every candidate's mean NLL."""
    candidates = retrieval_candidates(data, n_images, n_candidates, seed)     # eval's own candidates
    if candidates is None:
        raise ConfigError(f"the split has fewer than {n_candidates} images")
    out, all_nll = [], []
    for rows, same_image in candidates:
        images, idx, targets, _ = data.batch(rows, 'cpu', same_image)
        n = (targets != IGNORE).sum(1)
        lvlm = token_nll(model(images, idx), targets).sum(1) / n
        text = token_nll(ref(idx), targets).sum(1) / n
        gain = text - lvlm
        out.append(((lvlm[1:].min() - lvlm[0]).item(), (gain[0] - gain[1:].mean()).item()))
        all_nll += lvlm.tolist()
    return np.array(out), np.array(all_nll)


def main(argv):
    args = parse_flags(argv, FLAGS)
    if not args['ckpt']:
        raise ConfigError("--ckpt: a train.py checkpoint")
    model, vocab, cfg, ckpt = load_trained(args['ckpt'], 'cpu')
    reference = reference_of(ckpt, None, ckpt['vocab']['gpt2_ids'])
    if not reference:
        raise ConfigError(f"{args['ckpt']} has no reference LM inside (loss=ntp with init_lm other than ref)")
    ref, _ = reference_from(reference, 'cpu')
    data = load_splits(cfg, names=(args['split'],), log=lambda *a: None)[args['split']].encode(vocab)
    m, nll = margins(model, ref, data, args['n_images'], args['n_candidates'], args['seed'])
    print(f"{args['ckpt']} on {args['split']}, {len(m)} images x {args['n_candidates']} candidates:")
    print(f"  R@1 {np.mean(m[:, 0] > 0):.3f}; candidates' mean NLL {nll.mean():.3f} ± {nll.std():.3f} nats/token")
    print(f"  the true caption gains {m[:, 1].mean():.3f} nats/token more from its image than the others")
    print('  R@1 if the true caption gained d nats/token more: ' +
          ', '.join(f"d={d}: {np.mean(m[:, 0] + d > 0):.3f}" for d in (0.1, 0.2, 0.3, 0.5, 0.75, 1.0)))


if __name__ == '__main__':
    cli(main, sys.argv[1:], __doc__)
