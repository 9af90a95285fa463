"""Early stopping on a val metric (runs/early_stop.py, train.py's `patience` and `stop_on`): where a
run stops, what best.pt holds, what the test evaluation reads, and that a resumed run stops where the
uninterrupted one did, with the same weights."""
import dataclasses
import json
import os

import pytest
import torch

import eval as evaluation
import train as train_module
from runs.cli import parse_flags
from runs.early_stop import EarlyStop
from runs.errors import ConfigError
from runs.files import load_checkpoint


def test_the_count_restarts_at_each_improvement_and_nan_never_improves():
    e = EarlyStop(2)
    seen = [e.improved(s, loss) for s, loss in ((1, 3.0), (2, 2.0), (3, 2.5), (4, 1.5), (5, float('nan')))]
    assert seen == [True, True, False, True, False]
    assert (e.best_step, e.best, e.evals_since, e.done) == (4, 1.5, 1, False)
    assert not e.improved(6, 1.5) and e.done                 # equal is no improvement: the second in a row
    assert EarlyStop(2, state=e.state()).state() == e.state() and EarlyStop(2, state=e.state()).done
    assert not EarlyStop(0, state=e.state()).done            # patience 0: never stops


def test_an_accuracy_improves_upwards():
    e = EarlyStop(2, 'attr_acc')
    assert [e.improved(s, acc) for s, acc in ((1, 0.2), (2, 0.5), (3, 0.4), (4, 0.5), (5, float('nan')))] == \
        [True, True, False, False, False]
    assert (e.best_step, e.best, e.done) == (2, 0.5, True)


# The val loss each evaluation reports (by step): best at 4, then at 8, then two worse ones.
SCRIPT = {2: 3.0, 4: 2.0, 6: 2.4, 8: 1.9, 10: 2.2, 12: 2.3, 14: 2.5, 16: 2.6, 18: 2.7, 20: 2.8}
# And its attr_acc, which peaks elsewhere (at 6): with stop_on='attr_acc' the run follows this one.
ACC_SCRIPT = {2: 0.3, 4: 0.5, 6: 0.7, 8: 0.6, 10: 0.7, 12: 0.65, 14: 0.9}


@pytest.fixture
def scripted(monkeypatch):
    real = train_module.validate

    def validate(cfg, model, val_data, vocab, device, ctx, step, record, log, reference=None):
        m = real(cfg, model, val_data, vocab, device, ctx, step, record, log, reference)
        return {**m, 'loss': SCRIPT.get(step, m['loss']), 'attr_acc': ACC_SCRIPT.get(step, m['attr_acc'])}
    monkeypatch.setattr(train_module, 'validate', validate)


def weights(path):
    return load_checkpoint(str(path))['model']


def test_a_run_stops_after_patience_evaluations_and_is_tested_on_its_best_weights(tiny_cfg, scripted):
    cfg = dataclasses.replace(tiny_cfg, max_iters=20, eval_interval=2, ckpt_interval=4, patience=2)
    results = train_module.train(cfg, log=lambda *a, **k: None)
    out = tiny_cfg.out_dir
    assert load_checkpoint(f'{out}/ckpt.pt')['step'] == 12 and load_checkpoint(f'{out}/best.pt')['step'] == 8
    assert results['best_step'] == 8
    val_steps = [r['step'] for r in map(json.loads, open(f'{out}/log.jsonl')) if 'val_loss' in r]
    assert val_steps[-1] == 12                                # nothing trained after the stop
    best = evaluation.evaluate_checkpoint(parse_flags([f'--ckpt={out}/best.pt', '--device=cpu'], evaluation.FLAGS),
                                          torch.device('cpu'), log=lambda *a: None).metrics
    last = evaluation.evaluate_checkpoint(parse_flags([f'--ckpt={out}/ckpt.pt', '--device=cpu'], evaluation.FLAGS),
                                          torch.device('cpu'), log=lambda *a: None).metrics
    assert results['loss'] == pytest.approx(best['loss'], abs=1e-6) and results['loss'] != pytest.approx(last['loss'])


def test_a_run_can_stop_on_val_attr_acc_instead(tiny_cfg, scripted):
    cfg = dataclasses.replace(tiny_cfg, max_iters=20, eval_interval=2, ckpt_interval=4, patience=2, stop_on='attr_acc',
                              final_eval=False)
    train_module.train(cfg, log=lambda *a, **k: None)
    out = tiny_cfg.out_dir
    assert load_checkpoint(f'{out}/ckpt.pt')['step'] == 10 and load_checkpoint(f'{out}/best.pt')['step'] == 6
    assert load_checkpoint(f'{out}/ckpt.pt')['early_stop']['metric'] == 'attr_acc'


def test_a_val_split_without_every_attribute_cannot_stop_on_attr_acc(tiny_cfg, monkeypatch):
    real = evaluation.teacher_forced_metrics
    monkeypatch.setattr(evaluation, 'teacher_forced_metrics',
                        lambda *a, **k: {**real(*a, **k), 'attr_acc': float('nan')})
    cfg = dataclasses.replace(tiny_cfg, max_iters=4, eval_interval=2, patience=2, stop_on='attr_acc')
    with pytest.raises(ConfigError, match="stop_on 'attr_acc': val has nothing to score"):
        train_module.train(cfg, log=lambda *a, **k: None)
    assert not any(os.path.exists(os.path.join(cfg.out_dir, f)) for f in ('ckpt.pt', 'best.pt'))   # before training


def test_a_photo_run_can_stop_on_val_retrieval_by_likelihood_ratio(tiny_cfg, tmp_path):
    """The headline metric of real photos, measured on val at every evaluation with the run's reference;
    the run stops where its own logged values say."""
    from test_captions import make_folder
    cfg = dataclasses.replace(tiny_cfg, dataset=str(make_folder(tmp_path, n_images=60)), image_size=16,
                              val_frac=0.25, test_frac=0.25, block_size=24, max_iters=30, eval_interval=2,
                              patience=2, stop_on='retrieval_ratio_r1', final_eval=False)
    train_module.train(cfg, log=lambda *a, **k: None)
    rows = [json.loads(line) for line in open(os.path.join(cfg.out_dir, 'log.jsonl'))]
    values = [(r['step'], r['val_retrieval_ratio_r1']) for r in rows if 'val_loss' in r and r['step'] > 0]
    assert all(0 <= v <= 1 for _, v in values)
    stop, best = expected_stop(values, 2, 'retrieval_ratio_r1')
    assert load_checkpoint(os.path.join(cfg.out_dir, 'ckpt.pt'))['step'] == (stop or 30)
    assert load_checkpoint(os.path.join(cfg.out_dir, 'best.pt'))['step'] == best


def test_a_resumed_run_stops_where_the_uninterrupted_one_did(tiny_cfg, tmp_path, scripted):
    whole = dataclasses.replace(tiny_cfg, max_iters=20, eval_interval=2, ckpt_interval=4, patience=2,
                                final_eval=False, dropout=0.1, out_dir=str(tmp_path / 'whole'))
    train_module.train(whole, log=lambda *a, **k: None)
    parts = dataclasses.replace(whole, out_dir=str(tmp_path / 'parts'))
    train_module.train(dataclasses.replace(parts, max_iters=8, lr_decay_iters=20), log=lambda *a, **k: None)
    train_module.train(dataclasses.replace(parts, lr_decay_iters=20, resume=True), log=lambda *a, **k: None)
    for name in ('ckpt.pt', 'best.pt'):
        a, b = weights(tmp_path / 'whole' / name), weights(tmp_path / 'parts' / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert load_checkpoint(str(tmp_path / 'parts' / 'ckpt.pt'))['step'] == 12
    train_module.train(dataclasses.replace(parts, lr_decay_iters=20, resume=True), log=lambda *a, **k: None)
    assert load_checkpoint(str(tmp_path / 'parts' / 'ckpt.pt'))['step'] == 12      # a stopped run trains no more



def expected_stop(val_values, patience, metric='loss'):
    """(stop step, best step) by the rule, from a run's own logged (step, val value) after step 0."""
    rule = EarlyStop(patience, metric)
    for step, value in val_values:
        rule.improved(step, value)
        if rule.done:
            return step, rule.best_step
    return None, rule.best_step


@pytest.mark.slow
def test_under_torchrun_every_process_stops_at_the_masters_early_stop(tiny_cfg, tmp_path):
    """Only the master evaluates; it tells the other process to stop. The run ends (no process
    hangs) at the step its own val losses call for, and nothing trains past it. The high learning
    rate makes val loss worsen at once, so the stop comes early."""
    from test_train import as_flags, run_train
    out = tmp_path / 'two'
    run_train(as_flags(tiny_cfg, max_iters=16, eval_interval=1, ckpt_interval=0, final_eval=False, patience=1,
                       learning_rate=0.1, batch_size=4, grad_accum=2, out_dir=str(out)), nproc=2)
    rows = [json.loads(line) for line in open(out / 'log.jsonl')]
    stop, best = expected_stop([(r['step'], r['val_loss']) for r in rows if 'val_loss' in r and r['step'] > 0], 1)
    assert stop is not None and stop < 16
    assert load_checkpoint(str(out / 'ckpt.pt'))['step'] == stop and load_checkpoint(str(out / 'best.pt'))['step'] == best
    assert [r['step'] for r in rows if 'train_loss' in r] == list(range(1, stop + 1))    # nothing past the stop
