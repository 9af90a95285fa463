"""Known answers for the headline numbers: every expected value here is counted or worked out by hand
(in the comments), never taken from the code under test."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data import CaptionData
from eval import teacher_forced_metrics, top_weight_loss
from metrics.caption_scores import bleu, cider_d, length_ratio
from metrics.objects import caption_metrics
from metrics.retrieval import rank_of_first, recall_at, retrieval_scores
from prior_loss import IGNORE, token_weights
from reference import score_captions
from sources.shapes import ATTRIBUTES, RELEVANT
from sources.tokenizer import EOT, Vocab, get_tokenizer


def caption_data(texts, attrs, block_size=6):
    """Captions (one image each) as a CaptionData: every token relevant, attrs[i] the attribute id of
    each token of caption i (-1: none)."""
    tokens = [get_tokenizer().encode_ordinary(t) for t in texts]
    n = len(texts)
    return CaptionData(torch.zeros(n, 3, 8, 8, dtype=torch.uint8), torch.arange(n), texts, tokens,
                       [np.full(len(t) + 1, RELEVANT, dtype=np.int8) for t in tokens],
                       [np.array(a, dtype=np.int8) for a in attrs], block_size)


def value_vocab(leave_out=()):
    """A vocabulary of every attribute value (a GPT-2 token each) but `leave_out`, which map to unknown."""
    words = [v for values in ATTRIBUTES.values() for v in values if v not in leave_out]
    return Vocab.from_captions([get_tokenizer().encode_ordinary(' ' + w) for w in words])


class FixedLogits(torch.nn.Module):
    """A stand-in LVLM whose logits are set by hand."""
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images, idx):
        return self.logits[:len(idx), :idx.size(1)]


def set_scores(logits, vocab, row, pos, scores):
    """logits[row, pos] of the named words (others stay 0)."""
    for word, s in scores.items():
        logits[row, pos, int(vocab.encode(get_tokenizer().encode_ordinary(' ' + word))[0])] = s


# ---- hallucination, recall, exact ----

def test_hallucination_recall_and_exact_counted_by_hand():
    captions = ['a red circle in the north and a blue square at the south',   # 2 named, both true: exact
                'a green cross in the west',                                   # 1 of 2 true objects
                'a red circle in the center and a yellow cross in the east',   # 2 named, 1 not there
                'nothing to see']                                              # 0 named, 1 true object
    truth = [[('red', 'circle', 'north'), ('blue', 'square', 'south')],
             [('green', 'cross', 'west'), ('pink', 'triangle', 'east')],
             [('red', 'circle', 'center')],
             [('blue', 'circle', 'north')]]
    m = caption_metrics(captions, truth)
    assert m['hallucination'] == pytest.approx(1 / 5)        # 1 of the 5 named objects is not in its image
    assert m['recall'] == pytest.approx(4 / 6)               # 2 + 1 + 1 + 0 of the 6 true objects
    assert m['exact'] == pytest.approx(1 / 4)
    assert m['objects_per_caption'] == pytest.approx(5 / 4)
    assert math.isnan(caption_metrics(['nothing'], [truth[0]])['hallucination'])   # nothing named: undefined


# ---- attribute accuracy ----

def test_attribute_accuracy_from_logits_whose_argmax_is_known_and_a_tie_is_wrong():
    data = caption_data([' one red circle north', ' two red square south'], [[0, 1, 2, 3]] * 2)
    vocab = value_vocab()
    data.encode(vocab)
    logits = torch.zeros(2, data.block_size, vocab.size)
    for pos, word in enumerate(('one', 'red', 'circle', 'north')):
        set_scores(logits, vocab, 0, pos, {word: 5.0})                    # row 0: all four right
    set_scores(logits, vocab, 1, 0, {'three': 5.0, 'two': 4.0})           # count wrong
    set_scores(logits, vocab, 1, 1, {'red': 3.0, 'pink': 3.0})            # colour tied with another: wrong
    set_scores(logits, vocab, 1, 2, {'square': 1.0})                      # shape right
    set_scores(logits, vocab, 1, 3, {'south': 2.0, 'north': 1.0})         # position right
    m = teacher_forced_metrics(FixedLogits(logits), data, vocab, torch.arange(2), 'cpu')
    assert (m['acc_count'], m['acc_colour'], m['acc_shape'], m['acc_position']) == (0.5, 0.5, 1.0, 1.0)
    assert m['attr_acc'] == pytest.approx(0.75)


def test_a_value_the_vocabulary_cannot_write_is_never_right():
    """'pink' and 'purple' both map to the unknown id: the model cannot say which it means."""
    data = caption_data([' one pink circle north'], [[0, 1, 2, 3]])
    vocab = value_vocab(leave_out=('pink', 'purple'))
    data.encode(vocab)
    assert data.targets[0, 1] == vocab.unk
    logits = torch.zeros(1, data.block_size, vocab.size)
    logits[0, 1, vocab.unk] = 5.0                                         # the likeliest 'colour': unknown
    assert teacher_forced_metrics(FixedLogits(logits), data, vocab, torch.arange(1), 'cpu')['acc_colour'] == 0.0


# ---- the reference's scores and PRIOR's weights ----

class BigramLM(torch.nn.Module):
    """A text-only reference whose P(next | previous token) is a table set by hand."""
    def __init__(self, probs):
        super().__init__()
        self.log_probs = torch.nn.Embedding.from_pretrained(probs.log())

    def forward(self, idx):
        return self.log_probs(idx)


def test_reference_scores_and_prior_weights_in_closed_form():
    data = caption_data([' red circle', ' red square'], [[-1, -1]] * 2, block_size=4)
    vocab = Vocab.from_captions(data.gpt2_tokens)            # red, circle, square, EOT and unknown: 5 ids
    data.encode(vocab)
    red, circle, square, eot = (int(vocab.encode([t])[0]) for t in (*data.gpt2_tokens[0], data.gpt2_tokens[1][1], EOT))
    table = torch.full((vocab.size, vocab.size), 1.0 / vocab.size)
    table[eot] = 0.125
    table[eot, red] = 0.5                                    # after BOS: 'red' with 0.5, the 4 others 0.125
    table[red] = 0.1 / 3
    table[red, circle], table[red, square] = 0.8, 0.1        # after 'red': circle 0.8, square 0.1
    for shape in (circle, square):
        table[shape] = 0.025
        table[shape, eot] = 0.9                              # after a shape: the end, 0.9
    expected = torch.tensor([[0.5, 0.8, 0.9, 0.0], [0.5, 0.1, 0.9, 0.0]])   # 0 where nothing is predicted
    for batch_size in (1, 256):
        torch.testing.assert_close(torch.from_numpy(score_captions(BigramLM(table), data, 'cpu', batch_size)),
                                   expected)
    # (1 - P_r)^alpha, to mean 1 over the 3 tokens: alpha 1 -> 3 * [.5, .2, .1] / .8 and 3 * [.5, .9, .1] / 1.5
    torch.testing.assert_close(token_weights(expected, data.targets),
                               torch.tensor([[1.875, 0.75, 0.375, 0.0], [1.0, 1.8, 0.2, 0.0]]))
    # alpha 2: 3 * [.25, .04, .01] / .3
    torch.testing.assert_close(token_weights(expected, data.targets, alpha=2.0)[0], torch.tensor([2.5, 0.4, 0.1, 0.0]))
    # floor 0.5: 0.5 + 0.5 * [.5, .2, .1] = [.75, .6, .55], to mean 1 over 3: 3 * [.75, .6, .55] / 1.9
    torch.testing.assert_close(token_weights(expected, data.targets, weight_floor=0.5)[0],
                               torch.tensor([2.25, 1.8, 1.65, 0.0]) / 1.9)


def test_top_weight_loss_is_the_nll_of_the_quarter_of_tokens_the_reference_finds_hardest():
    targets = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, IGNORE, IGNORE]])
    probs = torch.tensor([[0.9, 0.1, 0.5, 0.8, 0.0, 0.7, 0.95, 0.3, 0.0, 0.0]])
    nll = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8, 100, 100]])
    # the 2 of 8 tokens with the lowest P_r are positions 4 (P_r 0) and 1 (P_r 0.1): NLL 5 and 2
    assert top_weight_loss(nll, SimpleNamespace(targets=targets), probs) == pytest.approx(3.5)


# ---- retrieval ----

def test_rank_of_the_true_caption_with_ties_against_it():
    assert rank_of_first(torch.tensor([5.0, 1.0, 2.0])) == 1
    assert rank_of_first(torch.tensor([2.0, 3.0, 2.0, 1.0])) == 3          # one above, one tied: both count
    assert rank_of_first(torch.tensor([0.0, 0.0, 0.0])) == 3               # a model that cannot tell: last
    assert recall_at([1, 3, 6, 1], 'x') == {'x_r1': 0.5, 'x_r5': 0.75}


def test_retrieval_scores_rank_by_mean_nll_and_by_likelihood_ratio():
    # three candidates, the true one first: per-token NLL given the image, and P_r of each token
    targets = torch.tensor([[1, 1, 1, 1, IGNORE, IGNORE], [1, 1, IGNORE, IGNORE, IGNORE, IGNORE], [1] * 6])
    nll = torch.tensor([[1.0, 1, 1, 1, 0, 0], [3, 0, 0, 0, 0, 0], [0.5] * 6])
    ref = torch.tensor([[math.exp(-1)] * 4 + [0, 0], [1.0, 1.0, 0, 0, 0, 0], [math.exp(-0.25)] * 6])
    plain, ratio = retrieval_scores(nll, targets != IGNORE, ref)
    # mean NLL per token: 4/4, 3/2, 3/6 -> the third ranks above the true one (by the sum, 4 > 3 = 3: last)
    torch.testing.assert_close(plain, torch.tensor([-1.0, -1.5, -0.5]))
    assert rank_of_first(plain) == 2
    # log p(c | image) - log P_r(c): -4 + 4, -3 + 0, -3 + 1.5 -> the true caption first
    torch.testing.assert_close(ratio, torch.tensor([0.0, -3.0, -1.5]))
    assert rank_of_first(ratio) == 1
    assert retrieval_scores(nll, targets != IGNORE)[1] is None


# ---- BLEU's length ratio ----

def test_bleu_length_ratio_takes_the_closest_reference_and_sets_the_brevity_penalty():
    # 2 words against references of 5 and 3 words: the closest is 3; 4 words against 3 and 5: a tie,
    # the shorter (3) counts. Ratio (2 + 4) / (3 + 3) = 1: no penalty.
    hyps = [['a', 'dog'], ['a', 'man', 'is', 'here']]
    refs = [[['a', 'dog', 'runs', 'on', 'it'], ['a', 'dog', 'runs']], [['a', 'man', 'is'], ['a', 'man', 'is', 'here', 'now']]]
    assert length_ratio(hyps, refs) == pytest.approx(1.0)
    # the first caption alone: 2 / 3 words; BLEU-1 = exp(1 - 1/ratio) * precision, precision 2/2
    assert length_ratio(hyps[:1], refs[:1]) == pytest.approx(2 / 3)
    assert bleu(hyps[:1], refs[:1])[0] == pytest.approx(math.exp(1 - 3 / 2))
    assert length_ratio([['a', 'b', 'c']], [[['a']]]) == pytest.approx(3.0)      # longer: no penalty, ratio > 1


# ---- CIDEr-D ----

def test_cider_d_known_answers_with_its_length_penalty():
    # Two images; each n-gram occurs in the references of one image: idf = log(2 / 1) = l for all.
    # An exact hypothesis 'c d': cosine 1 on unigrams and bigrams, 0 on the empty 3- and 4-grams -> 10 * 2/4 = 5
    assert cider_d([['a', 'b'], ['c', 'd']], [[['a', 'b']], [['c', 'd']]]) == pytest.approx(5.0)
    # 'a b x y' against 'a b': unigram vectors l*(1,1,1,1) and l*(1,1,0,0): cosine 2 / (2 * sqrt 2);
    # bigrams (ab, bx, xy) vs (ab): 1 / sqrt 3; no reference 3- or 4-grams: 0. Its length (bigrams)
    # is 2 more than the reference's: penalty exp(-2^2 / (2 * 6^2)).
    first = 10 * (2 / (2 * math.sqrt(2)) + 1 / math.sqrt(3)) / 4 * math.exp(-4 / 72)
    got = cider_d([['a', 'b', 'x', 'y'], ['c', 'd']], [[['a', 'b']], [['c', 'd']]])
    assert got == pytest.approx((first + 5.0) / 2, rel=1e-12)
    # a hypothesis repeating a reference word is clipped at the reference's count: 'a a' vs 'a b'
    # unigrams: min(2l, l) * l / (2l * sqrt 2 l) = 1 / (2 sqrt 2); bigram 'a a' is not in 'a b': 0
    clipped = 10 * (1 / (2 * math.sqrt(2))) / 4
    assert cider_d([['a', 'a'], ['c', 'd']], [[['a', 'b']], [['c', 'd']]]) == pytest.approx((clipped + 5.0) / 2)
