#!/usr/bin/env bash
# The DVERGE speed measurements that need a GPU (issue: 3 x ResNet-20 epoch < 20 s on an H100),
# in one go: each line of OUT is a label and the benchmark's JSON. Run from the repository root:
#   bash benchmarks/gpu_suite.sh [OUT]        (default OUT: benchmarks/gpu_results.jsonl)
set -euo pipefail
out="${1:-benchmarks/gpu_results.jsonl}"
py="${PYTHON:-python}"
: > "$out"
run() {
    local label="$1"; shift
    echo "== $label" >&2
    echo "$label $("$py" -m benchmarks.dverge --members 3 --device cuda "$@" | tail -1)" >> "$out"
}
for arch in conv resnet20; do
    run "$arch plain" --arch "$arch" --batch-size 128 --iters 10 --impl plain
    for stack in auto always never; do
        run "$arch fast stack=$stack" --arch "$arch" --batch-size 128 --iters 20 --impl fast --stack "$stack"
        run "$arch fast stack=$stack amp" --arch "$arch" --batch-size 128 --iters 20 --impl fast --stack "$stack" --amp
    done
done
run "conv fast batch32" --arch conv --batch-size 32 --iters 20 --impl fast
run "conv plain batch32" --arch conv --batch-size 32 --iters 10 --impl plain
cat "$out"
