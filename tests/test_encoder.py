"""The H-LVLM's encoders: the offline CLIP-style ViT, torchvision models with their weights loaded
through torchvision's own path, the cached features of a frozen encoder, and captioning metrics."""
import dataclasses
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from data import load_splits, make_vocab
import encoder
from metrics.caption_scores import bleu, cider_d, words
from model import LVLM, ViT, gpt_config
from pretrained.features import use_cached_features
from pretrained.vision import TorchvisionEncoder, pretrained_vision
from runs.caches import cache_root
from runs.progress import train_flops
import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def shapes_h(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                  # nothing is written where the command runs
    cfg = dataclasses.replace(tiny_cfg, arch='h', init_vision='clip', freeze_vision=True, image_size=24,
                              enc_max_iters=30, enc_batch_size=64, enc_learning_rate=3e-3)
    splits = load_splits(cfg)
    vocab = make_vocab(cfg, splits['train'])
    for d in splits.values():
        d.encode(vocab)
    return cfg, splits, vocab


def test_clip_pretraining_learns_and_is_cached(shapes_h):
    cfg, splits, vocab = shapes_h
    logs = []
    path = encoder.ensure_encoder(cfg, splits['train'], vocab, 'cpu', log=logs.append, val=splits['val'])
    losses = [float(line.split('loss ')[1].split()[0]) for line in logs if 'contrastive loss' in line]
    assert losses[-1] < losses[0]                                   # the contrastive loss falls
    assert os.path.isfile(path) and path.startswith(os.path.join(cache_root(cfg), 'encoder'))
    again = []
    assert encoder.ensure_encoder(cfg, splits['train'], vocab, 'cpu', log=again.append) == path and not again
    vit = ViT(cfg.image_size, cfg.patch_size, cfg.vit_layer, cfg.n_head, cfg.vit_embd, 0.0)
    encoder.load_encoder_into(vit, path)                            # the LVLM's ViT takes its weights
    other = dataclasses.replace(cfg, enc_max_iters=31)             # another recipe, another encoder
    assert encoder.default_vision_ckpt(other, splits['train'], vocab) != path


def test_word_targets_are_each_images_share_of_captions_using_each_word(shapes_h):
    _, splits, _ = shapes_h
    train = splits['train']
    targets, words = encoder.word_targets(train)
    n_images = len(train.image_index.unique())
    assert 0 < len(words) <= encoder.N_WORDS and targets.shape == (len(train.images), len(words))
    for img in train.image_index.unique()[:5].tolist():            # recount by hand
        rows = (train.image_index == img).nonzero().flatten().tolist()
        for col, word in enumerate(words.tolist()):
            uses = sum(word in train.targets[r].tolist() for r in rows)
            assert targets[img, col].item() == pytest.approx(uses / len(rows))
    images_with = (targets[train.image_index.unique()] > 0).sum(0)
    assert (images_with <= n_images / 2).all() and (images_with[:-1] >= images_with[1:]).all()   # commonest first
    again, same = encoder.word_targets(splits['val'], words)       # val scored on train's words
    assert torch.equal(same, words) and again.shape[1] == len(words)


def test_random_crop_flip_keeps_the_image_at_full_scale():
    images = torch.rand(6, 3, 8, 8)
    out = encoder.random_crop_flip(images, torch.Generator().manual_seed(0), min_scale=1.0)
    for a, b in zip(images, out):                                   # the image itself, or its mirror
        assert torch.allclose(a, b) or torch.allclose(a.flip(-1), b)
    one = encoder.random_crop_flip(images, torch.Generator().manual_seed(1))
    assert one.shape == images.shape and not torch.allclose(one, images)
    assert torch.equal(one, encoder.random_crop_flip(images, torch.Generator().manual_seed(1)))   # seeded


def test_word_pretraining_learns_and_is_cached_apart_from_clip(shapes_h):
    cfg, _, _ = shapes_h
    cfg = dataclasses.replace(cfg, init_vision='words', n_train=1024, enc_max_iters=300, enc_batch_size=64)
    splits = load_splits(cfg, names=('train', 'val'))
    vocab = make_vocab(cfg, splits['train'])
    for d in splits.values():
        d.encode(vocab)
    logs = []
    path = encoder.ensure_encoder(cfg, splits['train'], vocab, 'cpu', log=logs.append, val=splits['val'])
    losses = [float(line.split('loss ')[1].split()[0]) for line in logs if 'word loss' in line and 'iter' in line]
    assert losses[-1] < losses[0]
    report = [line for line in logs if 'val word loss' in line][0]
    val_loss, alone = float(report.split('loss ')[1].split()[0]), float(report.rstrip(')').split()[-1])
    assert val_loss < alone                                         # it sees shapes and colours in val images
    assert path != encoder.default_vision_ckpt(dataclasses.replace(cfg, init_vision='clip'), splits['train'], vocab)
    vit = ViT(cfg.image_size, cfg.patch_size, cfg.vit_layer, cfg.n_head, cfg.vit_embd, 0.0)
    encoder.load_encoder_into(vit, path)


def test_cached_features_stand_in_for_pixels(shapes_h):
    cfg, splits, vocab = shapes_h
    torch.manual_seed(0)
    model = LVLM(cfg, gpt_config(cfg, vocab)).eval()
    rows = torch.arange(8)
    pixels = splits['test'].batch(rows, 'cpu')[0]
    with torch.no_grad():
        expected_features, expected = model.vision(pixels), model(pixels, splits['test'].idx[rows])
    logs = []
    use_cached_features(splits, model.vision, 'cpu', cache_root(cfg), log=logs.append)
    assert len(logs) == 3                                           # one cache per split, computed once
    features, idx, _, _ = splits['test'].batch(rows, 'cpu')
    assert features.shape == (8, model.n_prefix, cfg.vit_embd)
    # float16 storage rounds each feature to 2^-11 of itself (measured: 4.8e-4 at most, and 5.6e-6 on
    # the logits, whose whole image effect is ~2e-2); a 10% scale is 0.1 and 2.8e-3, another image 2e-2
    torch.testing.assert_close(features, expected_features, rtol=1e-3, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(features, idx), expected, rtol=0, atol=2e-5)
    assert train_flops(model, 10, with_vision=False) < train_flops(model, 10)
    fresh = load_splits(cfg, names=('test',))
    fresh['test'].encode(vocab)
    logs = []
    use_cached_features(fresh, model.vision, 'cpu', cache_root(cfg), log=logs.append)
    assert not logs                                                 # read back, not recomputed
    torch.nn.init.zeros_(model.vision.pos)                          # other weights: another cache
    use_cached_features(load_splits(cfg, names=('test',)), model.vision, 'cpu', cache_root(cfg),
                                log=logs.append)
    assert len(logs) == 1


def test_flipped_view_adds_each_caption_with_the_mirrored_photos_features(shapes_h):
    cfg, splits, vocab = shapes_h
    torch.manual_seed(0)
    vit = ViT(cfg.image_size, cfg.patch_size, cfg.vit_layer, cfg.n_head, cfg.vit_embd, 0.0).eval()
    train, n = splits['train'], len(splits['train'])
    rows = torch.arange(6)
    pixels = train.batch(rows, 'cpu')[0]
    logs = []
    use_cached_features({'train': load_splits(cfg, names=('train',))['train']}, vit, 'cpu', cache_root(cfg),
                        log=logs.append)                        # a run without the flipped view first
    use_cached_features(splits, vit, 'cpu', cache_root(cfg), log=logs.append, flip=('train',))
    assert sum('train features (flipped)' in line for line in logs) == 1    # the as-is view read back, the
    assert sum('train features' in line for line in logs) == 2              # mirrored one computed once
    doubled = splits['train']
    assert len(doubled) == 2 * n and any(f'{2 * n} rows' in line for line in logs)
    as_is, mirrored = doubled.batch(rows, 'cpu'), doubled.batch(rows + n, 'cpu')
    with torch.no_grad():
        torch.testing.assert_close(as_is[0], vit(pixels), rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(mirrored[0], vit(pixels.flip(-1)), rtol=1e-3, atol=1e-6)
    assert not torch.allclose(as_is[0], mirrored[0], atol=1e-3)
    for a, b in zip(as_is[1:], mirrored[1:]):                   # the same caption rows
        assert torch.equal(a, b)
    assert len(splits['val']) < n and len(splits['val'].images) == len(splits['val'].image_index.unique())


def test_a_run_with_the_flipped_view_trains_each_caption_with_both(shapes_h, monkeypatch):
    import train as training
    cfg, _, _ = shapes_h
    seen = []
    real_step = training.train_step

    def spy(cfg, model, raw_model, optimizer, data, *args, **kwargs):
        seen.append(len(data))
        return real_step(cfg, model, raw_model, optimizer, data, *args, **kwargs)
    monkeypatch.setattr(training, 'train_step', spy)
    flipped = training.train(dataclasses.replace(cfg, flip_view=True, loss='prior', max_iters=4, final_eval=False),
                             log=lambda *a: None)
    assert flipped is None and set(seen) == {2 * cfg.n_train}    # PRIOR's weights read the doubled rows too


def test_eval_reads_the_frozen_encoders_features_from_the_runs_cache(shapes_h, tmp_path, capsys, monkeypatch):
    import eval as evaluation
    from train import train
    cfg, _, _ = shapes_h
    train(cfg, log=lambda *a: None)                               # its final test eval reads cached features
    features = sorted(p.parent.name for p in (tmp_path / 'cache' / 'features').glob('*/features.npy'))
    monkeypatch.setattr(ViT, 'forward', lambda *a: pytest.fail('eval ran the frozen encoder again'))
    monkeypatch.chdir(tmp_path / 'cache')                         # the cache is found from any directory
    evaluation.main([f'--ckpt={cfg.out_dir}/ckpt.pt', '--split=test', '--n_generate=8', f'--out={tmp_path / "e.json"}'])
    assert 'encoder:' not in capsys.readouterr().out               # read back, nothing computed
    assert sorted(p.parent.name for p in (tmp_path / 'cache' / 'features').glob('*/features.npy')) == features
    mine, trains = json.loads((tmp_path / 'e.json').read_text()), json.loads((tmp_path / 'run' / 'eval_test.json').read_text())
    for key in ('loss', 'loss_relevant', 'attr_acc'):              # from the same features as train's own eval
        assert mine[key] == trains[key]


def test_torchvision_encoder_loads_weights_through_torchvision(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.get_model('resnet18', weights=None).eval()
    path = tmp_path / 'resnet18.pt'
    torch.save(reference.state_dict(), path)
    cfg = dataclasses.replace(__import__('config').Config(), arch='h', vision='resnet18', init_vision='pretrained',
                              vision_ckpt=str(path), image_size=64)
    enc = pretrained_vision(cfg).eval()
    assert (enc.n_tokens, enc.width) == (4, 512) and enc.forward_flops > 1e8
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    trunk = torch.nn.Sequential(*list(reference.children())[:-2])
    normalised = ((images + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(enc(images), trunk(normalised).flatten(2).transpose(1, 2))
    vit = TorchvisionEncoder('vit_b_16', 224)                       # ViT-B/16: 14 x 14 patch tokens
    assert (vit.n_tokens, vit.width) == (196, 768)


@pytest.mark.slow
def test_train_with_a_frozen_torchvision_encoder(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from train import train
    path = tmp_path / 'resnet18.pt'
    torch.save(torchvision.models.get_model('resnet18', weights=None).state_dict(), path)
    cfg = dataclasses.replace(tiny_cfg, arch='h', vision='resnet18', init_vision='pretrained', vision_ckpt=str(path),
                              freeze_vision=True, image_size=64, loss='prior')
    results = train(cfg, log=lambda *a: None)
    assert 0 <= results['attr_acc'] <= 1
    ckpt = torch.load(os.path.join(cfg.out_dir, 'ckpt.pt'), weights_only=True)
    frozen = torchvision.models.get_model('resnet18', weights=None)
    frozen.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(ckpt['model']['vision.trunk.0.weight'], frozen.conv1.weight)   # stayed frozen


@pytest.mark.slow
def test_sample_captions_images_and_folders(tiny_cfg, tmp_path):
    from PIL import Image
    from train import train
    cfg = dataclasses.replace(tiny_cfg, final_eval=False)
    train(cfg, log=lambda *a: None)
    folder = tmp_path / 'imgs'
    folder.mkdir()
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)).save(folder / f'{i}.png')
    (folder / 'notes.txt').write_text('not an image')
    ckpt = os.path.join(cfg.out_dir, 'ckpt.pt')
    run = lambda *args: subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), f'--ckpt={ckpt}', *args],
                                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = run('imgs', '--temperature=0.8', '--top_k=5', '--num_samples=2', '--weights=one red circle.')
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sum(line.startswith('imgs/0.png [') for line in lines) == 2 and not any('notes' in x for x in lines)
    assert "' red'" in out.stdout and 'weight' in out.stdout
    missing = run('nothing.png')
    assert missing.returncode != 0 and 'nothing.png' in missing.stderr and 'Traceback' not in missing.stderr


def test_caption_metrics_match_the_coco_evaluation():
    pytest.importorskip('pycocoevalcap')
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    rng = random.Random(0)
    vocab = 'a dog cat man woman runs sits on the grass red ball street two people bike water jumps in'.split()
    caption = lambda: ' '.join(rng.choice(vocab) for _ in range(rng.randint(3, 12)))
    refs = {i: [caption() for _ in range(rng.randint(1, 5))] for i in range(40)}
    hyps = {i: [caption()] for i in refs}
    expected_bleu = Bleu(4).compute_score(refs, hyps, verbose=0)[0]
    expected_cider = Cider().compute_score(refs, hyps)[0]
    ours_h = [words(hyps[i][0]) for i in refs]
    ours_r = [[words(r) for r in refs[i]] for i in refs]
    assert bleu(ours_h, ours_r) == pytest.approx(expected_bleu, rel=1e-9)          # BLEU-1..4
    assert cider_d(ours_h, ours_r) == pytest.approx(expected_cider, rel=1e-9)
    short = [h[:2] for h in ours_h]                                                # the brevity penalty bites
    expected_short = Bleu(4).compute_score(refs, {i: [' '.join(h)] for i, h in zip(refs, short)}, verbose=0)[0]
    assert bleu(short, ours_r) == pytest.approx(expected_short, rel=1e-9)
    b1, b2, _, b4 = bleu([['a', 'dog']], [[['a', 'dog']]])
    assert b1 == pytest.approx(1.0) and b2 == pytest.approx(1.0) and b4 < 0.01     # no 3-/4-grams: ~0, COCO's smoothing
    b1, b2, _, _ = bleu([['a', 'dog']], [[['a', 'dog', 'runs', 'on', 'grass']]])   # known answer: brevity exp(1 - 5/2)
    assert b1 == pytest.approx(math.exp(-1.5)) and b2 == pytest.approx(math.exp(-1.5))
    b1, b2, _, _ = bleu([['the', 'the', 'dog']], [[['the', 'dog', 'x']]])
    assert b1 == pytest.approx(2 / 3) and b2 == pytest.approx(math.sqrt(2 / 3 * 1 / 2))   # 'the' clipped at 1
    perfect = [words('a man rides a red bike on the street')]
    assert bleu(perfect, [perfect]) == pytest.approx([1.0] * 4)


def test_sample_takes_from_a_folder_only_what_the_decoder_reads(tmp_path):
    for name in ('b.png', 'a.JPG', 'c.bmp', 'notes.txt'):
        (tmp_path / name).write_bytes(b'x')
    assert [os.path.basename(p) for p in sample.image_paths([str(tmp_path)])] == ['a.JPG', 'b.png']


def test_sample_greedy_caption_and_weights_are_evals(tiny_cfg, tmp_path, capsys):
    """sample.py on a photo of a test image says what eval's greedy captions say, and its --weights table
    holds eval's P_r, PRIOR weights (with the run's alpha and floor) and LVLM losses, to its printed digits."""
    from PIL import Image
    import eval as evaluation
    from config import as_dict
    from data import CaptionData
    from model import GPT
    from reference import save_reference
    from runs.files import save_checkpoint
    from runs.reference_files import reference_file
    cfg = dataclasses.replace(tiny_cfg, alpha=2.0, weight_floor=0.1)
    splits = load_splits(cfg, names=('train', 'test'))
    vocab = make_vocab(cfg, splits['train'])
    for d in splits.values():
        d.encode(vocab)
    torch.manual_seed(0)
    model = LVLM(cfg, gpt_config(cfg, vocab)).eval()
    ckpt = str(tmp_path / 'ckpt.pt')
    save_checkpoint({'model': model.state_dict(), 'model_args': vars(model.lm.config), 'vocab': vocab.state(),
                     'config': as_dict(cfg), 'step': 0}, ckpt)
    ref_path = str(tmp_path / 'ref.pt')
    save_reference(GPT(gpt_config(cfg, vocab)), vocab, cfg, splits['train'], ref_path)
    image = splits['test'].images[0]
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / 'photo.png')
    text = 'a photo of one red circle in the north.'
    sample.main([f'--ckpt={ckpt}', str(tmp_path / 'photo.png'), f'--weights={text}', f'--ref_ckpt={ref_path}'])
    out = capsys.readouterr().out.splitlines()
    greedy = evaluation.generate_captions(model, splits['test'], vocab, [0], 'cpu')[0]
    assert out[0] == f"{tmp_path / 'photo.png'}: {greedy}"
    tokens = sample.get_tokenizer().encode_ordinary(text)
    k = len(tokens) + 1                                                       # and the closing EOT
    data = CaptionData(image[None], torch.tensor([0]), [text], [tokens], [np.zeros(k)], [np.full(k - 1, -1)],
                       cfg.block_size).encode(vocab)
    reference = reference_file(ref_path, vocab.gpt2_ids)
    expected = zip(evaluation.reference_probs(reference, data, 'cpu')[0, :k].tolist(),
                   evaluation.reference_weights(reference, data, 'cpu', cfg.alpha, cfg.weight_floor)[0, :k].tolist(),
                   evaluation.caption_nlls(model, data, torch.arange(1), 'cpu')[0, :k].tolist())
    printed = [line.split('<-')[0].split()[-3:] for line in out[-k:]]
    for (p_r, weight, nll), numbers in zip(expected, printed, strict=True):
        assert [float(x) for x in numbers] == [pytest.approx(p_r, abs=6e-4), pytest.approx(weight, abs=6e-3),
                                               pytest.approx(nll, abs=6e-4)]
    assert sum(float(n[1]) for n in printed) == pytest.approx(k, abs=0.01 * k)      # weights of mean 1
