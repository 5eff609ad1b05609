"""ban_tf.bench end to end on a tiny net: runs, and its last line parses (no timing asserts)."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.conftest import SHARED_TFDS

pytestmark = pytest.mark.slow  # end to end: runs the bench binary (pytest -m "not slow" skips it)

KEYS = (
  "supervised_img_s",
  "distill_img_s",
  "input_img_s",
  "ratio",
  "peak_rss_mb",
  "input_host_aug_img_s",
  "input_device_aug_img_s",
  "augment_img_s",
  "input_decode_img_s",
)


def _last_line(args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "ban_tf.bench",
      "--arch=tiny",
      "--batch_size=32",
      "--steps=2",
      "--reps=2",
      "--warmup=1",
      "--epochs=2",
      *args,
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  fields = dict(kv.split("=", 1) for kv in lines[-1].split())
  assert tuple(fields) == KEYS, lines[-1]
  return {k: float(v) for k, v in fields.items()}, proc.stdout


@pytest.mark.skipif(
  not os.path.isdir(os.path.join(SHARED_TFDS, "fashion_mnist")),
  reason="needs the shared fashion_mnist TFDS directory",
)
def test_bench_on_fashion_mnist_reports_all_figures():
  got, out = _last_line(
    ["--dataset=fashion_mnist", f"--data_dir={SHARED_TFDS}", "--train_examples=256"]
  )
  for k in KEYS:
    assert got[k] > 0, (k, out)
  assert got["ratio"] == pytest.approx(got["supervised_img_s"] / got["distill_img_s"], rel=1e-2)
  assert "device=CPU" in out and "intra_op_threads=" in out


def test_bench_synthetic_has_no_input_figure():
  got, _ = _last_line(
    ["--dataset=synthetic", "--image_shape=8,8,3", "--num_classes=3", "--keras_baseline=false"]
  )
  assert got["supervised_img_s"] > 0 and got["distill_img_s"] > 0
  assert got["input_img_s"] != got["input_img_s"]  # nan: nothing to read


def test_bench_on_tfds_mock_data_works_offline():
  """--mock_data reads tfds mock examples through data.Dataset, with no network."""
  got, out = _last_line(
    ["--dataset=cifar10", "--mock_data", "--train_examples=64", "--keras_baseline=false"]
  )
  assert got["input_img_s"] > 0 and got["supervised_img_s"] > 0, out
  assert "data=cifar10 (tfds mock) image_shape=(32, 32, 3) classes=10" in out


@pytest.mark.skipif(
  not os.path.isdir(os.path.join(SHARED_TFDS, "fashion_mnist")),
  reason="needs the shared fashion_mnist TFDS directory",
)
def test_whole_run_splits_the_wall_time_into_phases(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "ban_tf.bench",
      "--whole_run",
      "--dataset=fashion_mnist",
      f"--data_dir={SHARED_TFDS}",
      "--arch=tiny",
      "--train_examples=128",
      "--val_examples=64",
      "--batch_size=32",
      "--epochs=2",
      "--gens=1",
      f"--run_dir={tmp_path}/ignored",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  fields = {
    k: float(v)
    for k, v in (kv.split("=", 1) for kv in proc.stdout.strip().splitlines()[-1].split())
  }
  phases = [k for k in fields if k.endswith("_s") and k not in ("total_s", "train_img_s")]
  assert phases == [
    f"{p}_s"
    for p in (
      "startup",
      "data_open",
      "pipeline",
      "teacher_load",
      "train",
      "eval",
      "checkpoint_tb",
      "export",
      "ensemble",
      "report",
      "other",
    )
  ]
  assert sum(fields[k] for k in phases) == pytest.approx(fields["total_s"], abs=0.05)
  for k in (
    "startup_s",
    "data_open_s",
    "train_s",
    "eval_s",
    "checkpoint_tb_s",
    "export_s",
    "teacher_load_s",
  ):
    assert fields[k] > 0, (k, proc.stdout)
  assert fields["train_share"] == pytest.approx(fields["train_s"] / fields["total_s"], abs=2e-3)
  # 2 generations x 2 epochs x 4 steps x 32 images trained.
  assert fields["train_img_s"] == pytest.approx(512 / fields["train_s"], rel=0.02)
  assert not os.path.exists(f"{tmp_path}/ignored")  # a temporary run directory, removed


def test_compare_precision_adds_interleaved_mixed_precision_steps():
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "ban_tf.bench",
      "--arch=tiny",
      "--batch_size=16",
      "--steps=1",
      "--reps=1",
      "--warmup=1",
      "--dataset=synthetic",
      "--image_shape=8,8,3",
      "--keras_baseline=false",
      "--compare_precision=bf16",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  fields = {
    k: float(v)
    for k, v in (kv.split("=", 1) for kv in proc.stdout.strip().splitlines()[-1].split())
  }
  assert tuple(fields)[len(KEYS) :] == (
    "supervised_bf16_img_s",
    "distill_bf16_img_s",
    "supervised_bf16_speedup",
    "distill_bf16_speedup",
  )
  assert fields["supervised_bf16_speedup"] == pytest.approx(
    fields["supervised_bf16_img_s"] / fields["supervised_img_s"], rel=1e-2
  )
  assert "teachers compute in float32 and bfloat16" in proc.stdout
