import os

import pytest

from config import Config, load_config, parse_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flags_are_typed():
    cfg = load_config(['--max_iters=7', '--alpha=0', '--freeze_lm=True', '--arch=h', '--compile=false'])
    assert cfg.max_iters == 7 and cfg.alpha == 0.0 and isinstance(cfg.alpha, float)
    assert cfg.freeze_lm is True and cfg.compile is False and cfg.arch == 'h'


def test_false_is_false():                         # nanoVLM's type=bool bug: bool('False') is True
    assert load_config(['--freeze_lm=False']).freeze_lm is False


@pytest.mark.parametrize('arg, error', [('--max_iters=3.5', TypeError), ('--max_iters=many', ValueError),
                                        ('--freeze_lm=maybe', ValueError), ('--no_such_key=1', KeyError),
                                        ('--arch=cnn', ValueError), ('--loss', ValueError)])
def test_bad_flags_fail_loudly(arg, error):
    with pytest.raises(error):
        load_config([arg])


def test_oracle_needs_token_classes():
    with pytest.raises(ValueError, match='oracle'):
        load_config(['--loss=oracle', '--dataset=/data/flickr8k'])


def test_config_file_then_flags(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("arch = 'h'\nmax_iters = 9\n")
    cfg = load_config([str(f), '--max_iters=11'])
    assert cfg.arch == 'h' and cfg.max_iters == 11 and cfg.loss == Config().loss
    f.write_text("max_iter = 9\n")
    with pytest.raises(KeyError, match='max_iter'):
        load_config([str(f)])


def test_presets_load():
    h = load_config([os.path.join(ROOT, 'configs', 'shapes_h.py')])
    assert h.arch == 'h' and h.init_vision == 'clip' and h.freeze_vision is True and h.freeze_lm is False
    u = load_config([os.path.join(ROOT, 'configs', 'shapes_u.py')])
    assert u.arch == 'u' and u.freeze_lm is False
    for name in ('flickr_cpu.py', 'flickr_gpu.py'):
        cfg = load_config([os.path.join(ROOT, 'configs', name)])
        assert cfg.dataset.endswith('flickr8k') and cfg.image_size % cfg.patch_size == 0
    assert load_config([os.path.join(ROOT, 'configs', 'flickr_gpu.py')]).init_lm == 'gpt2'


def test_parse_flags():
    assert parse_flags(['--n=3'], {'n': 1, 's': 'a'}) == {'n': 3, 's': 'a'}
    with pytest.raises(KeyError):
        parse_flags(['--m=3'], {'n': 1})
