#!/usr/bin/env bash
# One GPU proof command (about 8 minutes on one H100/H200):
#   1. the gpu-marked tests (bf16 kernel parity at real shapes, sync-free step, CUDA-graph dropout, ...)
#   2. the attention benchmarks: ours vs flash-attn (per frame against its key prefix), xformers (bias
#      tensor), SDPA with a dense mask, compiled Flex (flash-attn / xformers only where installed)
#   3. the training-step benchmark at franka.toml shapes, batch 32: original-style vs eager fast vs
#      compiled vs compiled + CUDA graphs
# then writes the figures, with the device name, into bench/RESULTS.md (the section it generated last
# time is replaced). Usage: bash scripts/gpu_check.sh   (from anywhere; runs in the repository root)
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); run it on a machine with one" >&2
    exit 2
fi
device=$(python -c "import torch; print(torch.cuda.get_device_name(0))")
out=$(mktemp -d)
echo "gpu_check on $device; raw results in $out"
export TRITON_INTERPRET=0
status=0

# each phase has a time limit, so the whole check stays within ~8 minutes
timeout 180 python -m pytest -q -m gpu tests --junitxml="$out/gpu_tests.xml" -p no:cacheprovider || status=1
timeout 120 python -m pytest -q bench/bench_attention.py --benchmark-only --benchmark-json="$out/attention.json" \
    -p no:cacheprovider || status=1
timeout 180 python -m pytest -q bench/bench_train_step.py --benchmark-only --benchmark-json="$out/train_step.json" \
    -p no:cacheprovider || status=1

python -m bench.report --device "$device" --tests "$out/gpu_tests.xml" \
    --json "$out/attention.json" "$out/train_step.json" --results bench/RESULTS.md || status=1
[ "$status" -eq 0 ] && echo "gpu_check: all phases passed" || echo "gpu_check: a phase failed or timed out (see above)" >&2
exit "$status"
