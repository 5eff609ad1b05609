"""ban_tf.bench on tiny nets and inputs: every figure it reports, parsed (no timing asserts).

One test runs the binary (flags, exit code, the machine-readable last line); the others call
bench.run / bench.whole_run in this process on their own FlagValues, which is the same code
minus a TensorFlow start-up.
"""

import io
import math
import os
import subprocess
import sys

import pytest
from absl import flags
from absl import logging

from ban_tf import bench
from ban_tf import main
from tests.conftest import REPO
from tests.conftest import SHARED_TFDS

pytestmark = pytest.mark.slow  # end to end: builds, exports and times models

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
INPUT_KEYS = ("input_img_s", "input_host_aug_img_s", "input_device_aug_img_s", "input_decode_img_s")
# The smallest timing that still runs every path: one timed step, two repetitions (median),
# one warm-up execution.
TINY = ["--arch=tiny", "--batch_size=16", "--steps=1", "--reps=2", "--warmup=1"]

needs_fashion_mnist = pytest.mark.skipif(
  not os.path.isdir(os.path.join(SHARED_TFDS, "fashion_mnist")),
  reason="needs the shared fashion_mnist TFDS directory",
)
FASHION_MNIST = [
  "--dataset=fashion_mnist",
  f"--data_dir={SHARED_TFDS}",
  "--train_examples=64",
  "--test_split=test[:32]",
]


def _fields(text):
  """{key: value} of the last line of `text` (key=value pairs), in order."""
  return {
    k: float(v) for k, v in (kv.split("=", 1) for kv in text.strip().splitlines()[-1].split())
  }


@pytest.fixture(autouse=True)
def _absl_verbosity_restored():
  """bench.run / whole_run turn absl logging down to WARNING for the process; restored after."""
  was = logging.get_verbosity()
  yield
  logging.set_verbosity(was)


def _parse(argv):
  fv = flags.FlagValues()
  bench.define_flags(fv)
  fv(["bench", *argv])
  return main.config_from_flags(fv), fv


def _bench(argv):
  """bench.run in this process with the binary's flags; (returned figures, last line, report)."""
  cfg, fv = _parse(TINY + argv)
  out = io.StringIO()
  got = bench.run(
    cfg,
    fv.steps,
    fv.reps,
    fv.warmup,
    fv.input_batches,
    fv.mock_data,
    tuple(int(s) for s in fv.image_shape),
    fv.num_classes,
    fv.keras_baseline,
    fv.compare_precision,
    out=out,
  )
  text = out.getvalue()
  last = _fields(text)
  for k, v in last.items():  # the last line prints what run returns, rounded
    assert v == pytest.approx(got[k], rel=1e-2, abs=0.06, nan_ok=True), (k, text)
  return got, last, text


def test_binary_on_synthetic_data_has_no_input_figure():
  """The command: exit 0 and a last line of every figure, the input ones nan (nothing to read)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "ban_tf.bench",
      *TINY,
      "--dataset=synthetic",
      "--image_shape=8,8,3",
      "--num_classes=3",
      "--keras_baseline=false",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = _fields(proc.stdout)
  assert tuple(got) == KEYS, proc.stdout
  assert got["supervised_img_s"] > 0 and got["distill_img_s"] > 0 and got["augment_img_s"] > 0
  assert got["ratio"] == pytest.approx(got["supervised_img_s"] / got["distill_img_s"], rel=1e-2)
  assert all(math.isnan(got[k]) for k in INPUT_KEYS), proc.stdout
  assert "image_shape=(8, 8, 3) classes=3" in proc.stdout


@needs_fashion_mnist
def test_bench_on_fashion_mnist_reports_all_figures_and_compares_precision():
  """Every figure on real data (with the Keras baseline timed too), and --compare_precision=bf16
  adds the interleaved mixed-precision steps and their speed-ups."""
  got, last, out = _bench(FASHION_MNIST + ["--compare_precision=bf16"])
  assert tuple(last)[: len(KEYS)] == KEYS, out
  assert tuple(last)[len(KEYS) :] == (
    "supervised_bf16_img_s",
    "distill_bf16_img_s",
    "supervised_bf16_speedup",
    "distill_bf16_speedup",
  )
  for k in last:
    assert got[k] > 0, (k, out)
  assert got["keras_fit_img_s"] > 0  # timed, reported on its own line only
  assert "keras_fit:" in out
  assert got["ratio"] == pytest.approx(got["supervised_img_s"] / got["distill_img_s"])
  assert got["input_img_s"] == got["input_device_aug_img_s"]  # --device_augment is the default
  for kind in ("supervised", "distill"):
    assert got[f"{kind}_bf16_speedup"] == pytest.approx(
      got[f"{kind}_bf16_img_s"] / got[f"{kind}_img_s"]
    )
  assert "device=CPU" in out and "intra_op_threads=" in out
  assert "data=fashion_mnist image_shape=(28, 28, 1) classes=10" in out
  assert "teachers compute in float32 and bfloat16" in out


def test_bench_on_tfds_mock_data_works_offline():
  """--mock_data reads tfds mock examples through data.Dataset, with no network."""
  got, last, out = _bench(
    ["--dataset=cifar10", "--mock_data", "--train_examples=32", "--keras_baseline=false"]
  )
  assert tuple(last) == KEYS, out
  assert got["input_img_s"] > 0 and got["input_decode_img_s"] > 0, out
  assert got["supervised_img_s"] > 0, out
  assert "data=cifar10 (tfds mock) image_shape=(32, 32, 3) classes=10" in out


@needs_fashion_mnist
def test_whole_run_splits_the_wall_time_into_phases(tmp_path):
  cfg, _ = _parse(
    [
      "--whole_run",
      *FASHION_MNIST,
      "--arch=tiny",
      "--val_examples=32",
      "--batch_size=32",
      "--epochs=1",
      "--gens=1",
      f"--run_dir={tmp_path}/ignored",
    ]
  )
  out = io.StringIO()
  got = bench.whole_run(cfg, out=out)
  fields = _fields(out.getvalue())
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
  assert sum(got[k] for k in phases) == pytest.approx(got["total_s"], rel=1e-9)
  for k in (
    "startup_s",
    "data_open_s",
    "train_s",
    "eval_s",
    "checkpoint_tb_s",
    "export_s",
    "teacher_load_s",
  ):
    assert got[k] > 0, (k, out.getvalue())
  assert got["train_share"] == pytest.approx(got["train_s"] / got["total_s"])
  # 2 generations x 1 epoch x 2 steps x 32 images trained.
  assert got["train_img_s"] == pytest.approx(128 / got["train_s"])
  for k, v in fields.items():  # the last line prints what whole_run returns, rounded
    assert v == pytest.approx(got[k], rel=1e-2, abs=6e-3), k
  assert not os.path.exists(f"{tmp_path}/ignored")  # a temporary run directory, removed
