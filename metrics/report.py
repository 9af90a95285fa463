"""How eval.py and train.py print metrics: the one-line val summary, the markdown table of a run's
metrics (the shapes metrics or the caption metrics, whichever the data has) and sample captions
beside the truth."""

import math

from sources.shapes import CLASS_NAMES


TABLE_KEYS = ('loss', 'loss_relevant', 'loss_filler', 'loss_noise', 'attr_acc', 'acc_count', 'acc_colour',
              'acc_shape', 'acc_position', 'hallucination', 'recall', 'exact')
CAPTION_TABLE_KEYS = ('loss', 'loss_top_weight', 'retrieval_r1', 'retrieval_r5', 'retrieval_ratio_r1',
                      'retrieval_ratio_r5', 'bleu1', 'bleu2', 'bleu3', 'bleu4', 'bleu_len_ratio', 'cider', 'distinct')


def val_summary(m):
    """One line of teacher-forced metrics: 'val loss L (per class losses), attr_acc A' (what the data has)."""
    classes = ', '.join(f"{c} {m[f'loss_{c}']:.3f}" for c in CLASS_NAMES if not math.isnan(m[f'loss_{c}']))
    attr = '' if math.isnan(m['attr_acc']) else f", attr_acc {m['attr_acc']:.3f}"   # NaN: no attributes
    return f"val loss {m['loss']:.4f}" + (f" ({classes})" if classes else '') + attr


def format_table(results):
    """results: {run name: metrics} -> a markdown table, one column per run."""
    names = list(results)
    keys = TABLE_KEYS if 'attr_acc' in results[names[0]] else CAPTION_TABLE_KEYS
    lines = ['| metric | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
    for key in keys:
        lines.append(f'| {key} | ' + ' | '.join(f"{results[n][key]:.3f}" for n in names) + ' |')
    return '\n'.join(lines)


def sample_report(captions, data, n=3):
    """A few greedy (row, caption) pairs next to the truth, as text."""
    lines = []
    for row, text in captions[:n]:
        truth = data.objects[row] if data.objects is not None else repr(data.texts[row])
        lines.append(f"  {text!r}\n    true: {truth}")
    return '\n'.join(lines)
