#!/usr/bin/env bash
# Regenerates docs/evidence.md's study: born-again networks measured on data available offline.
#   bash benchmarks/evidence.sh [OUT]        (OUT: where the runs go; default runs/evidence)
# Needs the prepared TFDS fashion_mnist and tiny_shakespeare in ../shared/tensorflow_datasets
# (or set DATA_DIR). Everything resumes: rerun the same command after an interruption.
# Wall time on the project's 2-core machine, shared with other work: about 1.5 hours (docs/evidence.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/evidence}
DATA_DIR=${DATA_DIR:-../shared/tensorflow_datasets}

# Images: fashion_mnist, 1000 training images (500 more held out for validation), no augmentation,
# preact-resnet-8 (78k parameters), 30 epochs: the teacher fits its training data (~99% train
# accuracy), the setting pure BAN needs. 5 base seeds, each with its own teacher.
IMG="--dataset=fashion_mnist --data_dir=$DATA_DIR --arch=preact-resnet-8 --epochs=30 --batch_size=64
  --lr=0.1 --train_examples=1000 --val_examples=500 --augment=none --seeds=5"
# Teacher, BAN-1, BAN-2, BANE-2 and the label-only Baseline (BAN-1's seed) per base seed.
python -m ban_tf.main $IMG --gens=2 --baseline --run_dir="$OUT/fashion_ban"
# BAN+L from the same per-seed teachers ({seed}: each base seed's own gen_0).
python -m ban_tf.main $IMG --gens=1 --loss=ban_l --teacher="$OUT/fashion_ban/seed_{seed}/gen_0" \
  --run_dir="$OUT/fashion_ban_l"
python -m ban_tf.report --run_dirs="$OUT/fashion_ban,$OUT/fashion_ban_l" --out_dir="$OUT/fashion_compared"

# Language model: tiny_shakespeare (word level, 2,000 words), a 1-layer LSTM of 64 units, 2 epochs:
# BAN+L (labels + KD, the paper's Table 6 objective) and the label-only Baseline, 5 base seeds.
python -m ban_tf.main --task=lm --dataset=tiny_shakespeare --data_dir="$DATA_DIR" --vocab_size=2000 \
  --arch=lstm-1-64 --dropout=0.2 --loss=ban_l --gens=1 --epochs=2 --batch_size=32 --bptt=35 --lr=1 \
  --lr_plateau_decay=0.25 --momentum=0 --nonesterov --weight_decay=0 --clip_norm=5 --seeds=5 \
  --baseline --run_dir="$OUT/shakespeare_ban_l"
python -m ban_tf.report --run_dir="$OUT/shakespeare_ban_l"
