import os

import numpy as np
import pytest
import torch

from config import Config
from data import load_splits, make_vocab
from prior_loss import IGNORE, token_nll
from reference import ensure_reference, load_reference, score_captions, train_reference
from runs.reference_files import cache_paths, expected_manifest, load_cache, write_cache


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ref')
    cfg = Config(n_train=128, n_val=32, n_test=16, n_layer=1, n_head=2, n_embd=32, ref_max_iters=10,
                 ref_batch_size=16, ref_ckpt=str(tmp / 'ref.pt'), device='cpu')
    splits = load_splits(cfg)
    vocab = make_vocab(cfg, splits['train'])
    for d in splits.values():
        d.encode(vocab)
    path, probs = ensure_reference(cfg, splits['train'], vocab, 'cpu', log=lambda *a: None)
    return cfg, splits, vocab, path, probs


def test_the_cache_holds_the_saved_references_scores_of_every_row(built):
    """The cache, not the formula (tests/test_known_answers.py has the scores of a reference set by
    hand): the scores of the saved reference, row for row, whatever the batch they were scored in."""
    _, splits, _, path, probs = built
    model, _, _ = load_reference(path, 'cpu')
    np.testing.assert_allclose(probs, score_captions(model, splits['train'], 'cpu', batch_size=7), rtol=1e-5, atol=1e-7)
    assert (probs[(splits['train'].targets == IGNORE).numpy()] == 0).all() and probs.max() > 0


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
    assert isinstance(probs, np.memmap)
    mtime = os.path.getmtime(cache_paths(path)[0])
    ensure_reference(cfg, splits['train'], vocab, 'cpu', log=lambda *a: None)
    assert os.path.getmtime(cache_paths(path)[0]) == mtime   # not rescored


def test_cache_for_other_data_is_refused(built):
    cfg, splits, vocab, path, _ = built
    other = load_splits(Config(**{**cfg.__dict__, 'data_seed': cfg.data_seed + 1}), names=('train',))['train']
    other.encode(vocab)
    with pytest.raises(ValueError, match='data_fingerprint'):
        load_cache(path, other, vocab)


def test_cache_for_another_reference_is_refused(built, tmp_path):
    import shutil
    cfg, splits, vocab, path, _ = built
    moved = tmp_path / 'ref.pt'
    shutil.copy(path, moved)
    for src in cache_paths(path):
        shutil.copy(src, tmp_path / os.path.basename(src))
    load_cache(str(moved), splits['train'], vocab)                    # same bytes: accepted
    with open(moved, 'ab') as f:
        f.write(b'\0')                                                 # another checkpoint
    with pytest.raises(ValueError, match='ref_sha256'):
        load_cache(str(moved), splits['train'], vocab)


def test_cache_with_nan_is_refused(built, tmp_path):
    import shutil
    _, splits, vocab, path, _ = built
    moved = tmp_path / 'ref.pt'
    shutil.copy(path, moved)
    npy, meta = cache_paths(path)
    shutil.copy(meta, cache_paths(str(moved))[1])
    bad = np.load(npy)
    bad[0, 0] = np.nan
    write_cache(bad, expected_manifest(splits['train'], vocab, str(moved)), str(moved))   # a NaN reference's scores
    with pytest.raises(ValueError, match='NaN'):
        load_cache(str(moved), splits['train'], vocab)


def test_ntp_run_does_not_score(built, tmp_path):
    """NTP starting from the reference needs its checkpoint, not its scores."""
    cfg, splits, vocab, path, _ = built
    path2, probs = ensure_reference(Config(**{**cfg.__dict__, 'ref_ckpt': str(tmp_path / 'r.pt'), 'ref_max_iters': 1}),
                                    splits['train'], vocab, 'cpu', log=lambda *a: None, scored=False)
    assert probs is None and os.path.isfile(path2) and not os.path.exists(cache_paths(path2)[0])
