"""Cache keys made from what each cache depends on (issue 33): one declaration per cache of the settings
its builder reads (the builder is given those and nothing else), and the data by content."""
import dataclasses
import os

import pytest
import torch

import encoder
import reference
from config import Config
from data import load_splits, make_vocab
from runs.caches import captions_fingerprint

CACHES = {'reference': (reference.REFERENCE_SETTINGS, reference.reference_path),
          'encoder': (encoder.ENCODER_SETTINGS, encoder.default_vision_ckpt)}
PLACES = ('out_dir', 'cache_dir', 'ref_ckpt', 'vision_ckpt')    # where a cache is, not what it holds


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    cfg = Config(n_train=64, n_val=16, n_test=16, n_layer=1, n_head=2, n_embd=32, vit_layer=1, vit_embd=32,
                 ref_max_iters=2, ref_batch_size=16, enc_max_iters=1, enc_batch_size=16, arch='h', init_vision='clip',
                 out_dir=str(tmp_path_factory.mktemp('c') / 'run'), device='cpu')
    splits = load_splits(cfg, names=('train', 'val'))
    vocab = make_vocab(cfg, splits['train'])
    for split in splits.values():
        split.encode(vocab)
    return cfg, splits, vocab


def key(cache, cfg, train, vocab):
    return os.path.basename(os.path.dirname(CACHES[cache][1](cfg, train, vocab)))


def changed(name, value):
    """Another valid-looking value of a setting."""
    if name == 'init_lm':
        return 'gpt2'
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return {'vision': 'resnet18', 'vision_features': 'blocks', 'init_vision': 'words'}.get(name, value + 'x')


@pytest.mark.parametrize('cache', CACHES)
def test_every_declared_setting_is_in_the_key_and_no_other(shapes, cache):
    cfg, splits, vocab = shapes
    declared = CACHES[cache][0]
    for name in declared:
        base = dataclasses.replace(cfg, init_lm='gpt2') if name == 'gpt2_model' else cfg   # read only with GPT-2
        other = dataclasses.replace(base, **{name: changed(name, getattr(base, name))})
        assert key(cache, other, splits['train'], vocab) != key(cache, base, splits['train'], vocab), name
    for field in dataclasses.fields(Config):
        if field.name not in declared + PLACES:
            other = dataclasses.replace(cfg, **{field.name: changed(field.name, getattr(cfg, field.name))})
            assert key(cache, other, splits['train'], vocab) == key(cache, cfg, splits['train'], vocab), field.name
    scratch = dataclasses.replace(cfg, init_lm='scratch')          # how the LVLM starts: one reference for both
    assert key(cache, scratch, splits['train'], vocab) == key(cache, cfg, splits['train'], vocab)


def test_the_builders_are_given_the_declared_settings_alone_and_build_the_same(shapes):
    cfg, splits, vocab = shapes
    train = splits['train']
    quiet = dict(log=lambda *a: None)
    ref = reference.train_reference(reference.reference_recipe(cfg), train, vocab, 'cpu', **quiet)  # reads no other
    full = reference.train_reference(cfg, train, vocab, 'cpu', **quiet)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), full.state_dict().values()))
    for how in ('clip', 'words'):
        vision = encoder.pretrain(encoder.encoder_recipe(dataclasses.replace(cfg, init_vision=how)), train, vocab,
                                  'cpu', val=splits['val'], **quiet)
        assert vision.state_dict()
    with pytest.raises(AttributeError):                            # an undeclared setting cannot be read
        reference.reference_recipe(cfg).learning_rate


def test_captions_are_keyed_by_their_tokens_not_their_compact_ids(shapes, tmp_path):
    """' blue' -> the next GPT-2 token everywhere gives the same compact ids: the old key matched and the
    run stopped on 'another vocabulary'. Now it is another key, and a fresh run trains its own reference."""
    cfg, splits, vocab = shapes
    train = splits['train']
    cfg = dataclasses.replace(cfg, cache_dir=str(tmp_path / 'cache'))
    from sources.tokenizer import get_tokenizer
    [blue] = get_tokenizer().encode_ordinary(' blue')
    recoloured = train.subset(range(len(train)))
    recoloured.gpt2_tokens = [[blue + 1 if t == blue else t for t in row] for row in train.gpt2_tokens]
    other_vocab = make_vocab(cfg, recoloured)
    recoloured.encode(other_vocab)
    assert torch.equal(recoloured.targets, train.targets) and other_vocab.gpt2_ids != vocab.gpt2_ids
    assert captions_fingerprint(recoloured) != captions_fingerprint(train)
    first, _ = reference.ensure_reference(cfg, train, vocab, 'cpu', log=lambda *a: None)
    second, probs = reference.ensure_reference(cfg, recoloured, other_vocab, 'cpu', log=lambda *a: None)
    assert first != second and probs.shape == tuple(train.targets.shape)


@pytest.mark.parametrize('damage', [lambda b: b[:len(b) // 2], lambda b: b'',                  # torn, empty,
                                    lambda b: b[:len(b) // 2] + bytes(64) + b[len(b) // 2 + 64:]])  # zeroed
def test_a_damaged_encoder_cache_is_rebuilt_like_the_feature_cache(shapes, tmp_path, damage):
    from runs.files import load_checkpoint
    cfg, splits, vocab = shapes
    cfg = dataclasses.replace(cfg, cache_dir=str(tmp_path / 'cache'))
    path = encoder.ensure_encoder(cfg, splits['train'], vocab, 'cpu', log=lambda *a: None)
    with open(path, 'rb') as f:
        good = f.read()
    with open(path, 'wb') as f:
        f.write(damage(good))
    logs = []
    assert encoder.ensure_encoder(cfg, splits['train'], vocab, 'cpu', log=logs.append) == path
    assert any(path in line and 'pretraining' in line for line in logs), logs
    assert load_checkpoint(path, required=('vision',))['vision']
    given = dataclasses.replace(cfg, vision_ckpt=path)             # a file the user named is never replaced
    with open(path, 'wb') as f:
        f.write(damage(good))
    with pytest.raises(ValueError, match=path):
        encoder.ensure_encoder(given, splits['train'], vocab, 'cpu', log=lambda *a: None)
