"""Every paper preset in flags/paper/ parses with the real flags, validates and builds.

Models are only built (no training, no parameter counting). Building the large
DenseNets and matched WRNs takes a few seconds each, so each distinct
(architecture, classes) pair is built once.
"""

import glob
import os
import re

import keras
import pytest
from absl import flags

from ban_tf import main as main_lib
from ban_tf import models

# Table 6 (language models) presets are checked by tests/lm_test.py.
PRESETS = sorted(p for p in glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                   "flags", "paper", "*.flags"))
                 if not os.path.basename(p).startswith("table6_"))
_CLASSES = {"cifar10": 10, "cifar100": 100}
_BUILT = set()


def _config(path):
  fv = flags.FlagValues()
  main_lib.define_flags(fv)
  fv(["prog", f"--flagfile={path}"])
  return main_lib.config_from_flags(fv)


def test_every_table_has_presets():
  names = [os.path.basename(p) for p in PRESETS]
  for table, count in (("table1_", 8), ("table2_", 20), ("table3_", 8), ("table5_", 6)):
    assert sum(n.startswith(table) for n in names) == count, table
  for loss in ("ban", "ban_l", "cwtm", "dkpp", "sequence"):
    assert "table2_densenet-112-33_" + loss + ".flags" in names


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset(path):
  first = open(path).readline()
  # Starts with a comment naming the paper's table and the number to approach.
  assert first.startswith("# Paper Table "), first
  assert re.search(r"\d+\.\d+%", first), first
  cfg = _config(path)
  cfg.validate()
  table = os.path.basename(path).split("_")[0]
  assert cfg.dataset == ("cifar10" if table == "table1" else "cifar100")
  num_classes = _CLASSES[cfg.dataset]
  loss = os.path.basename(path)[:-len(".flags")].split("_", 2)[-1]
  if loss in ("ban_l", "cwtm", "dkpp"):
    assert cfg.resolved_loss == loss
  if loss == "sequence":
    assert cfg.gens >= 2
  if table == "table5":
    assert cfg.share_stem_head and cfg.baseline and cfg.teacher_arch == "densenet-90-60"
  for gen in (0, 1):
    arch = cfg.arch_for(gen)
    if (arch, num_classes) in _BUILT:
      continue
    keras.backend.clear_session()
    model = models.build_model(arch, num_classes, (32, 32, 3))
    assert model.get_layer("logits").kernel.shape[-1] == num_classes
    _BUILT.add((arch, num_classes))
  if cfg.share_stem_head:  # the shared layers must have the same shapes
    teacher_w = models.densenet_widths(cfg.teacher_arch)
    spec = models.parse_arch(cfg.arch_for(1))
    assert spec["stem"] == teacher_w["stem"] and spec["out"] == teacher_w["features"]
