"""
What a caption of the built-in shapes data says about its image, scored against the truth: the
objects it names (sources/shapes.py parses them) and the ids of every attribute's values, for
eval.py's attribute accuracy.
"""

import torch

from sources.shapes import ATTRIBUTES, parse_objects
from sources.tokenizer import get_tokenizer


def attribute_value_ids(vocab):
    """Model ids of every value of each attribute (each value is one GPT-2 token)."""
    enc = get_tokenizer()
    out = []
    for values in ATTRIBUTES.values():
        ids = [enc.encode(' ' + v) for v in values]
        assert all(len(i) == 1 for i in ids), "attribute values must be single GPT-2 tokens"
        out.append(torch.as_tensor(vocab.encode([i[0] for i in ids])))
    return out


def caption_metrics(captions, true_objects):
    """hallucination / recall / exact of generated captions against the true objects."""
    described = hallucinated = n_true = recalled = exact = 0
    for text, truth in zip(captions, true_objects):
        found, truth = parse_objects(text), set(truth)
        described += len(found)
        hallucinated += sum(o not in truth for o in found)
        n_true += len(truth)
        recalled += len(truth & set(found))
        exact += len(found) == len(truth) and set(found) == truth
    return {'hallucination': hallucinated / described if described else float('nan'),
            'recall': recalled / n_true, 'exact': exact / len(captions),
            'objects_per_caption': described / len(captions)}
