"""
Retrieval as a measure of grounding: for each image, its true caption ranked among captions of
other images. eval.py scores the candidates two ways (by the LVLM's likelihood given the image,
and by the likelihood ratio against the text-only reference); study/retrieval_margin.py uses the
same candidates.
"""

import torch


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


def retrieval_scores(nll, mask, ref_probs=None):
    """Scores of candidate captions (higher ranks first) from their per-token NLL [n,T] given the image
    (`mask`: the caption tokens): minus the mean NLL per token, and (given P_r [n,T] of their tokens)
    the likelihood ratio log p(c | image) - log P_r(c), or None."""
    caption_nll = (nll * mask).sum(1)
    plain = -caption_nll / mask.sum(1)
    return plain, None if ref_probs is None else -caption_nll + reference_nll(ref_probs, mask)


def reference_nll(probs, mask):
    """-log P_r of each caption (summed over its tokens `mask`), from per-token probabilities [N,T]."""
    return -(probs.clamp(min=1e-30).log() * mask).sum(1)


def rank_of_first(scores):
    """The rank of the true caption, scores[0], among the candidates (higher scores rank first):
    1 + how many others score at least as high, so a tie counts against the true caption."""
    return 1 + int((scores[1:] >= scores[0]).sum())


def recall_at(ranks, name):
    """{name_r1, name_r5}: the share of images whose true caption ranks first, and in the top 5 (NaN: none)."""
    r = torch.tensor(ranks, dtype=torch.float)
    return {f'{name}_r1': (r == 1).float().mean().item() if len(r) else float('nan'),
            f'{name}_r5': (r <= 5).float().mean().item() if len(r) else float('nan')}
