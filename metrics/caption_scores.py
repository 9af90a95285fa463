"""
Captioning metrics as the COCO caption evaluation computes them (tests/test_encoder.py checks
parity with its pycocoevalcap package): corpus BLEU-1..4 and CIDEr-D of one generated caption per
image against all of that image's reference captions. Text is lowercased and split into words,
punctuation dropped (COCO's tokenizer does the same; it runs Java, this does not). Words are
Unicode-aware: accented letters are letters (in either Unicode form), and each Chinese or Japanese
character is a word of its own, as those scripts put no spaces between words; emoji are dropped
with the punctuation. caption_scores() scores the captions of a split (data.py's: its image_index and
texts) against every caption of each one's image.
"""

import math
import re
import unicodedata
from collections import Counter

import numpy as np


CJK = '\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff'          # kana and Han ideographs
WORD = re.compile(f"[{CJK}]|[^\\W_{CJK}]+(?:'[^\\W_{CJK}]+)?")


def words(text):
    return WORD.findall(unicodedata.normalize('NFC', text).lower())


def ngram_counts(tokens, n_max=4):
    return Counter(tuple(tokens[i:i + n]) for n in range(1, n_max + 1) for i in range(len(tokens) - n + 1))


def bleu_lengths(hypotheses, references):
    """(words generated, BLEU's reference words): for each hypothesis the reference length closest to
    it (ties: the shorter), COCO's 'closest'."""
    ref_len = sum(min((abs(len(r) - len(h)), len(r)) for r in refs)[1] for h, refs in zip(hypotheses, references))
    return sum(map(len, hypotheses)), ref_len


def length_ratio(hypotheses, references):
    """Words generated / BLEU's reference words: below 1, BLEU's brevity penalty exp(1 - 1/ratio)
    scales every BLEU-n (COCO's evaluation prints it as 'ratio')."""
    hyp_len, ref_len = bleu_lengths(hypotheses, references)
    return hyp_len / max(1, ref_len)


def bleu(hypotheses, references, n_max=4):
    """Corpus BLEU-1..n_max (a list): clipped n-gram precisions summed over all captions, BLEU-n the
    geometric mean of precisions 1..n, times a brevity penalty against the reference length closest
    to each hypothesis (COCO's 'closest'; its smoothing constants, so an empty count gives ~0, not 0/0)."""
    correct, total = np.zeros(n_max), np.zeros(n_max)
    for hyp, refs in zip(hypotheses, references):
        counts = ngram_counts(hyp, n_max)
        best = Counter()
        for ref in refs:
            best |= ngram_counts(ref, n_max)                # per n-gram, its most frequent use in one reference
        for gram, c in counts.items():
            correct[len(gram) - 1] += min(c, best[gram])
            total[len(gram) - 1] += c
    hyp_len, ref_len = bleu_lengths(hypotheses, references)
    log_precisions = np.log((correct + 1e-15) / (total + 1e-9))
    brevity = min(1.0, math.exp(1 - (ref_len + 1e-9) / (hyp_len + 1e-15)))
    return [float(brevity * np.exp(log_precisions[:n].mean())) for n in range(1, n_max + 1)]


def cider_d(hypotheses, references, sigma=6.0):
    """CIDEr-D: per image, the mean over its references of the cosine similarity of tf-idf n-gram
    vectors (n = 1..4; idf from the references of all evaluated images), with the hypothesis's
    counts clipped at the reference's and a Gaussian penalty on the length difference; x10."""
    ref_counts = [[ngram_counts(r) for r in refs] for refs in references]
    df = Counter(g for refs in ref_counts for g in set().union(*refs))
    log_n = math.log(len(references))

    def vectors(counts):
        vec = [{} for _ in range(4)]
        for gram, c in counts.items():
            vec[len(gram) - 1][gram] = c * (log_n - math.log(max(1.0, df[gram])))
        norms = [math.sqrt(sum(v * v for v in d.values())) for d in vec]
        length = sum(c for g, c in counts.items() if len(g) == 2)   # COCO's length term counts bigrams
        return vec, norms, length

    scores = []
    for hyp, refs in zip(hypotheses, ref_counts):
        vh, nh, lh = vectors(ngram_counts(hyp))
        total = np.zeros(4)
        for ref in refs:
            vr, nr, lr = vectors(ref)
            for n in range(4):
                dot = sum(min(v, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, v in vh[n].items())
                cos = dot / (nh[n] * nr[n]) if nh[n] and nr[n] else 0.0
                total[n] += cos * math.exp(-(lh - lr) ** 2 / (2 * sigma ** 2))
        scores.append(10.0 * total.mean() / len(refs))
    return float(np.mean(scores))


def rows_by_image(data):
    """Each image's caption rows, images in order of first appearance."""
    out = {}
    for row, img in enumerate(data.image_index.tolist()):
        out.setdefault(img, []).append(row)
    return out


def caption_refs(data, rows):
    """The references of a caption scored against its image: the words of every caption of each row's image."""
    by_image = rows_by_image(data)
    return [[words(data.texts[r]) for r in by_image[int(data.image_index[row])]] for row in rows]


def caption_scores(captions, data, rows):
    """BLEU-1..4 and CIDEr-D of captions[i], written for the image of data's row rows[i], against all of
    that image's captions; BLEU's length ratio; and `distinct`, the share of different captions (1/n:
    one whatever the image)."""
    hyps, refs = [words(c) for c in captions], caption_refs(data, rows.tolist())
    out = {f'bleu{n}': b for n, b in enumerate(bleu(hyps, refs), start=1)}
    return {**out, 'bleu_len_ratio': length_ratio(hyps, refs), 'cider': cider_d(hyps, refs),
            'distinct': len(set(captions)) / len(captions)}
