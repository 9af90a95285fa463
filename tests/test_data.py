import numpy as np
import pytest
import torch

from config import Config
from data import batch_indices, load_splits, shapes_split as make_shapes
from prior_loss import IGNORE
from sources.shapes import ATTR_NAMES, ATTRIBUTES, CITIES, FILLER, NAMES, NOISE, RELEVANT
from sources.tokenizer import EOT, Vocab, get_tokenizer


@pytest.fixture(scope='module')
def small():
    cfg = Config(n_train=200, n_val=50, n_test=50)
    splits = load_splits(cfg)
    vocab = Vocab.from_captions(splits['train'].gpt2_tokens)
    for d in splits.values():
        d.encode(vocab)
    return cfg, splits, vocab


def test_generation_is_deterministic(small):
    cfg, splits, _ = small
    again = load_splits(cfg)['train']
    assert torch.equal(again.images, splits['train'].images)
    assert again.texts == splits['train'].texts
    other = make_shapes(200, [cfg.data_seed + 1, 0], 32, 0.5, 0.08, 48)
    assert other.texts != splits['train'].texts


def test_splits_are_disjoint(small):
    _, splits, _ = small
    seen = {}
    for name, d in splits.items():
        for img in d.images:
            key = img.numpy().tobytes()
            assert key not in seen, f"an image of {name} is also in {seen.get(key)}"
            seen[key] = name


def test_targets_are_inputs_shifted_by_one_and_end_with_eot(small):
    _, splits, vocab = small
    d = splits['train']
    for i in range(len(d)):
        k = int((d.targets[i] != IGNORE).sum())
        assert d.idx[i, 0] == vocab.eot                       # BOS
        assert torch.equal(d.targets[i, :k - 1], d.idx[i, 1:k])
        assert d.targets[i, k - 1] == vocab.eot                # closing EOT is a caption token
        assert (d.targets[i, k:] == IGNORE).all() and (d.classes[i, k:] == IGNORE).all()
        assert vocab.decode(d.targets[i, :k - 1].tolist()) == d.texts[i]


def test_token_labels_match_the_words_they_cover(small):
    _, splits, vocab = small
    d = splits['train']
    names = {' ' + n for n in NAMES} | {' ' + c for c in CITIES}
    counts = {FILLER: 0, RELEVANT: 0, NOISE: 0}
    for i in range(len(d)):
        k = int((d.targets[i] != IGNORE).sum()) - 1
        for j in range(k):
            word = vocab.decode([int(d.targets[i, j])])
            cls, attr = int(d.classes[i, j]), int(d.attrs[i, j])
            counts[cls] += 1
            if attr >= 0:
                assert cls == RELEVANT and word[1:] in ATTRIBUTES[ATTR_NAMES[attr]], (word, attr)
            if cls == RELEVANT:
                assert attr >= 0
            if cls == NOISE:                                  # a BPE piece of a name or city
                assert any(word in n for n in names), word
    assert min(counts.values()) > 0
    noisy = sum('taken by' in t for t in d.texts) / len(d)
    assert 0.35 < noisy < 0.65                                  # default noise_rate 0.5


@pytest.mark.parametrize('filler', ['low', 'high'])
def test_filler_level_changes_the_filler_share(filler):
    share = {}
    for level in ('default', filler):
        d = make_shapes(300, [5, 0], 32, 0.5, 0.08, 64, level)
        share[level] = float(np.mean(np.concatenate(d.token_classes) == FILLER))
    assert (share[filler] < share['default'] - 0.1) if filler == 'low' else (share[filler] > share['default'] + 0.05)


def test_colour_has_a_skewed_text_prior():
    d = make_shapes(2000, [7, 0], 32, 0.5, 0.08, 48)
    pairs = [(c, s) for objs in d.objects for c, s, _ in objs]
    red = [s for c, s in pairs if c == 'red']
    assert red.count('circle') / len(red) > 0.5                # "a red ..." -> circle, by text alone


def test_vocab_maps_unseen_tokens_to_unknown(small):
    _, _, vocab = small
    enc = get_tokenizer()
    ids = vocab.encode(enc.encode(' a red zeppelin'))
    assert ids[-1] == vocab.unk and ids.max() < vocab.size
    assert vocab.decode(vocab.encode(enc.encode(' a red circle'))) == ' a red circle'
    assert Vocab(vocab.state()['gpt2_ids']).gpt2_ids == vocab.gpt2_ids
    assert vocab.eot == vocab.encode([EOT])[0]


def test_batch_indices_visit_every_item_once_per_epoch():
    n = 37
    stream = torch.cat([batch_indices(n, 5, p, seed=3) for p in range(0, 2 * n - 4, 5)])
    assert sorted(stream[:n].tolist()) == list(range(n))
    assert torch.equal(batch_indices(n, 5, 40, seed=3), stream[40:45])   # pure function of position
    assert stream[n:2 * n - 4].tolist() != stream[:n - 4].tolist()          # a fresh order each epoch


def test_images_are_scaled_to_minus_one_one(small):
    cfg, splits, _ = small
    images, idx, targets, classes = splits['val'].batch(torch.arange(4), 'cpu')
    assert images.shape == (4, 3, cfg.image_size, cfg.image_size) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert idx.shape == targets.shape == classes.shape == (4, cfg.block_size)


def test_caption_too_long_for_block_is_an_error():
    d = make_shapes(20, [1, 0], 32, 1.0, 0.08, block_size=20)
    with pytest.raises(ValueError, match='block_size'):
        d.encode(Vocab.from_captions(d.gpt2_tokens))


def test_subset_is_those_rows(small):
    _, splits, _ = small
    d = splits['val']
    sub = d.subset([7, 2, 30])
    assert len(sub) == 3 and sub.texts == [d.texts[7], d.texts[2], d.texts[30]]
    full, part = d.batch(torch.tensor([7, 2, 30]), 'cpu'), sub.batch(torch.arange(3), 'cpu')
    assert all(torch.equal(a, b) for a, b in zip(full, part))
    assert sub.objects == [d.objects[7], d.objects[2], d.objects[30]]


def test_the_caption_parser_reads_objects_with_or_without_the():
    from sources.shapes import parse_objects
    text = 'two shapes: a red circle in northwest, and a blue square at the south. a green cross'
    assert parse_objects(text) == [('red', 'circle', 'northwest'), ('blue', 'square', 'south')]
