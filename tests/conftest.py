"""Test setup: three logical CPU devices (1- vs 2- vs 3-replica tests), one shared strategy each, quiet TF logs.

Runs before any test module imports TensorFlow, so the logical device
configuration can still be applied.
"""

import os
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
  """call_main for module-scoped fixtures (no function-scoped monkeypatch there): `env`
  set while it runs; FLAGS and the environment restored after. Returns the exit code."""
  mp = pytest.MonkeyPatch()
  for key, value in (env or {}).items():
    mp.setenv(key, value)
  try:
    return call_main(mp, argv)
  finally:
    mp.undo()
