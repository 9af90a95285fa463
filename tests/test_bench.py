"""bench.py runs end to end on a tiny config and prints every figure it promises."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize('preset, arch', [('', 'u'), ('', 'h'), ('configs/shapes_h.py', 'h')])
def test_bench_prints_its_figures(preset, arch):
    flags = ['--n_train=128', '--n_val=32', '--n_layer=1', '--n_head=2', '--n_embd=32', '--vit_layer=1',
             '--vit_embd=32', '--patch_size=8', '--batch_size=8', '--device=cpu', f'--arch={arch}',
             '--bench_iters=2', '--bench_warmup=1']
    out = subprocess.run([sys.executable, 'bench.py'] + [preset] * bool(preset) + flags, cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for field in ('parameters', 'ms/iter', 'tokens/s', 'images/s', 'MFU', 'data', 'peak mem',
                  'PRIOR/NTP step time: cached', 'FLOPs predict', 'captions/s', 'debiased/plain'):
        assert field in out.stdout, f"{field!r} missing from:\n{out.stdout}"
    firsts = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    assert [w for w in firsts if w in ('ntp', 'cached', 'online')] == ['ntp', 'cached', 'online']
