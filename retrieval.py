"""
Retrieval as a measure of grounding: for each image, its true caption ranked among captions of
other images, by the LVLM's likelihood given the image and by the likelihood ratio against the
text-only reference (eval.py reports both; study/retrieval_margin.py uses the same candidates).
"""

import contextlib

import torch

from prior_loss import IGNORE, token_nll


def retrieval_candidates(data, n_images=200, n_candidates=10, seed=0):
    """For each of the first n_images images: its first caption's row, then the rows of
    n_candidates - 1 captions of other images (seeded), as a tensor; and its image batch
    repeated for every candidate. None when the split has fewer than n_candidates images."""
    first_row = {}
    for row, img in enumerate(data.image_index.tolist()):
        first_row.setdefault(img, row)
    if len(first_row) < n_candidates:
        return None
    g = torch.Generator().manual_seed(seed)
    out = []
    for img in list(first_row)[:n_images]:
        others = [r for i, r in first_row.items() if i != img]
        pick = torch.randperm(len(others), generator=g)[:n_candidates - 1].tolist()
        rows = torch.tensor([first_row[img]] + [others[p] for p in pick])
        one = data.image_batch(rows[:1])                 # pixels [1,3,H,W] or cached features [1,P,F]
        out.append((rows, one.expand(len(rows), *one.shape[1:])))
    return out


def retrieval_metrics(model, data, device, n_images=200, n_candidates=10, seed=0, ctx=None, ref_probs=None):
    """For each of n_images images, rank its caption among n_candidates (the true one and
    captions of other images; chance R@1 is 1/n_candidates) in two ways:
      retrieval_r1/r5              by the LVLM's mean per-token NLL given the image (length-normalised,
                                   so short captions are not favoured). It mostly ranks how generic a
                                   caption is: a common caption is likely under any image.
      retrieval_ratio_r1/r5        by the likelihood ratio log p(c | image) - log P_r(c) against the text-only
                                   reference (needs ref_probs, [N,T] P_r of data's tokens): how much the
                                   image raises the caption's probability. By Bayes it ranks p(image | c)."""
    candidates = retrieval_candidates(data, n_images, n_candidates, seed)
    keys = ('retrieval_r1', 'retrieval_r5', 'retrieval_ratio_r1', 'retrieval_ratio_r5')
    if candidates is None:
        return dict.fromkeys(keys, float('nan'))
    ranks, ratio_ranks = [], []
    was_training = model.training
    model.eval()
    for rows, same_image in candidates:
        images, idx, targets, _ = data.batch(rows, device, same_image)
        with torch.no_grad(), ctx or contextlib.nullcontext():
            nll = token_nll(model(images, idx), targets).sum(1).cpu()
        mean = nll / (targets != IGNORE).sum(1).cpu()
        ranks.append(1 + int((mean[1:] <= mean[0]).sum()))         # a tie counts against the true caption
        if ref_probs is not None:
            ratio = -nll + reference_nll(ref_probs[rows], data.targets[rows])
            ratio_ranks.append(1 + int((ratio[1:] >= ratio[0]).sum()))
    model.train(was_training)
    out = {'retrieval_images': len(candidates), 'retrieval_candidates': n_candidates}
    for name, r in (('retrieval', ranks), ('retrieval_ratio', ratio_ranks)):
        r = torch.tensor(r, dtype=torch.float)
        out[f'{name}_r1'] = (r == 1).float().mean().item() if len(r) else float('nan')
        out[f'{name}_r5'] = (r <= 5).float().mean().item() if len(r) else float('nan')
    return out


def reference_nll(probs, targets):
    """-log P_r of each caption (summed over its tokens), from per-token probabilities [N,T]."""
    mask = targets != IGNORE
    return -(probs.clamp(min=1e-30).log() * mask).sum(1)
