#!/bin/bash
# GPU figures for docs/performance.md (issue 6): wrn-28-10 and densenet-112-33 at batch 128,
# fp32 vs mixed precision vs mixed + XLA. Prepared for a session that gets a GPU; run from
# the repository root with the venv active (tensorflow[and-cuda]==2.21.0):
#   benchmarks/gpu.sh [bf16|fp16] 2>&1 | tee gpu.txt
# Synthetic CIFAR-shaped batches: the step figures do not depend on the data. About
# 6 runs x (tracing + 3 x 20 steps x 3 variants); budget ~8 minutes on an H100.
set -u
MP=${1:-bf16}
COMMON="--batch_size=128 --dataset=synthetic --steps=20 --reps=3 --warmup=2 --keras_baseline=false"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for arch in wrn-28-10 densenet-112-33; do
  for setting in "--mixed_precision=none" "--mixed_precision=$MP" "--mixed_precision=$MP --jit_compile"; do
    line=$(TF_CPP_MIN_LOG_LEVEL=2 timeout 300 python -m ban_tf.bench --arch=$arch $COMMON $setting 2>/dev/null | tail -1)
    echo "$arch $setting: $line"
  done
done
