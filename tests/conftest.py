"""Test setup: three logical CPU devices (1- vs 2- vs 3-replica tests), one shared strategy each, quiet TF logs.

Runs before any test module imports TensorFlow, so the logical device
configuration can still be applied.
"""

import os
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ban_tf  # pylint: disable=g-import-not-at-top,unused-import  # sets oneDNN on before TF loads  # noqa: F401
import pytest  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

NUM_CPUS = 3
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
  _cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(NUM_CPUS)]
)
tf.get_logger().setLevel("ERROR")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The prepared TFDS data sets live in shared/ beside the checkout. realpath: under
# Bazel this file is a runfiles symlink into the source tree.
_SOURCE = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
SHARED_TFDS = os.environ.get("BAN_TF_SHARED_TFDS") or os.path.join(
  os.path.dirname(_SOURCE), "shared", "tensorflow_datasets"
)

_STRATEGIES = {}


def strategy_for(replicas):
  """The process's one strategy over `replicas` logical CPUs (1: the default strategy).

  Cached: every test of the process shares it. ReductionToOneDevice, as
  main.make_strategy does for logical CPUs: collective ops cache shapes by
  (group key, instance key), and every new MirroredStrategy starts from the same
  keys, so a second one all-reducing other shapes would abort with "Shape mismatch".
  """
  if replicas == 1:
    return tf.distribute.get_strategy()
  if replicas not in _STRATEGIES:
    _STRATEGIES[replicas] = tf.distribute.MirroredStrategy(
      [f"/cpu:{i}" for i in range(replicas)], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
  assert _STRATEGIES[replicas].num_replicas_in_sync == replicas
  return _STRATEGIES[replicas]


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}replica")
def strategy(request):
  """Parametrises a test over 1, 2 and 3 replicas (`strategy.num_replicas_in_sync`)."""
  return strategy_for(request.param)


@pytest.fixture(autouse=True)
def _op_determinism_ends_with_its_test():
  """A test that runs main() with --deterministic in this process turns TF's op determinism on
  for the process; turned off again after it, so no later test depends on the order (under
  determinism unseeded random ops and tf.timestamp raise). TF has no public switch-off."""
  from tensorflow.python.framework import config as tf_config  # pylint: disable=g-import-not-at-top

  was = tf_config.is_op_determinism_enabled()
  yield
  if tf_config.is_op_determinism_enabled() and not was:
    tf_config.disable_op_determinism()


def call_main(mp, argv):
  """The binary's main() in this process on its own FlagValues (set into ban_tf.main
  with the MonkeyPatch `mp`); returns its exit code (0 when it returns).

  The callers' test targets depend on ban_tf.main, hence the import here rather than at the top.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ban_tf import main  # pylint: disable=g-import-not-at-top

  fv = flags.FlagValues()
  main.define_flags(fv)
  fv(["ban_tf"] + argv)
  mp.setattr(main, "FLAGS", fv)
  try:
    main.main(["ban_tf"])
    return 0
  except SystemExit as e:
    return e.code


def run_main(monkeypatch, capsys, argv):
  """Runs the binary's main() in this process (call_main); returns (exit code, stdout, stderr)."""
  capsys.readouterr()
  code = call_main(monkeypatch, argv)
  out = capsys.readouterr()
  return code, out.out, out.err


def run_main_once(argv, env=None):
  """call_main for module- and session-scoped fixtures (no function-scoped monkeypatch
  there): `env` set while it runs; FLAGS, the environment and TF's op determinism
  (--deterministic turns it on; such a fixture is set up before the autouse fixture
  above) restored after. Returns the exit code."""
  from tensorflow.python.framework import config as tf_config  # pylint: disable=g-import-not-at-top

  was = tf_config.is_op_determinism_enabled()
  mp = pytest.MonkeyPatch()
  for key, value in (env or {}).items():
    mp.setenv(key, value)
  try:
    return call_main(mp, argv)
  finally:
    mp.undo()
    if tf_config.is_op_determinism_enabled() and not was:
      tf_config.disable_op_determinism()


def config_of(argv):
  """The config.Config the binary's main() makes of `argv` (its flags, parsed on their own
  FlagValues): what a run directory fabricated for a main() call must record."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ban_tf import main  # pylint: disable=g-import-not-at-top

  fv = flags.FlagValues()
  main.define_flags(fv)
  fv(["ban_tf"] + argv)
  return main.config_from_flags(fv)


# ---- one tiny run per task, shared ------------------------------------------------
# The argument lists of the tests' tiny runs (add --gens, --run_dir, and what a test
# varies). Image: 256 fashion_mnist training images (64 more held out for val), 256 test
# images, the 1.5k-parameter `tiny` CNN, 3 epochs (the last two checkpoints differ from
# the final weights), --deterministic (a resumed run equals an uninterrupted one).
IMAGE_ARGS = [
  f"--data_dir={SHARED_TFDS}",
  "--dataset=fashion_mnist",
  "--arch=tiny",
  "--train_examples=256",
  "--val_examples=64",
  "--test_split=test[:256]",
  "--batch_size=32",
  "--epochs=3",
  "--verbose=0",
  "--deterministic",
]
_LM_WORDS = "the cat dog sat on mat a big small red ran fast slow house tree".split()
# The tiny language-model recipe (add --ptb_dir, --epochs and what a test varies): a one-layer
# 16-unit LSTM, BAN+L, plain SGD with clipping.
LM_ARGS = [
  "--task=lm",
  "--dataset=ptb",
  "--arch=lstm-1-16",
  "--batch_size=4",
  "--bptt=6",
  "--lr=1.0",
  "--momentum=0",
  "--weight_decay=0",
  "--clip_norm=5",
  "--loss=ban_l",
]


def lm_args(ptb_dir):
  """The tiny language-model run's arguments, over a generated PTB-format corpus written
  into `ptb_dir` (200/40/40 lines of 3-8 words of a 15-word vocabulary, seeded)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.RandomState(0)
  os.makedirs(ptb_dir, exist_ok=True)
  for name, lines in (("train", 200), ("valid", 40), ("test", 40)):
    with open(os.path.join(ptb_dir, f"ptb.{name}.txt"), "w") as f:
      for _ in range(lines):
        f.write(" " + " ".join(str(w) for w in rng.choice(_LM_WORDS, rng.randint(3, 9))) + " \n")
  return [f"--ptb_dir={ptb_dir}"] + LM_ARGS + ["--epochs=2", "--verbose=0"]


def copy_run(src, tmp_path, name="run"):
  """A copy of the run directory `src` at tmp_path/name (to damage, resume or rerun)."""
  dst = str(tmp_path / name)
  shutil.copytree(src, dst)
  return dst


@pytest.fixture(scope="session")
def finished_image_run(tmp_path_factory):
  """A finished, trained image run: IMAGE_ARGS + --gens=2 (Teacher, BAN-1, BAN-2, BANE-2),
  made once per test process, in it. Read it in place; copy_run it before changing anything."""
  run_dir = str(tmp_path_factory.mktemp("finished_image") / "run")
  assert run_main_once(IMAGE_ARGS + ["--gens=2", f"--run_dir={run_dir}"]) == 0
  return run_dir


@pytest.fixture(scope="session")
def fabricated_image_run(tmp_path_factory):
  """A finished image run of IMAGE_ARGS + --gens=2 made without training
  (tests/fabricate.py: untrained models of fashion_mnist's shape, made-up metrics, sealed
  by the same writer): main() and ban_tf.evaluate accept it as the run of those flags.
  Copy it (copy_run) before changing anything."""
  from tests import fabricate  # pylint: disable=g-import-not-at-top

  run_dir = str(tmp_path_factory.mktemp("fabricated_image") / "run")
  return fabricate.finished_run(run_dir, gens=2, cfg=config_of(IMAGE_ARGS + ["--gens=2"]))
