#!/bin/bash
# GPU figures for docs/performance.md (issues 6 and 17), prepared for a session that is lent a GPU.
# Run from the repository root with a TensorFlow that sees the GPU (tensorflow[and-cuda]==2.21.0):
#   benchmarks/gpu.sh tf        # wrn-28-10, densenet-112-33: fp32 / mixed / mixed + XLA (6 bench runs)
#   benchmarks/gpu.sh pipeline  # wrn-28-1 on CIFAR-shaped tfds mock data: host-pipeline ceiling with and
#                               # without --device_augment, and the steps fed by each
#   benchmarks/gpu.sh torch     # the same steps in PyTorch (AMP, channels_last, torch.compile), if torch imports
#   benchmarks/gpu.sh all       # all three (longer than one 10-minute device call: prefer one part per call)
# Second argument: the mixed policy, bf16 (default) or fp16. Each line printed is the bench's own
# machine-readable last line, prefixed by the setting; everything also goes to ${OUT:-.}/gpu_<part>.txt.
# Budget: each part is sized for under ~8 minutes on an H100/H200 (per-run timeouts below).
set -u
PART=${1:-tf}
MP=${2:-bf16}
DEST=${OUT:-.}
mkdir -p "$DEST"
export TF_CPP_MIN_LOG_LEVEL=2

header() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
  python -c "import tensorflow as tf; print('tf', tf.__version__, tf.config.list_physical_devices('GPU'))" 2>&1 | tail -1
  uptime
}

bench() {  # bench <label> <timeout> <flags...>
  local label=$1 limit=$2
  shift 2
  local line
  line=$(timeout "$limit" python -m ban_tf.bench "$@" 2>/dev/null | tail -1)
  echo "$label: ${line:-FAILED or timed out after ${limit}s}"
}

part_tf() {
  local common="--batch_size=128 --dataset=synthetic --steps=20 --reps=3 --warmup=2 --keras_baseline=false"
  for arch in wrn-28-10 densenet-112-33; do
    for setting in "--mixed_precision=none" "--mixed_precision=$MP" "--mixed_precision=$MP --jit_compile"; do
      # shellcheck disable=SC2086
      bench "$arch $setting" 150 --arch=$arch $common $setting
    done
  done
}

part_pipeline() {
  # Real tf.data pipeline over 50,000 CIFAR-shaped examples: input_host_aug_img_s and
  # input_device_aug_img_s are the host ceilings; the step figures include in-step augmentation
  # (--device_augment=true) or read host-augmented float32 (false).
  local common="--arch=wrn-28-1 --batch_size=128 --dataset=cifar10 --mock_data --train_examples=50000 --epochs=3
                --steps=50 --reps=3 --warmup=2 --keras_baseline=false --mixed_precision=$MP"
  for da in true false; do
    # shellcheck disable=SC2086
    bench "wrn-28-1 pipeline --device_augment=$da" 240 $common --device_augment=$da
  done
}

part_torch() {
  if ! python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "torch: not importable with CUDA here; skipped (install torch with CUDA to compare)"
    return
  fi
  local amp=$MP
  for arch in wrn-28-10 densenet-112-33; do
    for setting in "--amp=none" "--amp=$amp --channels_last" "--amp=$amp --channels_last --compile"; do
      # shellcheck disable=SC2086
      line=$(timeout 150 python benchmarks/torch_ban_step.py --device=cuda --arch=$arch --batch_size=128 \
               --steps=20 --reps=3 --warmup=3 $setting 2>/dev/null | tail -1)
      echo "torch $arch $setting: ${line:-FAILED or timed out}"
    done
  done
}

run_part() {
  { header; "part_$1"; } 2>&1 | tee "$DEST/gpu_$1.txt"
}

case "$PART" in
  tf|pipeline|torch) run_part "$PART" ;;
  all) run_part tf; run_part pipeline; run_part torch ;;
  *) echo "usage: benchmarks/gpu.sh tf|pipeline|torch|all [bf16|fp16]" >&2; exit 2 ;;
esac
