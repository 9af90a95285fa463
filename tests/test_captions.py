"""Data on disk: the four formats, image modes, and every kind of bad input."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from config import Config
from data import load_splits
from sources.captions import read_records
from sources.images import BadData, ImageFiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLICKR = os.path.join(ROOT, '..', 'shared', 'data', 'flickr8k')
WORDS = 'a dog runs on the grass . two people walk near a red car on a busy street'.split()


def write_image(path, seed, mode='RGB', fmt='JPEG', size=(20, 16)):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    img.convert(mode).save(path, fmt)


def caption(i):
    rng = np.random.default_rng(i)
    return ' '.join(rng.choice(WORDS, size=8))


def make_folder(tmp_path, n_images=30, fmt='csv', rows=None):
    """A folder dataset with n_images images and 2 captions each (plus extra raw rows)."""
    root = tmp_path / 'ds'
    (root / 'images').mkdir(parents=True)
    entries = []
    for i in range(n_images):
        write_image(root / 'images' / f'{i}.jpg', i)
        entries += [(f'{i}.jpg', caption(2 * i)), (f'{i}.jpg', caption(2 * i + 1))]
    if fmt == 'csv':
        lines = ['image,caption'] + [f'{im},"{c}"' for im, c in entries] + (rows or [])
        (root / 'captions.csv').write_bytes('\n'.join(lines).encode() if all(isinstance(x, str) for x in lines)
                                            else b'\n'.join(x if isinstance(x, bytes) else x.encode() for x in lines))
    else:
        lines = [json.dumps({'image': im, 'caption': c}) for im, c in entries] + (rows or [])
        (root / 'captions.jsonl').write_text('\n'.join(lines))
    return root


def records(path, **kw):
    return read_records(str(path), log=lambda *a: None, **kw)


# ---- formats ----

def test_folder_csv_and_jsonl_read_the_same(tmp_path):
    a = records(make_folder(tmp_path / 'a', fmt='csv'))
    b = records(make_folder(tmp_path / 'b', fmt='jsonl'))
    assert len(a) == len(b) == 60
    assert [c for _, c in a] == [c for _, c in b]


def test_coco_and_llava_json(tmp_path):
    folder = make_folder(tmp_path)
    pairs = records(folder)
    coco = {'images': [{'id': i, 'file_name': f'{i}.jpg'} for i in range(30)],
            'annotations': [{'image_id': int(os.path.basename(p)[:-4]), 'caption': c, 'id': n}
                            for n, (p, c) in enumerate(pairs)]}
    (folder / 'captions_train2017.json').write_text(json.dumps(coco))
    llava = [{'id': str(n), 'image': os.path.basename(p),
              'conversations': [{'from': 'human', 'value': '<image>\nDescribe.'}, {'from': 'gpt', 'value': c}]}
             for n, (p, c) in enumerate(pairs)]
    (folder / 'llava.json').write_text(json.dumps(llava))
    root = str(folder / 'images')
    assert records(folder / 'captions_train2017.json', image_root=root) == pairs
    assert records(folder / 'llava.json', image_root=root) == pairs


def test_coco_and_llava_json_with_a_byte_order_mark_read_like_csv_and_jsonl(tmp_path):
    folder = make_folder(tmp_path)
    pairs = records(folder)
    coco = {'images': [{'id': i, 'file_name': f'{i}.jpg'} for i in range(30)],
            'annotations': [{'image_id': int(os.path.basename(p)[:-4]), 'caption': c} for p, c in pairs]}
    llava = [{'image': os.path.basename(p), 'conversations': [{'from': 'human', 'value': '<image>'},
                                                            {'from': 'gpt', 'value': c}]} for p, c in pairs]
    for name, doc in (('coco.json', coco), ('llava.json', llava)):
        (folder / name).write_bytes(b'\xef\xbb\xbf' + json.dumps(doc).encode())     # as Windows tools save it
        assert records(folder / name, image_root=str(folder / 'images')) == pairs


def test_splits_keep_all_captions_of_an_image_together(tmp_path):
    cfg = Config(dataset=str(make_folder(tmp_path, n_images=60)), val_frac=0.2, test_frac=0.2, image_size=16)
    splits = load_splits(cfg, log=lambda *a: None)
    images = {name: set(d.images.paths) for name, d in splits.items()}
    assert not (images['train'] & images['val']) and not (images['train'] & images['test'])
    assert not (images['val'] & images['test'])
    assert sum(len(d) for d in splits.values()) == 120
    # by relative path: the same folder elsewhere, with 20 more images, puts each image in the same split
    moved = load_splits(dataclasses.replace(cfg, dataset=str(make_folder(tmp_path / 'elsewhere', n_images=80))),
                        log=lambda *a: None)
    relative = lambda d: {os.path.basename(p) for p in d.images.paths}
    for name in ('train', 'val', 'test'):
        assert relative(splits[name]) <= relative(moved[name])
    everything = load_splits(cfg, names=('all',), log=lambda *a: None)['all']
    assert len(everything) == 120


@pytest.mark.parametrize('mode, fmt', [('L', 'JPEG'), ('RGBA', 'PNG'), ('P', 'PNG'), ('CMYK', 'JPEG'),
                                       ('I;16', 'PNG'), ('RGB', 'PNG')])
def test_any_image_mode_becomes_rgb_uint8(tmp_path, mode, fmt):
    path = tmp_path / f'img.{fmt.lower()}'
    if mode == 'I;16':
        Image.fromarray(np.arange(20 * 16, dtype=np.uint16).reshape(16, 20) * 200).save(path)
    else:
        write_image(path, 0, mode, fmt)
    image = ImageFiles([str(path)], 12)[0]
    assert image.shape == (3, 12, 12) and image.dtype == torch.uint8
    if mode == 'I;16':
        assert image.max() > 100                  # 16-bit scaled down, not clipped to 255 or wrapped


# ---- bad input: a clear error naming file and row by default, counted skips on request ----

BAD_ROWS = {
    'missing_image': ('nope.jpg,"a dog"', None),
    'empty_caption': ('0.jpg,"   "', None),
    'malformed_row': ('0.jpg,"a dog",extra', None),
    'duplicate': (None, 'duplicate'),
    'invalid_utf8': (b'0.jpg,"a \xff\xfe dog"', None),
}


@pytest.mark.parametrize('kind', list(BAD_ROWS))
def test_bad_csv_rows(tmp_path, kind):
    row, _ = BAD_ROWS[kind]
    if kind == 'duplicate':
        row = f'0.jpg,"{caption(0)}"'
    folder = make_folder(tmp_path, rows=[row])
    with pytest.raises(BadData) as e:
        records(folder)
    assert 'captions.csv line 62' in str(e.value) and kind in str(e.value)
    logs = []
    ok = read_records(str(folder), skip_bad=True, log=logs.append)
    assert len(ok) == 60 and f"'{kind}': 1" in logs[0]


@pytest.mark.parametrize('kind, content', [('empty_image', b''), ('truncated_image', None),
                                           ('not_an_image', b'hello, I am text')])
def test_bad_image_files(tmp_path, kind, content):
    folder = make_folder(tmp_path)
    target = folder / 'images' / '3.jpg'
    if content is None:                           # a real JPEG cut in half
        content = target.read_bytes()[:len(target.read_bytes()) // 2]
    target.write_bytes(content)
    with pytest.raises(BadData) as e:
        records(folder)
    assert kind in str(e.value) and '3.jpg' in str(e.value) and 'line 8' in str(e.value)
    assert len(records(folder, skip_bad=True)) == 58          # both captions of image 3 skipped


def test_bad_jsonl_lines(tmp_path):
    folder = make_folder(tmp_path, fmt='jsonl', rows=['{"image": "0.jpg", "caption": ', '{"caption": "no image"}'])
    with pytest.raises(BadData) as e:
        records(folder)
    msg = str(e.value)
    assert 'captions.jsonl line 61: not JSON' in msg and "line 62: entry has no 'image'" in msg
    assert len(records(folder, skip_bad=True)) == 60


def test_csv_is_parsed_as_a_whole(tmp_path):
    """A quoted caption may span lines (the row keeps all of it, and a later row's number is
    right); a byte-order mark is fine; an unclosed quote stops with the line it starts on."""
    folder = make_folder(tmp_path, n_images=2, rows=['0.jpg,"a dog\non a mat"', '1.jpg,"a cat"'])
    text = (folder / 'captions.csv').read_bytes()
    (folder / 'captions.csv').write_bytes(b'\xef\xbb\xbf' + text)
    got = records(folder)
    assert got[-2][1] == 'a dog\non a mat' and got[-1][1] == 'a cat' and len(got) == 6
    (folder / 'captions.csv').write_bytes(text + b'\n1.jpg,"extra",x')
    with pytest.raises(BadData, match=r'captions.csv line 9: expected 2 fields'):
        records(folder)
    (folder / 'captions.csv').write_bytes(text + b'\n1.jpg,"never closed\n')
    with pytest.raises(BadData, match=r'captions.csv line 9: malformed CSV'):
        records(folder)
    # a bad line inside a quoted caption takes its whole row with it; a row of blanks is reported
    (folder / 'captions.csv').write_bytes(text + b'\n1.jpg,"first\n\xff\xfe broken\nend"\n , \n0.jpg,"ok"\n')
    logs = []
    got = read_records(str(folder), skip_bad=True, log=logs.append)
    assert got[-1][1] == 'ok' and len(got) == 7
    assert "'invalid_utf8': 1" in logs[0] and "'empty_caption': 1" in logs[0]
    with pytest.raises(BadData, match=r'line 9-11: not UTF-8'):
        records(folder)


def test_captions_that_are_not_text(tmp_path):
    folder = make_folder(tmp_path, fmt='jsonl', rows=['{"image": "0.jpg", "caption": ["a", "b"]}',
                                                      '{"image": "0.jpg"}'])
    with pytest.raises(BadData) as e:
        records(folder)
    assert 'line 61: caption is a list, not text' in str(e.value) and 'line 62: entry has no caption' in str(e.value)
    llava = [{'image': '0.jpg', 'conversations': [{'from': 'human', 'value': '<image>'}]}]
    (folder / 'llava.json').write_text(json.dumps(llava))
    with pytest.raises(BadData, match='entry 0: entry has no caption'):
        records(folder / 'llava.json', image_root=str(folder / 'images'))
    (folder / 'coco.json').write_text(json.dumps({'images': [], 'annotations': ['not an object']}))
    with pytest.raises(BadData, match='annotation 0: annotation is a str'):
        records(folder / 'coco.json', image_root=str(folder / 'images'))


def test_missing_image_folder_and_dataset(tmp_path):
    folder = make_folder(tmp_path)
    with pytest.raises(BadData, match='image folder'):
        records(folder, image_root=str(tmp_path / 'nowhere'))
    with pytest.raises(BadData, match='does not exist'):
        records(tmp_path / 'no_such_dataset')


def test_long_captions_are_truncated_and_counted(tmp_path):
    folder = make_folder(tmp_path, rows=['0.jpg,"' + ' '.join(['dog'] * 100) + '"'])
    logs = []
    cfg = Config(dataset=str(folder), block_size=16, val_frac=0.0, test_frac=0.0, image_size=16)
    train = load_splits(cfg, names=('all',), log=logs.append)['all']
    assert any('1 captions longer than block_size 16 were truncated' in line for line in logs)
    assert max(len(t) for t in train.gpt2_tokens) == 15


def test_reference_cache_out_of_range_is_refused(tmp_path):
    from data import make_vocab
    from reference import ensure_reference
    from runs.reference_files import cache_paths, expected_manifest, load_cache, write_cache
    cfg = Config(n_train=64, n_val=16, n_test=8, n_layer=1, n_head=2, n_embd=16, ref_max_iters=2,
                 ref_ckpt=str(tmp_path / 'ref.pt'), device='cpu')
    splits = load_splits(cfg)
    vocab = make_vocab(cfg, splits['train'])
    for d in splits.values():
        d.encode(vocab)
    ensure_reference(cfg, splits['train'], vocab, 'cpu', log=lambda *a: None)
    npy = cache_paths(cfg.ref_ckpt)[0]
    bad = np.load(npy)
    bad[1, 1] = 1.5
    np.save(npy, bad)
    with pytest.raises(ValueError, match='changed since its manifest'):          # edited after it was written
        load_cache(cfg.ref_ckpt, splits['train'], vocab)
    write_cache(bad, expected_manifest(splits['train'], vocab, cfg.ref_ckpt), cfg.ref_ckpt)    # or written so
    with pytest.raises(ValueError, match='outside'):
        load_cache(cfg.ref_ckpt, splits['train'], vocab)


# ---- end to end on data on disk ----

@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['csv', 'jsonl', 'coco', 'llava'])
def test_train_and_eval_on_every_format(tiny_cfg, tmp_path, fmt):
    folder = make_folder(tmp_path, n_images=60, fmt='jsonl' if fmt == 'jsonl' else 'csv')
    dataset, image_root = str(folder), ''
    if fmt in ('coco', 'llava'):
        pairs = records(folder)
        if fmt == 'coco':
            doc = {'images': [{'id': i, 'file_name': f'{i}.jpg'} for i in range(60)],
                   'annotations': [{'image_id': int(os.path.basename(p)[:-4]), 'caption': c} for p, c in pairs]}
        else:
            doc = [{'image': os.path.basename(p), 'conversations': [{'from': 'human', 'value': '<image>'},
                                                                    {'from': 'gpt', 'value': c}]} for p, c in pairs]
        dataset, image_root = str(tmp_path / f'{fmt}.json'), str(folder / 'images')
        open(dataset, 'w').write(json.dumps(doc))
    cfg = dataclasses.replace(tiny_cfg, dataset=dataset, image_root=image_root, image_size=16, val_frac=0.25,
                              test_frac=0.25, block_size=24, num_workers=1 if fmt == 'csv' else 0)
    from train import train
    results = train(cfg, log=lambda *a: None)
    assert 0 <= results['retrieval_r1'] <= results['retrieval_r5'] <= 1
    assert results['loss'] > 0 and results['loss_top_weight'] > 0
    if fmt == 'csv':                              # the CLI on the whole folder, and a folder with new words
        other = make_folder(tmp_path / 'other', n_images=12)
        with open(other / 'captions.csv', 'a') as f:
            f.write('\n0.jpg,"a zebra plays the xylophone"')
        out = subprocess.run([sys.executable, 'eval.py', f'--ckpt={cfg.out_dir}/ckpt.pt', '--split=all',
                              f'--dataset={other}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert '| retrieval_r1 |' in out.stdout


@pytest.mark.skipif(not os.path.isdir(FLICKR), reason='../shared/data/flickr8k is not here (research data, not shipped)')
def test_flickr8k_reads_with_its_duplicates_counted():
    logs = []
    pairs = read_records(FLICKR, skip_bad=True, log=logs.append)
    skipped = [line for line in logs if 'skipped' in line]       # a slow read also logs progress lines first
    assert len(pairs) == 35315 - 7 and len(skipped) == 1 and "{'duplicate': 7}" in skipped[0]
    assert ImageFiles([pairs[0][0]], 32)[0].shape == (3, 32, 32)


def test_caption_metrics_count_distinct_greedy_captions(tmp_path, monkeypatch):
    import eval as evaluation
    from data import make_vocab
    from model import LVLM, gpt_config
    cfg = Config(dataset=str(make_folder(tmp_path, n_images=40)), val_frac=0.25, test_frac=0.25, image_size=16,
                 n_layer=1, n_head=2, n_embd=16)
    splits = load_splits(cfg, names=('train', 'test'), log=lambda *a: None)
    vocab = make_vocab(cfg, splits['train'])
    test = splits['test'].encode(vocab)
    model = LVLM(cfg, gpt_config(cfg, vocab))
    n_images = len(set(test.image_index.tolist()))
    for said, expected in ((lambda i: 'a dog runs', 1 / n_images), (lambda i: f'a dog {i}', 1.0)):
        monkeypatch.setattr(evaluation, 'generate_captions',
                            lambda model, data, vocab, rows, device, *decoding, **debias: [said(i) for i in range(len(rows))])
        metrics, captions = evaluation.evaluate(model, test, vocab, 'cpu')
        assert len(captions) == n_images and metrics['distinct'] == pytest.approx(expected)


def test_retrieval_by_likelihood_ratio_ranks_what_the_image_adds(tiny_cfg):
    """log p(c | image) - log P_r(c). With P_r = 1 it is the summed log-likelihood, so its R@1 equals a
    count made here from the model's logits; a reference that finds one caption far likelier than the
    others makes that caption lose, wherever it stood."""
    from data import make_vocab
    from eval import retrieval_metrics
    from metrics.retrieval import retrieval_candidates
    from model import LVLM, gpt_config
    cfg = dataclasses.replace(tiny_cfg, arch='h')
    data = load_splits(cfg, names=('train',))['train'].subset(range(40))
    data.encode(make_vocab(cfg, data))
    torch.manual_seed(0)
    model = LVLM(cfg, gpt_config(cfg, make_vocab(cfg, data))).eval()
    got = retrieval_metrics(model, data, 'cpu', n_images=30, ref_probs=torch.ones(data.targets.shape))
    hits = 0
    for rows, same_image in retrieval_candidates(data, 30):
        images, idx, targets, _ = data.batch(rows, 'cpu', same_image)
        with torch.no_grad():
            nll = torch.nn.functional.cross_entropy(model(images, idx).transpose(1, 2), targets,
                                                    ignore_index=-1, reduction='none').sum(1)
        hits += bool((nll[1:] > nll[0]).all())
    assert got['retrieval_ratio_r1'] == pytest.approx(hits / 30) and 0 < hits < 30
    probs = torch.full(data.targets.shape, 0.5)
    probs[retrieval_candidates(data, 30)[0][0][0]] = 1.0                  # the first image's true caption
    assert retrieval_metrics(model, data, 'cpu', n_images=1, ref_probs=probs)['retrieval_ratio_r1'] == 0
