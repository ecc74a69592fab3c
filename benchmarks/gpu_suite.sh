#!/usr/bin/env bash
# The GPU suite: every CUDA/AMP test and the GPU rows of BENCHMARKS.md, in at most ~8 minutes
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
    timeout --signal=INT --kill-after=15 "$limit" "$@" >>"$OUT" 2>&1
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

# 1. correctness on the GPU: every test that takes the cuda fixture (marked gpu)
step "CUDA / AMP tests (pytest -m gpu)" 150 "$PY" -m pytest -q -m gpu -rs tests
# 2. extraction efficiency: automatic, + GPU JPEG decoding, + torch.compile, + both
step "Extraction efficiency (resnet50)" 150 "$PY" benchmarks/extract_efficiency.py \
    --device cuda --models resnet50 --images 1024 --rounds 2 --gpu-decode --compile
# 3. against the per-image loop and timm + DataLoader
step "Against the usual ways (resnet50)" 90 "$PY" benchmarks/vs_baselines.py \
    --device cuda --models resnet50 --images 512 --rounds 2 --in-process
# 4. the fine-tune cache
step "Fine-tune feature cache" 60 "$PY" benchmarks/finetune_cache.py --device cuda --images 512 --epochs 5
echo "results: $OUT"
