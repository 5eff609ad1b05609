"""--strategy=multi_worker end to end: two worker processes on 127.0.0.1 (CPU).

Runs the teacher and one BAN generation (tiny net, 128 fashion_mnist examples, one
epoch, 200 test images) and checks that both workers end each generation with identical
weights (the chief's metrics.json digest against the other worker's log line), that only
the chief wrote the run directory, and that every output was written once.
"""

import glob
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.conftest import SHARED_TFDS

pytestmark = pytest.mark.slow  # end to end: trains and exports (pytest -m "not slow" skips it)

_DIGEST = re.compile(r"gen (\d+) \(\S+\) done: .* weights sha256 ([0-9a-f]{64})")


def _free_ports(n):
  socks = []
  for _ in range(n):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


@pytest.mark.skipif(
  not os.path.isdir(os.path.join(SHARED_TFDS, "fashion_mnist")),
  reason="needs the shared fashion_mnist TFDS directory",
)
def test_two_workers_train_identical_weights_and_chief_writes_once(tmp_path):
  run_dir = tmp_path / "run"
  cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
  procs = []
  for index in range(2):
    env = dict(
      os.environ,
      TF_CPP_MIN_LOG_LEVEL="2",
      CUDA_VISIBLE_DEVICES="",
      TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
      TMPDIR=str(tmp_path),
    )  # worker-private directories land here, so the test can see them
    cmd = [
      sys.executable,
      "-m",
      "ban_tf.main",
      "--strategy=multi_worker",
      "--arch=tiny",
      "--dataset=fashion_mnist",
      f"--data_dir={SHARED_TFDS}",
      "--train_examples=128",
      "--test_split=test[:200]",  # 200 test images, not 10,000: a 2-process eval is slow
      "--epochs=1",
      "--gens=1",
      "--batch_size=32",
      f"--run_dir={run_dir}",
      "--verbose=0",
      "--logtostderr",
    ]
    log = open(tmp_path / f"worker{index}.log", "w")
    procs.append(
      (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    )
  try:
    codes = [p.wait(timeout=600) for p, _ in procs]
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.kill()
      log.close()
  logs = [open(tmp_path / f"worker{i}.log").read() for i in range(2)]
  assert codes == [0, 0], "\n".join(l[-3000:] for l in logs)

  # Identical weights: the chief's recorded digest equals the one the other worker logged.
  for gen in (0, 1):
    chief = json.load(open(run_dir / f"gen_{gen}" / "metrics.json"))["weights_sha256"]
    digests = [dict(_DIGEST.findall(log)).get(str(gen)) for log in logs]
    assert digests == [chief, chief], (gen, digests, chief)

  # Written once, by the chief only; the other worker's private directory is gone.
  names = sorted(os.listdir(run_dir))
  assert names == [
    ".lock",
    "config.json",
    "gen_0",
    "gen_1",
    "log.txt",
    "manifest.json",
    "report.png",
    "results.json",
    "results.md",
    "tb",
  ]
  for gen, name in ((0, "Teacher"), (1, "BAN-1")):
    scalars = [
      f
      for f in glob.glob(str(run_dir / "tb" / name / "events.out.tfevents.*"))
      if not f.endswith(".hparams")
    ]
    assert len(scalars) == 1, scalars
    assert not os.path.exists(run_dir / f"gen_{gen}" / "ckpt")
  assert not glob.glob(str(tmp_path / "ban_tf_worker*"))
