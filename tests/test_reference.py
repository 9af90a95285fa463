import numpy as np
import pytest
import torch

from config import Config
from data import IGNORE, load_splits
from prior_loss import token_nll
from reference import (cache_paths, ensure_reference, load_cache, load_reference, make_vocab, score,
                       train_reference)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ref')
    cfg = Config(n_train=128, n_val=32, n_test=16, n_layer=1, n_head=2, n_embd=32, ref_max_iters=10,
                 ref_batch_size=16, ref_ckpt=str(tmp / 'ref.pt'), device='cpu')
    splits = load_splits(cfg)
    vocab = make_vocab(cfg, splits['train'])
    for d in splits.values():
        d.encode(vocab)
    path, probs = ensure_reference(cfg, splits, vocab, 'cpu', log=lambda *a: None)
    return cfg, splits, vocab, path, probs


def test_scores_are_exp_of_minus_reference_nll(built):
    _, splits, _, path, probs = built
    model, _, _ = load_reference(path, 'cpu')
    d = splits['val']
    with torch.no_grad():
        nll = token_nll(model(d.idx), d.targets)
    mask = (d.targets != IGNORE).numpy()
    np.testing.assert_allclose(probs['val'][mask], torch.exp(-nll).numpy()[mask], rtol=1e-5, atol=1e-6)
    assert (probs['val'][~mask] == 0).all()


def test_training_lowers_the_reference_loss(built):
    cfg, splits, vocab, _, _ = built
    cfg2 = Config(**{**cfg.__dict__, 'ref_max_iters': 1})
    untrained = train_reference(cfg2, splits['train'], vocab, 'cpu', log=lambda *a: None)
    trained, _, _ = load_reference(cfg.ref_ckpt, 'cpu')
    d = splits['val']
    mask = d.targets != IGNORE
    with torch.no_grad():
        assert token_nll(trained(d.idx), d.targets)[mask].mean() < token_nll(untrained(d.idx), d.targets)[mask].mean()


def test_cache_is_memory_mapped_and_reused(built):
    cfg, splits, vocab, path, probs = built
    assert isinstance(probs['train'], np.memmap)
    mtime = __import__('os').path.getmtime(cache_paths(path, 'train')[0])
    ensure_reference(cfg, splits, vocab, 'cpu', log=lambda *a: None)
    assert __import__('os').path.getmtime(cache_paths(path, 'train')[0]) == mtime   # not rescored


def test_cache_for_other_data_is_refused(built):
    cfg, splits, vocab, path, _ = built
    other = load_splits(Config(**{**cfg.__dict__, 'data_seed': cfg.data_seed + 1}), names=('train',))['train']
    other.encode(vocab)
    with pytest.raises(ValueError, match='data_fingerprint'):
        load_cache(path, 'train', other, vocab)


def test_cache_for_another_reference_is_refused(built, tmp_path):
    import shutil
    cfg, splits, vocab, path, _ = built
    moved = tmp_path / 'ref.pt'
    shutil.copy(path, moved)
    for split in ('train',):
        for src in cache_paths(path, split):
            shutil.copy(src, tmp_path / __import__('os').path.basename(src))
    load_cache(str(moved), 'train', splits['train'], vocab)           # same bytes: accepted
    with open(moved, 'ab') as f:
        f.write(b'\0')                                                 # another checkpoint
    with pytest.raises(ValueError, match='ref_sha256'):
        load_cache(str(moved), 'train', splits['train'], vocab)


def test_cache_with_nan_is_refused(built, tmp_path):
    import shutil
    _, splits, vocab, path, _ = built
    moved = tmp_path / 'ref.pt'
    shutil.copy(path, moved)
    npy, meta = cache_paths(path, 'val')
    shutil.copy(meta, cache_paths(str(moved), 'val')[1])
    bad = np.load(npy)
    bad[0, 0] = np.nan
    np.save(cache_paths(str(moved), 'val')[0], bad)
    with pytest.raises(ValueError, match='NaN'):
        load_cache(str(moved), 'val', splits['val'], vocab)
