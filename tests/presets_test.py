"""Every paper preset in flags/paper/ parses with the real flags, validates and builds.

Models are only built (no training). Building the large DenseNets and matched WRNs
takes a few seconds each, so each distinct (architecture, classes) pair is built once.
Parameter counts come from the pure-Python `models.param_count` (tested equal to the
Keras count in models_test) and are compared with the paper's through
tools/paper_presets.py, whose table docs/presets.md must hold.
"""

import dataclasses
import functools
import glob
import os
import re
import shlex
import sys

import keras
import pytest
from absl import flags

from ban_tf import errors
from ban_tf import main as main_lib
from ban_tf import models
from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import paper_presets  # pylint: disable=g-import-not-at-top,wrong-import-position

# Table 6 (language models) presets are checked by tests/lm_test.py.
PRESETS = sorted(
  p
  for p in glob.glob(
    os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flags", "paper", "*.flags"
    )
  )
  if not os.path.basename(p).startswith("table6_")
)
# Every preset, Table 6's too (for what needs no model built).
_ALL_PRESETS = sorted(glob.glob(os.path.join(REPO, "flags", "paper", "*.flags")))
_CLASSES = {"cifar10": 10, "cifar100": 100}


@functools.cache  # a Config is frozen: parsed once per file
def _config(path):
  fv = flags.FlagValues()
  main_lib.define_flags(fv)
  fv(["prog", f"--flagfile={path}"])
  return main_lib.config_from_flags(fv)


def test_every_table_has_presets():
  names = [os.path.basename(p) for p in PRESETS]
  for table, count in (
    ("table1_", 8),
    ("table2_", 24),
    ("table3_", 12),
    ("table4_", 7),
    ("table5_", 6),
  ):
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
  # --teacher names another preset's run (test_one_teacher_per_row), not trained here.
  dataclasses.replace(cfg, teacher=None).validate()
  table = os.path.basename(path).split("_")[0]
  assert cfg.dataset == ("cifar10" if table == "table1" else "cifar100")
  loss = os.path.basename(path)[: -len(".flags")].split("_", 2)[-1]
  if loss in ("ban_l", "cwtm", "dkpp"):
    assert cfg.resolved_loss == loss
  if loss == "sequence":
    assert cfg.gens >= 2
  if table == "table5":
    assert cfg.share_stem_head and cfg.baseline and cfg.teacher_arch == "densenet-90-60"
  if table == "table4":
    assert cfg.teacher_arch == "densenet-90-60" and cfg.arch_for(0) == "densenet-90-60"
  # The paper trains on all 50,000 images: no hold-out, no subset.
  assert cfg.val_examples == 0 and cfg.train_examples == 0
  # Its teacher's and students' models are built by test_preset_models_build (slow).
  if cfg.share_stem_head:  # the shared layers must have the same shapes
    teacher_w = models.densenet_widths(cfg.teacher_arch)
    spec = models.parse_arch(cfg.arch_for(1))
    assert spec["stem"] == teacher_w["stem"] and spec["out"] == teacher_w["features"]


# Every (architecture, classes) a preset trains as teacher or student: full-size paper models.
_MODELS = sorted(
  {(c.arch_for(g), _CLASSES[c.dataset]) for p in PRESETS for c in [_config(p)] for g in (0, 1)}
)


@pytest.mark.slow  # full-size DenseNet-BC / WRN / ResNet models: ~1-10 s each to build
@pytest.mark.parametrize("arch, num_classes", _MODELS, ids=lambda v: str(v))
def test_preset_models_build(arch, num_classes):
  """Each model a preset trains builds, with one logit per class of its data set."""
  keras.backend.clear_session()
  model = models.build_model(arch, num_classes, (32, 32, 3))
  assert model.get_layer("logits").kernel.shape[-1] == num_classes


def _by_run_dir():
  return {c.run_dir: (os.path.basename(p), c) for p in PRESETS for c in [_config(p)] if c.run_dir}


def test_one_teacher_per_row():
  """Table 2's columns and sequence, Table 3's columns and Tables 4-5's students learn from
  the one teacher their row's *_teacher preset trains (gens=0), with its architecture."""
  teachers = _by_run_dir()
  for path in PRESETS:
    name = os.path.basename(path)[: -len(".flags")]
    cfg = _config(path)
    table = name.split("_")[0]
    if name.endswith("_teacher"):
      assert cfg.gens == 0 and not cfg.teacher and cfg.run_dir == f"runs/paper/{name}"
      continue
    if table in ("table1", "table6"):  # one column per row: teacher and student in one run
      assert not cfg.teacher
      continue
    assert cfg.teacher and cfg.teacher.endswith("/gen_0"), name
    assert cfg.run_dir == f"runs/paper/{name}"  # every column has its own run directory
    teacher_file, teacher = teachers[os.path.dirname(cfg.teacher)]
    row = (
      "_".join(name.split("_")[:2]) if table in ("table2", "table3") else "table2_densenet-90-60"
    )
    assert teacher_file == f"{row}_teacher.flags", name
    assert teacher.dataset == cfg.dataset and teacher.arch_for(0) == cfg.arch_for(0), name
    if (
      table == "table3"
    ):  # the WRN paper's dropout for the WRN teacher; the DenseNet student has none
      assert teacher.dropout_for(0) == 0.3
      assert cfg.dropout_for(1) == (0.3 if name.endswith("_ban") else 0.0)
  # BAN and BAN-1 of one teacher have different seeds.
  for row in ("densenet-112-33", "densenet-90-60", "densenet-80-80", "densenet-80-120"):
    ban = _config(os.path.join(REPO, "flags", "paper", f"table2_{row}_ban.flags"))
    seq = _config(os.path.join(REPO, "flags", "paper", f"table2_{row}_sequence.flags"))
    assert ban.teacher == seq.teacher and ban.seed_for(1) != seq.seed_for(1)
    assert seq.seed_for(1) not in [ban.seed_for(g) for g in range(ban.gens + 1)]


@pytest.mark.parametrize("name", ["cifar10.flags", "cifar100.flags"])
def test_short_presets_use_all_training_images(name):
  cfg = _config(os.path.join(REPO, "flags", name))
  cfg.validate()
  assert cfg.val_examples == 0 and cfg.train_examples == 0


def test_table4_students():
  want = {
    "0.5x-depth": ("densenet-46-120", (7, 7, 7), 120, 0.5),
    "2x-depth": ("densenet-172-30", (28, 28, 28), 30, 0.5),
    "3x-depth": ("densenet-256-20", (42, 42, 42), 20, 0.5),
    "4x-depth": ("densenet-340-15", (56, 56, 56), 15, 0.5),
    "0.5x-compression": ("densenet-90-60-c0.25", (14, 14, 14), 60, 0.25),
    "0.75x-compression": ("densenet-90-60-c0.375", (14, 14, 14), 60, 0.375),
    "1.5x-compression": ("densenet-90-60-c0.75", (14, 14, 14), 60, 0.75),
  }
  for row, (arch, layers, growth, compression) in want.items():
    cfg = _config(os.path.join(REPO, "flags", "paper", f"table4_{row}.flags"))
    assert cfg.arch_for(1) == arch and cfg.arch_for(0) == "densenet-90-60"
    spec = models.parse_arch(arch)
    assert (spec["layers_per_block"], spec["growth"], spec["compression"]) == (
      layers,
      growth,
      compression,
    )
    if row.endswith("depth"):  # every block adds the teacher's 14 x 60 channels
      assert sum(layers) * growth == 3 * 14 * 60


# Presets whose parameter count lands within 3% of the paper's; every other one says in
# its header or in docs/presets.md why it cannot (DenseNet-90/80 by the (D-4)//6 reading,
# Table 4's deeper and compressed students, Table 5's 0.5 ratio and Pre-ResNets).
_WITHIN_3PCT = (
  "table1_densenet-112-33",
  "table2_densenet-112-33",
  "table1_wrn",
  "table3_wrn-28-1_ban",
  "table3_wrn-28-2_ban",
  "table3_wrn-28-5_ban",
  "table3_wrn-28-10_ban",
  "table4_0.5x-depth",
  "table5_match-wide-resnet-2-1",
  "table5_wide-resnet-1-1",
  "table5_wide-resnet-4-1",
  "table6_",
)


def test_presets_table_counts():
  rows = {r["file"]: r for r in paper_presets.rows()}
  assert len(rows) == len(glob.glob(os.path.join(REPO, "flags", "paper", "*.flags")))
  for name, r in rows.items():
    assert r["params"] > 0 and r["paper_params"] > 0 and r["result"]
    if name.startswith(_WITHIN_3PCT):
      assert abs(r["diff"]) < 3.0, (name, r["params"])
  assert rows["table6_lstm.flags"]["params"] == 51_022_000  # tied 2 x 1500, V = 10,000
  assert rows["table4_0.5x-depth.flags"]["params"] == 21_213_220
  assert rows["table5_wide-resnet-4-1.flags"]["params"] == models.param_count(
    "wrnw-4-120-480-660-750-1500", 100
  )


def test_docs_presets_table_is_current():
  with open(os.path.join(REPO, "docs", "presets.md")) as f:
    assert paper_presets.presets_table() in f.read(), (
      "rerun python tools/paper_presets.py into docs/presets.md"
    )


@pytest.mark.parametrize(
  "argv,fragment",
  [
    (["--arch=wrn-28-1", "--densenet_compression=0.25"], "needs a DenseNet"),
    (["--arch=densenet-90-60-c0.75", "--densenet_compression=0.25"], "already names"),
    (["--arch=densenet-90-60", "--densenet_compression=0"], "must be in (0, 1]"),
    (["--arch=densenet-90-60", "--densenet_compression=1.5"], "must be in (0, 1]"),
    (
      ["--task=lm", "--dataset=tiny_shakespeare", "--arch=lstm-1-8", "--densenet_compression=0.25"],
      "image-only",
    ),
  ],
)
def test_densenet_compression_usage_errors(argv, fragment):
  fv = flags.FlagValues()
  main_lib.define_flags(fv)
  fv(["prog", *argv])
  with pytest.raises(errors.UsageError) as err:
    main_lib.config_from_flags(fv).validate()
  assert fragment in str(err.value) and "--densenet_compression" in str(err.value)
  assert "\n" not in str(err.value)


def test_densenet_compression_scope():
  """The flag applies to --arch: every generation without --teacher_arch, only students with it."""
  fv = flags.FlagValues()
  main_lib.define_flags(fv)
  fv(["prog", "--arch=densenet-10-4", "--densenet_compression=0.75"])
  cfg = main_lib.config_from_flags(fv)
  cfg.validate()
  assert cfg.arch_for(0) == cfg.arch_for(2) == "densenet-10-4-c0.75"
  cfg = dataclasses.replace(cfg, teacher_arch="densenet-10-4")
  assert (cfg.arch_for(0), cfg.arch_for(1)) == ("densenet-10-4", "densenet-10-4-c0.75")


def _header(path):
  with open(path) as f:
    lines = f.read().splitlines()
  return lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]


def _commands(header):
  """The Configs of the `python -m ban_tf.main ...` lines of a header, parsed by the real flags
  (run from the repository root, as the headers say)."""
  out = []
  for line in header:
    if line.startswith("#   python -m ban_tf.main "):
      fv = flags.FlagValues()
      main_lib.define_flags(fv)
      args = shlex.split(line[len("#   python -m ban_tf.main ") :])
      args = [a.replace("--flagfile=", f"--flagfile={REPO}/", 1) for a in args]
      fv(["prog", *args, "--ptb_dir=/ptb"])  # Table 6's (the header's first line says to add it)
      out.append((args, main_lib.config_from_flags(fv)))
  return out


def test_every_header_ends_with_its_seeds_grade_commands():
  """The generated lines (tools/paper_presets.py --headers) close every preset's header."""
  configs = {os.path.basename(p)[: -len(".flags")]: _config(p) for p in _ALL_PRESETS}
  for path in _ALL_PRESETS:
    name = os.path.basename(path)[: -len(".flags")]
    want = paper_presets.seeds_header(name, configs)
    assert _header(path)[-len(want) :] == want, (
      f"{name}: rerun python tools/paper_presets.py --headers"
    )


@pytest.mark.parametrize("path", _ALL_PRESETS, ids=os.path.basename)
def test_seeds_grade_commands_are_literally_right(path):
  """Each command of a header runs what it says: this preset (or its row's teacher preset)
  with --seeds=N into its own run directory; a column's {seed} teacher of every seed is
  generation 0 of that seed's run of the teacher command."""
  name = os.path.basename(path)[: -len(".flags")]
  cfg = _config(path)
  commands = _commands(_header(path))
  (args, mine), teacher_cmd = commands[-1], commands[:-1]
  assert args[0] == f"--flagfile={REPO}/flags/paper/{name}.flags"
  assert mine.seeds == paper_presets.SEEDS >= 2
  # Its own run directory: the one-seed run's config.json (another --teacher) would refuse it.
  assert mine.run_dir == (cfg.run_dir or f"runs/paper/{name}") + "_seeds" != cfg.run_dir
  # Nothing else changes: the seeds-grade run is this preset's experiment.
  same = dict(seeds=1, run_dir=cfg.run_dir, teacher=cfg.teacher, ptb_dir=cfg.ptb_dir)
  assert dataclasses.replace(mine, **same) == cfg
  if not cfg.teacher:
    assert not teacher_cmd and mine.teacher_per_seed
    return
  ((targs, teacher),) = teacher_cmd
  teacher_file, one_seed_teacher = _by_run_dir()[os.path.dirname(cfg.teacher)]
  assert targs[0] == f"--flagfile={REPO}/flags/paper/{teacher_file}"
  # The teacher preset's own header gives the same command.
  assert _commands(_header(os.path.join(REPO, "flags", "paper", teacher_file))) == [
    (targs, teacher)
  ]
  assert teacher.seeds == mine.seeds and teacher.gens == 0
  assert teacher.run_dir == one_seed_teacher.run_dir + "_seeds"
  assert mine.teacher == teacher.run_dir + "/seed_{seed}/gen_0"
  assert mine.teacher_per_seed and mine.seeds_note() is None
  # Every seed of the column imports generation 0 of the same seed's teacher run.
  assert teacher.seed_list() == mine.seed_list()
  for column, row in zip(mine.seed_runs(), teacher.seed_runs()):
    assert column.seed == row.seed
    assert column.resolved_teacher == os.path.join(row.run_dir, "gen_0")


_RECIPES = sorted(
  glob.glob(os.path.join(REPO, "flags", "imagenet_*.flags"))
  + glob.glob(os.path.join(REPO, "flags", "imagenette_*.flags"))
)


def test_imagenet_style_recipes_exist():
  names = [os.path.basename(p) for p in _RECIPES]
  assert "imagenet_resnet50.flags" in names
  assert any(n.startswith("imagenette_") for n in names)


@pytest.mark.parametrize("path", _RECIPES, ids=os.path.basename)
def test_imagenet_style_recipe(path):
  """The ImageNet-style recipes (issue 24) parse, validate without TensorFlow, name a
  keras:NAME backbone and follow the standard ResNet-50 recipe's optimisation: SGD
  momentum 0.9 (no Nesterov), lr 0.1 x batch/256, linear warm-up, weight decay 1e-4;
  their headers state the expected Teacher accuracy's source, the cost and the hardware."""
  from ban_tf import archs  # pylint: disable=g-import-not-at-top

  header = "".join(l for l in open(path) if l.startswith("#"))
  for part in ("Expected Teacher", "Cost and hardware"):
    assert part in header, (path, part)
  cfg = _config(path)
  cfg.validate()
  assert archs.is_keras_arch(cfg.arch) and cfg.image_size
  archs.check_image_size(cfg.arch, cfg.image_size)
  assert cfg.lr == pytest.approx(0.1 * cfg.batch_size / 256)
  assert (cfg.momentum, cfg.nesterov, cfg.weight_decay) == (0.9, False, 1e-4)
  assert cfg.warmup_epochs > 0 and cfg.lr_schedule in ("step", "cosine")
  assert cfg.init_weights is None  # from scratch, as the paper's BAN
  assert cfg.resolved_augment == "inception"  # random-resized crop + flip, centre-crop evaluation
  if os.path.basename(path) == "imagenet_resnet50.flags":
    assert (cfg.arch, cfg.epochs, cfg.batch_size, cfg.image_size) == (
      "keras:ResNet50",
      90,
      256,
      (224, 224),
    )
    # Step decay /10 at epochs 30, 60 and 80, as tasks/image.py rounds the milestones.
    assert [int(round(m * cfg.epochs)) for m in cfg.lr_milestones] == [30, 60, 80]
    assert cfg.lr_decay == 0.1
  else:
    assert cfg.image_size == (160, 160)
