"""
Evaluate a trained LVLM, from any directory: a checkpoint holds everything eval needs.

    python eval.py --ckpt=out/shapes_u/ckpt.pt [--split=test|val|all] [--figure=weights.png]
    python eval.py --ckpt=out/run_ntp/ckpt.pt --ref_ckpt=out/ref/.../ref.pt   # loss_top_weight of an NTP run
    python eval.py --ckpt=out/shapes_u/ckpt.pt --debias=True    # PRIOR's tilt divided out (eval_debias_*.json)

It evaluates in the run's precision (bf16 autocast on CUDA by default, as train.py's final
eval), prints the table and writes eval_<split>_step<N>.json beside the checkpoint (or --out),
never train.py's own eval_test.json.

On data on disk (sources/captions.py): loss (caption NLL), loss_top_weight (NLL on the quarter of
tokens with the highest PRIOR weight), retrieval_r1/r5 by likelihood and retrieval_ratio_r1/r5
by likelihood ratio against the reference (see retrieval_metrics), BLEU-1..4 (with bleu_len_ratio,
the captions' words over BLEU's reference words: below 1 a brevity penalty scales every BLEU-n) and
CIDEr-D of a caption for every image (greedy, or beam search with --beam), and `distinct`, the share
of those captions that differ (a model that ignores the image says the same thing for every photo).
On the built-in shapes data:

Teacher-forced metrics (one forward pass over every caption):
  loss, loss_relevant, loss_filler, loss_noise   mean NLL per true token class
  acc_count, acc_colour, acc_shape, acc_position at each attribute word, is the true value
                                                 the likeliest among all values of that
                                                 attribute, given the image? (chance 1/n)
                                                 A tie is wrong, so a value the vocabulary
                                                 cannot write (it shares the unknown id
                                                 with another) is never right.
  attr_acc                                       mean of the four attribute accuracies
Free-running metrics (a generated caption per image, parsed back into (colour, shape, position) objects):
  hallucination   share of described objects that are not in the image
  recall          share of the image's objects that the caption describes
  exact           share of captions that describe exactly the image's objects
"""

import runs.startup  # noqa: F401  (first of all: a signal while the imports below load ends in one line)

import contextlib
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from config import from_dict
from data import load_splits
from decoding.generate import generate
from metrics.caption_scores import caption_scores, rows_by_image
from metrics.objects import attribute_value_ids, caption_metrics
from metrics.report import format_table, sample_report
from metrics.retrieval import rank_of_first, recall_at, retrieval_candidates, retrieval_scores
from model import LVLM, GPTConfig
from pretrained.features import caches_features, use_cached_features
from prior_loss import IGNORE, token_nll, token_weights
from reference import DEBIAS_MIN_WEIGHT, debias_for, reference_from, score_captions
from runs.caches import cache_root
from runs.cli import Flag, cli, flags_help, parse_flags
from runs.devices import precision_context, resolve_device
from runs.errors import ConfigError
from runs.files import atomic_write, load_checkpoint
from runs.plots import token_figure
from runs.reference_files import reference_file, reference_of
from sources.shapes import ATTR_NAMES, CLASS_NAMES
from sources.tokenizer import Vocab



def caption_logits(model, images, idx, debias=None):
    """The LVLM's next-token logits [B,T,V]; with `debias` (reference.Debias), its corrected
    log-probabilities, which every metric below reads as it reads logits."""
    return model(images, idx) if debias is None else debias.scores(model, images, idx)


def forward_batches(model, data, rows, device, ctx=None, batch_size=128, debias=None):
    """Teacher-forced passes over data[rows]: yields (row batch, logits, targets, classes)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            sel = rows[start:start + batch_size]
            images, idx, targets, classes = data.batch(sel, device)
            with ctx or contextlib.nullcontext():
                logits = caption_logits(model, images, idx, debias)
            yield sel, logits, targets, classes
    model.train(was_training)


def teacher_forced_metrics(model, data, vocab, rows, device, ctx=None, debias=None):
    """Per-class NLL and attribute accuracies over data[rows], in one pass. An attribute word is right
    when its value scores strictly above every other value of that attribute: argmax would break a
    tie by the order of the values, and values missing from the vocabulary all tie at the unknown id."""
    value_ids = [v.to(device) for v in attribute_value_ids(vocab)]
    nll_sum, nll_n = torch.zeros(len(CLASS_NAMES) + 1), torch.zeros(len(CLASS_NAMES) + 1)
    hits, seen = torch.zeros(len(ATTR_NAMES)), torch.zeros(len(ATTR_NAMES))
    for sel, logits, targets, classes in forward_batches(model, data, rows, device, ctx, debias=debias):
        attrs = data.attrs[sel].to(device)
        nll = token_nll(logits, targets)
        mask = targets != IGNORE
        nll_sum[-1] += nll[mask].sum().item()
        nll_n[-1] += mask.sum().item()
        for c in range(len(CLASS_NAMES)):
            m = classes == c
            nll_sum[c] += nll[m].sum().item()
            nll_n[c] += m.sum().item()
        for a, ids in enumerate(value_ids):
            m = attrs == a
            if m.any():
                scores = logits[m][:, ids].float()                    # [n, n_values]
                truth = (targets[m][:, None] == ids[None]).float().argmax(-1)
                rival = scores.scatter(1, truth[:, None], -math.inf).max(-1).values
                hits[a] += (scores.gather(1, truth[:, None]).squeeze(1) > rival).sum().item()   # a tie is wrong
                seen[a] += m.sum().item()
    out = {'loss': (nll_sum[-1] / nll_n[-1].clamp(min=1)).item()}
    for c, name in enumerate(CLASS_NAMES):
        out[f'loss_{name}'] = (nll_sum[c] / nll_n[c]).item() if nll_n[c] else float('nan')
    for a, name in enumerate(ATTR_NAMES):
        out[f'acc_{name}'] = (hits[a] / seen[a]).item() if seen[a] else float('nan')
    accs = [out[f'acc_{name}'] for name in ATTR_NAMES]
    out['attr_acc'] = float(np.mean(accs)) if seen.all() else float('nan')
    return out


def caption_nlls(model, data, rows, device, ctx=None, debias=None):
    """Per-token NLL [len(rows), T] (0 where ignored)."""
    return torch.cat([token_nll(logits, targets).cpu()
                      for _, logits, targets, _ in forward_batches(model, data, rows, device, ctx, debias=debias)])


def reference_probs(reference, data, device):
    """P_r of every caption token of `data` [N,T] (0 where ignored), by `reference` (a reference checkpoint's dict)."""
    ref, _ = reference_from(reference, device)
    return torch.from_numpy(score_captions(ref, data, device))


def reference_weights(reference, data, device, alpha=1.0, weight_floor=0.0):
    """PRIOR weights [N,T] of every caption of `data`, scored by `reference` (a reference checkpoint's dict)."""
    return token_weights(reference_probs(reference, data, device), data.targets, alpha, weight_floor)


def top_weight_loss(nll, data, ref_probs):
    """Mean NLL on the quarter of caption tokens with the highest PRIOR weight, at the paper's
    alpha = 1 and no floor whatever the run trained with, so every run is scored on the same tokens."""
    weights = token_weights(ref_probs, data.targets)
    mask = data.targets != IGNORE
    threshold = torch.quantile(weights[mask].float(), 0.75)
    top = mask & (weights >= threshold)
    return nll[top].mean().item()


@torch.no_grad()
def generate_captions(model, data, vocab, rows, device, beam=1, length_penalty=0.0, batch_size=128, debias=None):
    """One caption for each of data[rows]' images: greedy, or by beam search (decoding/generate.py)."""
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        images = data.batch(rows[start:start + batch_size], device)[0]
        for ids in generate(model, images, bos=vocab.eot, eot=vocab.eot, max_new_tokens=data.block_size,
                            beam=beam, length_penalty=length_penalty, debias=debias):
            out.append(vocab.decode(ids[:ids.index(vocab.eot)] if vocab.eot in ids else ids))
    return out


def retrieval_metrics(model, data, device, n_images=200, n_candidates=10, seed=0, ctx=None, ref_probs=None,
                      debias=None):
    """For each of n_images images, rank its caption among n_candidates (the true one and
    captions of other images; chance R@1 is 1/n_candidates; metrics/retrieval.py) in two ways:
      retrieval_r1/r5              by the LVLM's mean per-token NLL given the image (length-normalised,
                                   so short captions are not favoured). It mostly ranks how generic a
                                   caption is: a common caption is likely under any image.
      retrieval_ratio_r1/r5        by the likelihood ratio log p(c | image) - log P_r(c) against the text-only
                                   reference (needs ref_probs, [N,T] P_r of data's tokens): how much the
                                   image raises the caption's probability. By Bayes it ranks p(image | c)."""
    candidates = retrieval_candidates(data, n_images, n_candidates, seed)
    if candidates is None:
        return dict.fromkeys(('retrieval_r1', 'retrieval_r5', 'retrieval_ratio_r1', 'retrieval_ratio_r5'), float('nan'))
    ranks, ratio_ranks = [], []
    was_training = model.training
    model.eval()
    for rows, same_image in candidates:
        images, idx, targets, _ = data.batch(rows, device, same_image)
        with torch.no_grad(), ctx or contextlib.nullcontext():
            nll = token_nll(caption_logits(model, images, idx, debias), targets).cpu()
        plain, ratio = retrieval_scores(nll, targets.cpu() != IGNORE, None if ref_probs is None else ref_probs[rows])
        ranks.append(rank_of_first(plain))
        if ratio is not None:
            ratio_ranks.append(rank_of_first(ratio))
    model.train(was_training)
    return {'retrieval_images': len(candidates), 'retrieval_candidates': n_candidates,
            **recall_at(ranks, 'retrieval'), **recall_at(ratio_ranks, 'retrieval_ratio')}


def evaluate(model, data, vocab, device, n_generate=0, ctx=None, reference=None, beam=1, length_penalty=0.0,
             debias=None):
    """All metrics of a split, and the generated captions as (row, text) pairs: one caption for each
    image (n_generate > 0: the first n_generate only), greedy or by beam search; with `debias`
    (reference.Debias), every metric of the corrected model. Shapes: teacher-forced
    metrics on every caption, and the objects the captions describe. Data on disk: caption loss, loss
    on the top-weighted quarter and retrieval by likelihood ratio (both need `reference`, a reference
    checkpoint's dict), retrieval by likelihood, and the captions' scores (caption_scores)."""
    rows = torch.arange(len(data))
    gen_rows = torch.tensor([r[0] for r in rows_by_image(data).values()])[:n_generate or None]
    captions = generate_captions(model, data, vocab, gen_rows, device, beam, length_penalty, debias=debias)
    if data.objects is None:
        nll = caption_nlls(model, data, rows, device, ctx, debias)
        ref_probs = reference_probs(reference, data, device) if reference else None
        metrics = {'loss': (nll.sum() / (data.targets != IGNORE).sum()).item()}
        metrics['loss_top_weight'] = top_weight_loss(nll, data, ref_probs) if reference else float('nan')
        metrics.update(retrieval_metrics(model, data, device, ctx=ctx, ref_probs=ref_probs, debias=debias))
        metrics.update(caption_scores(captions, data, gen_rows))
    else:
        metrics = teacher_forced_metrics(model, data, vocab, rows, device, ctx=ctx, debias=debias)
        metrics.update(caption_metrics(captions, [data.objects[i] for i in gen_rows.tolist()]))
    metrics.update(n_captions=len(rows), n_generated=len(gen_rows), beam=beam, length_penalty=length_penalty,
                   **({'debias_min_weight': debias.min_weight} if debias else {}))
    return metrics, list(zip(gen_rows.tolist(), captions))


def load_trained(ckpt_path, device):
    """(model, vocab, cfg, checkpoint without its optimiser state) of a train.py checkpoint. The file
    is memory-mapped and the model built on the host, so only the weights ever reach `device`."""
    ckpt = load_checkpoint(ckpt_path, mmap=True, required=('model', 'model_args', 'vocab', 'config', 'step'))
    ckpt.pop('optimizer', None)
    cfg = from_dict(ckpt['config'])
    model = LVLM(cfg, GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    return model.to(device).eval(), Vocab(ckpt['vocab']['gpt2_ids']), cfg, ckpt


def weights_figure(model, data, vocab, reference, alpha, weight_floor, device, path, n_examples=4):
    """The paper's Figure 1 idea: each caption token shaded by its PRIOR weight (from the
    text-only reference, with the run's alpha and weight floor) and by the LVLM's loss given the image."""
    n_examples = min(n_examples, len(data))      # a split smaller than the figure: all of it
    sub = data.subset(range(n_examples))
    weights = reference_weights(reference, sub, device, alpha, weight_floor)
    nll = caption_nlls(model, sub, torch.arange(n_examples), device)
    rows = []
    for r in range(n_examples):
        k = int((sub.targets[r] != IGNORE).sum())
        image = data.image_batch(torch.tensor([r]))[0].permute(1, 2, 0).numpy()
        rows.append((image, [vocab.decode([t]) for t in sub.targets[r, :k].tolist()], weights[r, :k].tolist(),
                     nll[r, :k].tolist()))
    token_figure(rows, path)


FLAGS = {'ckpt': Flag('out/shapes_u/ckpt.pt', help='a train.py checkpoint (works from any directory, wherever the run '
                                                 'folder moved)'),
         'split': Flag('test', choices=('train', 'val', 'test', 'all'),
                       help='a split, or all (every caption of --dataset)'),
         'n_generate': Flag(0, low=0, help='caption only the first N images of the split (0: every image), scored '
                                           'by BLEU, CIDEr (data on disk) and hallucination, recall, exact (shapes)'),
         'beam': Flag(0, low=0, help="1 greedy, K > 1 beam search of width K (0: the run's own setting, beam)"),
         'length_penalty': Flag(-1.0, help="beam search ranks log p / length^this (negative: the run's own setting)"),
         'figure': Flag('', help='also draw tokens shaded by PRIOR weight and LVLM loss into this PNG'),
         'device': Flag('auto', help='auto, cpu, cuda, cuda:N'),
         'dataset': Flag('', help="evaluate on other data than the run's own (see sources/captions.py)"),
         'image_root': Flag('', help="with --dataset: its image folder ('' = next to its captions)"),
         'skip_bad': Flag(False, help='with --dataset: skip and count bad entries'),
         'out': Flag('', help='the JSON to write (default: eval_<split>_step<N>.json beside the checkpoint)'),
         'ref_ckpt': Flag('', help='a reference LM for loss_top_weight and retrieval_ratio (an NTP run from scratch '
                                   'carries none)'),
         'debias': Flag(False, help="divide PRIOR's tilt out of the model with the run's own reference (a loss=prior "
                                    "or prior_batch run; docs/beyond-prior.md)"),
         'debias_min_weight': Flag(DEBIAS_MIN_WEIGHT, low=0, high=1,
                                   help='with --debias: the weight floor w_min of the correction')}


def output_path(ckpt_path, dataset, split, step, debiased=False):
    """eval_[debias_][DATASET-HASH_]SPLIT_stepN.json beside the checkpoint, never train.py's eval_test.json;
    the hash of the dataset's full path keeps two datasets in folders of one name apart."""
    where = os.path.abspath(dataset)
    other = f"{os.path.basename(where)}-{hashlib.sha1(where.encode()).hexdigest()[:8]}_" if dataset else ''
    return os.path.join(os.path.dirname(ckpt_path), f"eval_{'debias_' if debiased else ''}{other}{split}_step{step}.json")


@dataclass
class Evaluation:
    """What eval.py computed for one checkpoint, and what it read to compute it."""
    metrics: dict
    captions: list                               # (row, text): one caption per image captioned
    data: object
    model: LVLM
    vocab: Vocab
    cfg: object
    step: int
    reference: dict | None                       # for loss_top_weight and ratio retrieval


def evaluate_checkpoint(args, device, log=print):
    """eval.py's work for its parsed flags `args` (FLAGS), without printing or writing (study.photo_debias
    calls it so, with the same flags as the command line)."""
    if not os.path.isfile(args['ckpt']):
        raise ConfigError(f"--ckpt: no checkpoint at {args['ckpt']}")
    model, vocab, cfg, ckpt = load_trained(args['ckpt'], device)
    own = reference_of(ckpt, args['ckpt'], vocab.gpt2_ids) if args['debias'] or not args['ref_ckpt'] else None
    reference = reference_file(args['ref_ckpt'], vocab.gpt2_ids) if args['ref_ckpt'] else own   # NTP runs: pass one
    debias = debias_for(cfg, own, device, args['debias_min_weight']) if args['debias'] else None   # own reference only
    if args['dataset']:                           # evaluate on other data than the run's own
        cfg.dataset, cfg.image_root, cfg.skip_bad = args['dataset'], args['image_root'], args['skip_bad']
    data = load_splits(cfg, names=(args['split'],), log=log)[args['split']].encode(vocab)
    if caches_features(cfg):                      # as train.py: the frozen encoder's features, computed once,
        cfg.out_dir = os.path.dirname(os.path.abspath(args['ckpt']))      # beside the run folder as it is now
        use_cached_features({args['split']: data}, model.vision, device, cache_root(cfg), log=log)
    ctx = precision_context(device, cfg.precision)            # the run's own, as its final eval
    beam = args['beam'] or cfg.beam
    length_penalty = cfg.length_penalty if args['length_penalty'] < 0 else args['length_penalty']
    metrics, captions = evaluate(model, data, vocab, device, n_generate=args['n_generate'], ctx=ctx,
                                 reference=reference, beam=beam, length_penalty=length_penalty, debias=debias)
    return Evaluation(metrics, captions, data, model, vocab, cfg, ckpt['step'], reference)


def main(argv):
    args = parse_flags(argv, FLAGS)
    device = resolve_device(args['device'])
    e = evaluate_checkpoint(args, device)
    print(f"{args['ckpt']} ({e.cfg.arch}, {e.cfg.loss}{', debiased' if args['debias'] else ''}, step {e.step}) on "
          f"{e.cfg.dataset} {args['split']}:")
    print(sample_report(e.captions, e.data))
    print(format_table({e.cfg.loss: e.metrics}))
    out = args['out'] or output_path(args['ckpt'], args['dataset'], args['split'], e.step, args['debias'])
    atomic_write(out, lambda f: f.write(json.dumps(e.metrics, indent=1).encode()))
    print(f"wrote {out}")
    if args['figure']:
        if not e.reference:
            raise ConfigError("--figure needs the reference LM; this run had none (loss=ntp, init_lm!=ref)")
        weights_figure(e.model, e.data, e.vocab, e.reference, e.cfg.alpha, e.cfg.weight_floor, device, args['figure'])
        print(f"wrote {args['figure']}")


if __name__ == '__main__':
    cli(main, sys.argv[1:], __doc__, flags_help(FLAGS))
