#!/usr/bin/env bash
# The GPU suite: every CUDA/AMP test and the GPU rows of BENCHMARKS.md, in at most 8 minutes
# on one GPU, written to one Markdown file (default gpu_results.md; first argument overrides).
#
#   bash benchmarks/gpu_suite.sh [RESULTS.md]
#
# Run it from the repository root on a machine with a CUDA GPU, with the project installed
# (pip install -e ".[test]"). Each step has its own time limit so one slow step cannot eat the
# budget; a step that fails or times out is recorded as such and the suite goes on.
set -u
cd "$(dirname "$0")/.."
OUT="${1:-gpu_results.md}"
export PYTHONPATH=. HF_HUB_OFFLINE=1 TRANSFERLAB_BENCH_DIR="${TRANSFERLAB_BENCH_DIR:-/tmp/transferlab_bench}"
PY="${PYTHON:-python}"

step() {  # step TITLE SECONDS COMMAND...: run it, append its output to the results file
    local title="$1" limit="$2"
    shift 2
    local start=$SECONDS
    printf '\n## %s\n\n```\n' "$title" >>"$OUT"
    timeout --signal=INT --kill-after=5 "$limit" "$@" >>"$OUT" 2>&1
    local rc=$?
    printf '```\n\nexit %s after %ss (limit %ss)\n' "$rc" "$((SECONDS - start))" "$limit" >>"$OUT"
    echo "$title: exit $rc after $((SECONDS - start))s"
}

{
    echo "# transferlab GPU suite"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
    echo '```'
} >"$OUT"

# Step limits: 120 + 100 + 110 + 60 + 40 = 430 s, at most 455 s with the 5 s kill grace each.
# 1. correctness on the GPU: every test that takes the cuda fixture (marked gpu)
step "CUDA / AMP tests (pytest -m gpu)" 120 "$PY" -m pytest -q -m gpu -rs tests
# 2. extraction efficiency in one process: automatic, + GPU JPEG decoding, + compile, + both
step "Extraction efficiency (resnet50)" 100 "$PY" benchmarks/extract_efficiency.py \
    --device cuda --models resnet50 --images 1024 --rounds 2 --gpu-decode --compile
# 3. the whole process as a user runs it (512 and 2,560 JPEGs), with and without GPU decoding,
#    over the best pure forward (bf16/fp16, batch 64-256): target >= 0.9
step "Whole process (resnet50)" 110 "$PY" benchmarks/whole_process.py \
    --device cuda --models resnet50 --rounds 2 --search-seconds 0.5 --gpu-decode
# 4. against the per-image loop (target >= 20x) and timm + DataLoader
step "Against the usual ways (resnet50)" 60 "$PY" benchmarks/vs_baselines.py \
    --device cuda --models resnet50 --images 512 --rounds 2 --in-process
# 5. the fine-tune cache
step "Fine-tune feature cache" 40 "$PY" benchmarks/finetune_cache.py --device cuda --images 512 --epochs 5
echo "results: $OUT"
