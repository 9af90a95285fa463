"""
The GPT-2 tokenizer, offline, and the model's vocabulary over it (Vocab, at the end).

tiktoken's r50k_base holds GPT-2's BPE ranks and downloads them on first use, which fails
offline. The openai-whisper sdist on PyPI ships the same file (whisper/assets/gpt2.tiktoken),
so a machine that reaches only PyPI can still get it. tiktoken looks for a cached copy at
$TIKTOKEN_CACHE_DIR/sha1(url); we put the checked file there.
"""

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import tiktoken

RANKS_URL = 'https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken'
RANKS_SHA256 = '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930'
WHISPER_SDIST = 'openai-whisper==20250625'
EOT = 50256                                     # GPT-2's <|endoftext|>, also our BOS


def _cache_path():
    cache_dir = os.environ.setdefault('TIKTOKEN_CACHE_DIR', os.path.expanduser('~/.cache/tiktoken'))
    return os.path.join(cache_dir, hashlib.sha1(RANKS_URL.encode()).hexdigest())


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def ensure_gpt2_ranks():
    """Make sure tiktoken finds GPT-2's ranks offline; fetch them from PyPI if needed."""
    path = _cache_path()
    if os.path.exists(path):
        with open(path, 'rb') as f:
            if _sha256(f.read()) == RANKS_SHA256:
                return path
        os.remove(path)                         # a corrupt copy: replace it
    print(f"tokenizer: fetching GPT-2 ranks from PyPI ({WHISPER_SDIST} sdist) into {path}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary=:all:',
               '--dest', tmp, WHISPER_SDIST]
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = [n for n in os.listdir(tmp) if n.endswith('.tar.gz')]
        if result.returncode != 0 or not sdists:
            raise RuntimeError(
                f"cannot get the GPT-2 tokenizer ranks: tiktoken's cache {path} is empty and "
                f"'{' '.join(cmd[1:])}' failed:\n{result.stderr.strip()}\n"
                f"Fix: copy r50k_base.tiktoken (sha256 {RANKS_SHA256}) to {path}")
        with tarfile.open(os.path.join(tmp, sdists[0])) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith('whisper/assets/gpt2.tiktoken'))
            data = tar.extractfile(member).read()
    if _sha256(data) != RANKS_SHA256:
        raise RuntimeError(f"GPT-2 ranks from {WHISPER_SDIST} have sha256 {_sha256(data)}, expected {RANKS_SHA256}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp_path = f"{path}.{os.getpid()}.tmp"
    with open(tmp_path, 'wb') as f:
        f.write(data)
    os.replace(tmp_path, path)
    return path


_ENCODING = None


def get_tokenizer():
    global _ENCODING
    if _ENCODING is None:
        ensure_gpt2_ranks()
        _ENCODING = tiktoken.get_encoding('r50k_base')
    return _ENCODING


# ---------------------------------------------------------------------------------------------
# Vocabulary. A tiny model does not need 50,257 output rows for a few hundred distinct
# words, so by default the model sees a compact vocabulary: the GPT-2 ids that occur in the
# training captions, mapped to 0..n-1, plus one unknown id. The list travels in every
# checkpoint, so decoding never depends on rebuilding it. `Vocab(None)` is the identity map
# over the full GPT-2 vocabulary (needed for --init_lm=gpt2).

class Vocab:
    def __init__(self, gpt2_ids=None):
        self.gpt2_ids = None if gpt2_ids is None else [int(i) for i in gpt2_ids]
        if self.gpt2_ids is None:
            self.size, self.unk = get_tokenizer().n_vocab, None
            return
        self.unk = len(self.gpt2_ids)           # the last id means "not seen in training"
        self.size = self.unk + 1
        self.lookup = np.full(get_tokenizer().n_vocab, self.unk, dtype=np.int64)
        self.lookup[self.gpt2_ids] = np.arange(len(self.gpt2_ids))

    @staticmethod
    def from_captions(token_lists):
        """Compact vocabulary of the GPT-2 ids in token_lists (plus EOT)."""
        seen = {EOT}
        for tokens in token_lists:
            seen.update(tokens)
        return Vocab(sorted(seen))

    def encode(self, gpt2_tokens):
        tokens = np.asarray(gpt2_tokens, dtype=np.int64)
        return tokens if self.gpt2_ids is None else self.lookup[tokens]

    def to_gpt2(self, ids):
        if self.gpt2_ids is None:
            return [int(i) for i in ids]
        return [self.gpt2_ids[i] for i in ids if i != self.unk]

    def decode(self, ids):
        """Text of model ids, decoded as whole runs of tokens: byte-level BPE splits a character
        beyond ASCII (Chinese, accents, emoji) across tokens. Unknown ids print as the replacement character."""
        if self.gpt2_ids is None:
            return get_tokenizer().decode(self.to_gpt2(ids))
        runs = [[]]
        for i in map(int, ids):
            if i == self.unk:
                runs.append([])
            else:
                runs[-1].append(self.gpt2_ids[i])
        return '\ufffd'.join(get_tokenizer().decode(run) for run in runs)

    @property
    def eot(self):
        return int(self.encode([EOT])[0])

    def state(self):
        return {'gpt2_ids': self.gpt2_ids}
