#!/usr/bin/env bash
# One prepared GPU check for an H100 (at most 9 minutes: the three runs are capped at 2.5, 5
# and 1.5 by timeout): bench.py on a ~100M-parameter H-LVLM, ViT 2x768 -> MLP projector -> GPT 12x768
# (100.7M parameters, all trained; bench.py prints the count), 64 image tokens plus up to
# block_size caption tokens, batch 128, bf16 autocast. It prints NTP vs PRIOR (cached P_r and
# online reference) step time, tokens/s, images/s, MFU, data share and peak memory; eager
# first (quick), then torch.compile, then fp16 with loss scaling. Every part runs even if an
# earlier one fails; the script ends with a summary and a non-zero status if any failed.
#
#   bash scripts/gpu_bench.sh [extra bench.py flags]
#
# Needs no network: the LM starts from scratch (bench.py never loads GPT-2 or a reference)
# and the data are generated. Only the GPT-2 tokenizer ranks must already be on disk; on a
# bare machine, copy tiktoken's cache into the (git-ignored) out/ folder and ship it along:
#   mkdir -p out/tiktoken && cp ~/.cache/tiktoken/* out/tiktoken/
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d out/tiktoken ]; then
    export TIKTOKEN_CACHE_DIR="$PWD/out/tiktoken"
fi
# fail fast instead of letting data.py try PyPI from a machine without network
python -c "import os, sys, data; p = data._cache_path(); os.path.exists(p) or sys.exit(f'no GPT-2 ranks at {p}; see the header of scripts/gpu_bench.sh')" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

MODEL="--arch=vit --n_layer=12 --n_head=12 --n_embd=768 --vit_layer=2 --vit_embd=768 --image_size=32 --patch_size=4"
RUN="--device=cuda --loss=prior --freeze_lm=False --freeze_vision=False --batch_size=128 --n_train=4096"

FAILED=()
part() {   # part NAME SECONDS bench.py-flags...: run one part, note a failure, go on
    local name=$1 limit=$2; shift 2
    echo "=== $name ==="
    timeout "$limit" python bench.py $MODEL $RUN "$@" || FAILED+=("$name (status $?)")
}
part eager 150 --compile=False --bench_warmup=5 --bench_iters=30 "$@"
part compile 300 --compile=True --bench_warmup=10 --bench_iters=30 "$@"   # warmup covers the compiles
part fp16 90 --compile=False --precision=fp16 --bench_warmup=5 --bench_iters=20 "$@"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "failed parts: ${FAILED[*]}"
    exit 1
fi
echo "all parts ran"
