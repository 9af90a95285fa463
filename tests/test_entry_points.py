"""Every entry point as careful as train.py (issue 33): sample.py decodes a user's images the way
training does, and sample.py's and eval.py's flags are typed and range-checked by the one mechanism
that checks train.py's settings (runs/cli.py), each mistake one line."""
import os
import subprocess
import sys

import pytest

import eval as evaluation
import sample
from runs.cli import Flag, parse_flags
from runs.errors import ConfigError
from sources.images import BadData, checked_images
from test_robustness import damaged_png, png_bytes, png_chunk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bomb_png(width=20000, height=20000):
    """A small PNG file whose header declares width x height pixels."""
    b = png_bytes()
    ihdr = b.index(b'IHDR') - 4
    header = width.to_bytes(4, 'big') + height.to_bytes(4, 'big') + b[ihdr + 16:ihdr + 21]
    return b[:ihdr] + png_chunk(b'IHDR', header) + b[ihdr + 25:]


def corrupt_png_body():
    """A PNG with right CRCs whose compressed image data is noise."""
    b = png_bytes()
    start = b.index(b'IDAT') - 4
    n = int.from_bytes(b[start:start + 4], 'big')
    return b[:start] + png_chunk(b'IDAT', b[start + 8:start + 10] + bytes(range(256)) * (n // 256)) + b[start + 12 + n:]


# ---- flags: typed, range-checked, did-you-mean, one mechanism ----

@pytest.mark.parametrize('tool, arg, says', [
    (sample, '--top_k=-1', "--top_k must be >= 0"), (sample, '--temperature=-1', "--temperature must be >= 0"),
    (sample, '--num_samples=0', "--num_samples must be >= 1"),
    (sample, '--max_new_tokens=-5', "--max_new_tokens must be >= 0"),
    (sample, '--temperature=nan', "--temperature must be a finite number"),
    (sample, '--seed=-3', "--seed must be >= 0"),
    (sample, '--top_k=2.5', "--top_k must be int"), (sample, '--temprature=1', "did you mean --temperature"),
    (evaluation, '--n_generate=-1', "--n_generate must be >= 0"), (evaluation, '--beam=-2', "--beam must be >= 0"),
    (sample, '--beam=2.5', "--beam must be int"), (evaluation, '--split=dev', "--split must be one of"),
    (evaluation, '--skip_bad=perhaps', "expected True or False"),
    (evaluation, '--n_genrate=3', "did you mean --n_generate")])
def test_sample_and_eval_flags_are_checked_before_any_file_is_read(tool, arg, says, tmp_path):
    with pytest.raises(ConfigError, match=says) as e:
        tool.main([f'--ckpt={tmp_path}/none.pt', arg])             # refused before the missing checkpoint is named
    assert '\n' not in str(e.value)


def test_one_declaration_gives_default_type_range_and_help():
    flags = {'k': Flag(3, low=1, high=9, help='how many'), 'how': Flag('a', choices=('a', 'b')), 'x': 0.5}
    assert parse_flags([], flags) == {'k': 3, 'how': 'a', 'x': 0.5}
    assert parse_flags(['--k=9', '--how=b', '--x=2'], flags) == {'k': 9, 'how': 'b', 'x': 2.0}
    for arg, says in (('--k=10', r'--k must be in \[1, 9\]'), ('--how=c', 'one of'), ('--x=inf', 'finite')):
        with pytest.raises(ConfigError, match=says):
            parse_flags([arg], flags)
    assert '--k=3' in evaluation.flags_help(flags) and 'how many (>= 1, <= 9)' in evaluation.flags_help(flags)


@pytest.mark.parametrize('flag', ['--alpha=nan', '--alpha=inf', '--learning_rate=-inf', '--dropout=nan'])
def test_a_non_finite_setting_says_it_must_be_a_finite_number(flag):
    from config import load_config
    with pytest.raises(ConfigError, match=f"'{flag[2:].split('=')[0]}' must be a finite number") as e:
        load_config([flag])
    assert 'ast' not in str(e.value) and 'malformed' not in str(e.value)


# ---- images a user names: checked and decoded as training does ----

@pytest.mark.parametrize('name, content, says', [
    ('cut.png', damaged_png(), 'decoder crashed'), ('bomb.png', bomb_png(), '20000x20000'),
    ('wide.png', bomb_png(100000, 1000), 'max_image_pixels'), ('noise.png', corrupt_png_body(), 'cannot be decoded'),
    ('text.jpg', b'not an image at all', 'not a JPEG'), ('empty.png', b'', 'empty')])
def test_a_users_bad_image_is_named_in_one_line_never_decoded_in_this_process(tmp_path, name, content, says):
    good = tmp_path / 'good.png'
    good.write_bytes(png_bytes())
    (tmp_path / name).write_bytes(content)
    with pytest.raises(BadData, match=says) as e:
        checked_images([str(good), str(tmp_path / name)], 16, 89_478_485)
    text = str(e.value)
    assert name in text and '\n' not in text and '.cpp' not in text and 'good.png' not in text
    assert checked_images([str(good)], 16, 89_478_485)[0].shape == (3, 16, 16)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    from config import Config
    from train import train
    where = tmp_path_factory.mktemp('run')
    cfg = Config(n_train=128, n_val=32, n_test=32, n_layer=1, n_head=2, n_embd=32, ref_max_iters=5, batch_size=16,
                 max_iters=2, warmup_iters=1, eval_batches=1, final_eval=False, out_dir=str(where / 'run'),
                 ref_ckpt=str(where / 'ref.pt'), device='cpu')
    train(cfg, log=lambda *a: None)
    return os.path.join(cfg.out_dir, 'ckpt.pt')


def sample_py(ckpt, *args):
    return subprocess.run([sys.executable, 'sample.py', f'--ckpt={ckpt}', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1'})


@pytest.mark.slow
def test_sample_py_on_bad_images_ends_in_one_line(trained, tmp_path):
    good = tmp_path / 'good.png'
    good.write_bytes(png_bytes())
    for name, content in (('cut.png', damaged_png()), ('bomb.png', bomb_png()), ('noise.png', corrupt_png_body())):
        (tmp_path / name).write_bytes(content)
        out = sample_py(trained, str(good), str(tmp_path / name))
        assert out.returncode == 2 and out.stderr.count('\n') == 1 and name in out.stderr, out.stderr
        assert '.cpp' not in out.stderr and out.stdout == ''
    out = sample_py(trained, str(good), '--top_k=-1')
    assert out.returncode == 2 and out.stderr == "error: --top_k must be >= 0, got -1\n", out.stderr
    out = sample_py(trained, str(good))
    assert out.returncode == 0 and out.stdout.startswith(str(good)), out.stderr
