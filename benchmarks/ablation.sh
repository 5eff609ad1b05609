#!/bin/bash
# CPU ablation of ban_tf.bench for docs/performance.md: one bench run per setting,
# preact-resnet-20, batch 128, synthetic CIFAR-shaped batches (32x32x3, 10 classes).
#   benchmarks/ablation.sh [STEPS] [REPS]      (from the repository root, venv active)
# Prints "setting: <bench last line>" per run; rerun it at quiet times (medians inside
# each run; the runs themselves are sequential, so machine load can differ between them).
set -u
STEPS=${1:-10}
REPS=${2:-5}
COMMON="--arch=preact-resnet-20 --batch_size=128 --dataset=synthetic --steps=$STEPS --reps=$REPS --warmup=2"
run() {
  local name=$1; shift
  local line
  line=$(TF_CPP_MIN_LOG_LEVEL=2 python -m ban_tf.bench $COMMON "$@" 2>/dev/null | tail -1)
  echo "$name: $line"
}
run "default"
# oneDNN is on by default (ban_tf/__init__.py); this shows what it is worth here.
TF_ENABLE_ONEDNN_OPTS=0 run "oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)"
run "inter_op=1,intra_op=2" --inter_op_threads=1 --intra_op_threads=2
run "inter_op=2,intra_op=1" --inter_op_threads=2 --intra_op_threads=1
run "steps_per_execution=8" --steps_per_execution=8
run "jit_compile" --jit_compile
run "jit_compile+steps_per_execution=8" --jit_compile --steps_per_execution=8
run "weight_decay=0 (L2 term cost)" --weight_decay=0
