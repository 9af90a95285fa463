import os

import pytest

from config import Config, load_config
from runs.cli import parse_flags
from runs.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flags_are_typed():
    cfg = load_config(['--max_iters=7', '--alpha=0', '--freeze_lm=True', '--arch=h', '--compile=false'])
    assert cfg.max_iters == 7 and cfg.alpha == 0.0 and isinstance(cfg.alpha, float)
    assert cfg.freeze_lm is True and cfg.compile is False and cfg.arch == 'h'


def test_false_is_false():                         # nanoVLM's type=bool bug: bool('False') is True
    assert load_config(['--freeze_lm=False']).freeze_lm is False


@pytest.mark.parametrize('arg, named', [('--max_iters=3.5', 'max_iters'), ('--max_iters=many', 'max_iters'),
                                        ('--freeze_lm=maybe', 'maybe'), ('--no_such_key=1', 'no_such_key'),
                                        ('--arch=cnn', 'arch'), ('--loss', '--loss'), ('-x', '-x')])
def test_bad_flags_fail_loudly_naming_the_setting(arg, named):
    with pytest.raises(ConfigError, match=named) as e:
        load_config([arg])
    assert '\n' not in str(e.value)


def test_unknown_key_names_the_nearest():
    with pytest.raises(ConfigError, match="did you mean --max_iters"):
        load_config(['--max_iter=5'])
    with pytest.raises(ConfigError, match="--learning_rate"):
        load_config(['--learningrate=1e-3'])
    with pytest.raises(ConfigError, match="see --help"):
        load_config(['--zzzz=1'])


def test_oracle_needs_token_classes():
    with pytest.raises(ValueError, match='oracle'):
        load_config(['--loss=oracle', '--dataset=/data/flickr8k'])
    for flag in ('--alpha=2', '--weight_floor=0.2'):             # the ceilings' weights are fixed: 2:1 and 1:0
        with pytest.raises(ValueError, match='alpha and weight_floor do not apply'):
            load_config(['--loss=label', flag])


def test_flip_view_needs_cached_features():
    assert load_config(['--arch=h', '--init_vision=clip', '--freeze_vision=True', '--flip_view=True']).flip_view
    for flags in (['--arch=u'], ['--arch=h', '--init_vision=clip'], ['--arch=h', '--init_vision=clip',
                  '--freeze_vision=True', '--cache_features=False']):
        with pytest.raises(ValueError, match='flip_view .* needs cached features'):
            load_config([*flags, '--flip_view=True'])


def test_config_file_then_flags(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("arch = 'h'\nmax_iters = 9\n")
    cfg = load_config([str(f), '--max_iters=11'])
    assert cfg.arch == 'h' and cfg.max_iters == 11 and cfg.loss == Config().loss
    f.write_text("max_iter = 9\n")
    with pytest.raises(ConfigError, match=f"'max_iter' \\(from {f}\\): did you mean --max_iters"):
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
    with pytest.raises(ConfigError, match='did you mean --n'):
        parse_flags(['--nn=3'], {'n': 1})
