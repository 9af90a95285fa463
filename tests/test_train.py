"""End-to-end: short trainings of every setting, exact resume after SIGKILL, DDP equality (slow); the
paired design of every comparison, and what each loss reads (fast)."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from data import load_splits, make_vocab
from metrics.report import TABLE_KEYS
from prior_loss import IGNORE, token_weights
from runs.files import load_checkpoint
from sources.shapes import RELEVANT
from train import target_weights_source, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def as_flags(cfg, **overrides):
    values = {**dataclasses.asdict(cfg), **overrides}
    return [f'--{k}={v}' for k, v in values.items()]


def run_train(flags, nproc=1, wait=True):
    cmd = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
           if nproc > 1 else [sys.executable]) + ['train.py'] + flags
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def train_losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl'))]
    return [(r['step'], r['train_loss']) for r in rows if 'train_loss' in r]


@pytest.mark.slow
@pytest.mark.parametrize('arch, loss', [('h', 'ntp'), ('h', 'prior'), ('u', 'ntp'), ('u', 'prior'),
                                        ('u', 'oracle'), ('u', 'label'), ('u', 'gain'), ('h', 'prior_gain')])
def test_short_train_and_eval(tiny_cfg, arch, loss):
    cfg = dataclasses.replace(tiny_cfg, arch=arch, loss=loss, freeze_lm=arch == 'h')
    results = train(cfg, log=lambda *a: None)
    for key in TABLE_KEYS:
        assert key in results
    assert 0 <= results['attr_acc'] <= 1 and 0 <= results['recall'] <= 1 and results['loss'] > 0
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, 'ckpt.pt'))     # weights_only=True inside
    assert ckpt['step'] == cfg.max_iters and ckpt['config']['loss'] == loss
    assert ckpt['data_position'] == cfg.max_iters * cfg.batch_size
    steps = [s for s, _ in train_losses(cfg.out_dir)]
    assert steps == list(range(1, cfg.max_iters + 1))
    assert os.path.getsize(os.path.join(cfg.out_dir, 'loss.png')) > 0
    if arch == 'h':                                               # the frozen LM stayed the reference
        ref = load_checkpoint(cfg.ref_ckpt)['model']
        assert all(torch.equal(ckpt['model'][f'lm.{k}'], v) for k, v in ref.items())


def test_objective_sends_each_loss_to_its_formula_with_the_configs_alpha(tiny_cfg):
    from prior_loss import gain_loss, ntp_loss, prior_loss
    from train import objective
    torch.manual_seed(0)
    logits, targets, ref = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5)), torch.rand(2, 5)
    targets[1, 3:] = IGNORE
    for loss, want in (('gain', lambda: gain_loss(logits, targets, ref, 'gain', 0.5)),
                       ('prior_gain', lambda: gain_loss(logits, targets, ref, 'prior_gain', 0.5)),
                       ('prior', lambda: prior_loss(logits, targets, ref, 0.5, 0.1))):
        cfg = dataclasses.replace(tiny_cfg, loss=loss, alpha=0.5, weight_floor=0.1)
        assert torch.equal(objective(cfg, logits, targets, ref), want())
    assert torch.equal(objective(dataclasses.replace(tiny_cfg, loss='ntp'), logits, targets), ntp_loss(logits, targets))
    assert not torch.equal(gain_loss(logits, targets, ref, 'prior_gain', 0.5), gain_loss(logits, targets, ref, 'prior_gain'))


@pytest.mark.slow
def test_eval_cli_and_figure(tiny_cfg, tmp_path):
    train(tiny_cfg, log=lambda *a: None)
    ckpt = os.path.join(tiny_cfg.out_dir, 'ckpt.pt')
    fig = tmp_path / 'fig.png'
    out = subprocess.run([sys.executable, 'eval.py', f'--ckpt={ckpt}', '--split=val', '--n_generate=8',
                          f'--figure={fig}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.load(open(os.path.join(tiny_cfg.out_dir, 'eval_val_step6.json')))
    assert metrics['n_captions'] == tiny_cfg.n_val and metrics['n_generated'] == 8
    assert '| attr_acc |' in out.stdout and fig.stat().st_size > 0


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tiny_cfg, tmp_path):
    # dropout > 0: the resumed run must also continue the random stream exactly
    flags = as_flags(tiny_cfg, max_iters=30, ckpt_interval=5, eval_interval=10, final_eval=False, dropout=0.1)
    run_train(flags + [f'--out_dir={tmp_path / "a"}'])             # also builds the shared reference
    out_b = tmp_path / 'b'
    proc = run_train(flags + [f'--out_dir={out_b}'], wait=False)
    ckpt = out_b / 'ckpt.pt'
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(str(ckpt))['step']
    assert killed_at < 30, "the run finished before it could be killed; make it longer"
    run_train(flags + [f'--out_dir={out_b}', '--resume=True'])
    assert train_losses(out_b) == train_losses(tmp_path / 'a')     # exactly, step by step
    final = [load_checkpoint(str(d / 'ckpt.pt'))['model'] for d in (tmp_path / 'a', out_b)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tiny_cfg, tmp_path):
    """One process with one batch of 16 == 2 processes x 2 micro-batches of 4 (captions differ
    in length, so this holds only because every part divides by the step's token count)."""
    flags = as_flags(tiny_cfg, max_iters=4, final_eval=False)
    one, two = tmp_path / 'one', tmp_path / 'two'
    run_train(flags + [f'--out_dir={one}', '--batch_size=16', '--grad_accum=1'])
    log = run_train(flags + [f'--out_dir={two}', '--batch_size=4', '--grad_accum=2'], nproc=2)
    assert 'global batch 16 (4 x 2 accum x 2 proc)' in log
    a, b = train_losses(one), train_losses(two)
    assert [s for s, _ in a] == [s for s, _ in b]
    assert a[0][1] == pytest.approx(b[0][1], rel=1e-6)             # same data, same init
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-4)
    # AdamW and clipping would hide a gradient scaled by a constant (DDP's average over processes not
    # undone): the gradient norm shows it, and the final weights are the same
    norms = [[r['grad_norm'] for r in map(json.loads, open(d / 'log.jsonl')) if 'grad_norm' in r] for d in (one, two)]
    assert len(norms[0]) == 4 and norms[0] == pytest.approx(norms[1], rel=1e-4)
    final = [load_checkpoint(str(d / 'ckpt.pt'))['model'] for d in (one, two)]
    for k in final[0]:
        torch.testing.assert_close(final[1][k], final[0][k], rtol=1e-4, atol=1e-5)
    assert sorted(os.listdir(two)) == ['ckpt.pt', 'log.jsonl', 'loss.png', 'reference.pt']   # rank 0 wrote, once


@pytest.mark.slow
def test_init_lm_gpt2_from_a_local_folder(tiny_cfg, tmp_path):
    """--init_lm=gpt2 --gpt2_model=FOLDER (how offline nodes use it): the LM and the reference
    take the checkpoint's shape and start from its weights; the full GPT-2 vocabulary is used."""
    transformers = pytest.importorskip('transformers')
    from pretrained.gpt2 import converted_state_dict
    from reference import load_reference
    from train import build_model
    hf_cfg = transformers.GPT2Config(n_positions=64, n_embd=24, n_layer=1, n_head=2)   # vocab 50257
    torch.manual_seed(0)
    folder = str(tmp_path / 'tiny-gpt2')
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(folder)
    cfg = dataclasses.replace(tiny_cfg, init_lm='gpt2', gpt2_model=folder, block_size=48, ref_max_iters=2,
                              max_iters=2, eval_interval=2, ckpt_interval=0, final_eval=False,
                              n_train=64, n_val=16, n_test=16)   # a 50257-way softmax is slow on a CPU
    train(cfg, log=lambda *a: None)
    expected = converted_state_dict(transformers.GPT2LMHeadModel.from_pretrained(folder), 48)
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, 'ckpt.pt'))
    assert ckpt['model_args']['n_embd'] == 24 and ckpt['model_args']['vocab_size'] == 50257
    ref, vocab, _ = load_reference(cfg.ref_ckpt, 'cpu')
    assert ref.config.n_layer == 1 and vocab.size == 50257
    model = build_model(cfg, vocab, 'cpu')
    assert all(torch.equal(model.lm.state_dict()[k], v) for k, v in expected.items())


def test_the_label_ceiling_weighs_relevant_tokens_twice(tiny_cfg):
    """Inside every caption: label gives image-relevant tokens twice the weight of the others, the
    oracle gives the others none."""
    data = load_splits(tiny_cfg, names=('val',))['val']
    data.encode(make_vocab(tiny_cfg, data))
    rows = torch.arange(8)
    _, idx, targets, classes = data.batch(rows, 'cpu')
    for loss in ('label', 'oracle'):
        p_r = target_weights_source(dataclasses.replace(tiny_cfg, loss=loss), None, 'cpu')(rows, idx, targets, classes)
        w = token_weights(p_r, targets)
        for b in range(len(rows)):
            relevant, other = w[b][classes[b] == RELEVANT], w[b][(classes[b] != RELEVANT) & (targets[b] != IGNORE)]
            assert len(relevant) and len(other)
            expected = torch.zeros_like(other) if loss == 'oracle' else relevant[0] / 2 * torch.ones_like(other)
            torch.testing.assert_close(other, expected)
            assert torch.allclose(relevant, relevant[0].expand_as(relevant))


def test_ntp_and_prior_at_one_seed_start_from_the_same_weights_and_see_the_same_batches(tiny_cfg, tmp_path):
    """The paired design (config.py: same seed -> same init and data order for any loss): the first
    step's logits are equal (same weights, same rows, same dropout masks) and every step has the same rows."""
    seen = {}

    def recording(loss):
        def loss_fn(cfg, logits, targets, ref_probs, n_tokens):
            seen.setdefault(loss, []).append((logits.detach().clone(), targets.clone()))
            return objective(cfg, logits, targets, ref_probs, n_tokens)
        return loss_fn
    from prior_loss import objective
    for loss in ('ntp', 'prior'):
        cfg = dataclasses.replace(tiny_cfg, loss=loss, max_iters=3, dropout=0.1, final_eval=False,
                                  out_dir=str(tmp_path / loss))
        train(cfg, log=lambda *a: None, loss_fn=recording(loss))
    (first_ntp, _), (first_prior, _) = seen['ntp'][0], seen['prior'][0]
    assert torch.equal(first_ntp, first_prior)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(seen['ntp'], seen['prior'], strict=True))
    assert not torch.equal(seen['ntp'][1][0], seen['prior'][1][0])      # then the losses part ways
