"""Damaged files, swapped models, bad paths and lost rows (issue 16, docs/reliability.md).

Every input is a case with its exit code and its one `error: ...` line (or, where
the damage is recovered, its warning). Damaged finished runs are copies of conftest's
fabricated_image_run (Teacher, BAN-1, BAN-2 and BANE-2 sealed without training, with
their true test accuracies). Checkpoint fallback is training, so two small runs are made
once per module, in-process:
  partial:   a teacher stopped by a full disk before epoch 3's checkpoint, so
             gen_0/ckpt holds ckpt-1 and ckpt-2 and no generation is DONE;
  reference: the same teacher uninterrupted, which a recovered resume must equal.
Each kind of checkpoint damage, and the repair, is a unit test in rundir_test.py.
"""

import json
import logging
import os
import shutil
import subprocess

from absl import flags
import pytest

from ban_tf import config as config_lib
from ban_tf import evaluate
from ban_tf import main
from tests.conftest import IMAGE_ARGS
from tests.conftest import SHARED_TFDS
from tests.conftest import copy_run
from tests.conftest import run_main
from tests.conftest import run_main_once

FINISHED = IMAGE_ARGS + ["--gens=2"]  # the flags of conftest's finished runs
PARTIAL = IMAGE_ARGS + ["--gens=0"]  # a 3-epoch teacher
BASE = IMAGE_ARGS + ["--epochs=1", "--val_examples=0"]  # for refusals before any training


def _main(argv, monkeypatch, capsys):
  """The binary's main() in-process; (exit code, stderr)."""
  code, _, err = run_main(monkeypatch, capsys, argv)
  return code, err


def _evaluate(argv, capsys):
  """ban_tf.evaluate's CLI in-process; (exit code, stdout, stderr)."""
  fv = flags.FlagValues()
  evaluate.define_flags(fv)
  fv(["evaluate"] + argv)
  capsys.readouterr()
  code = evaluate.cli(["evaluate"], fv)
  out = capsys.readouterr()
  return code, out.out, out.err


def _error_line(stderr, *needles):
  lines = [l for l in stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, stderr
  for needle in needles:
    assert needle in lines[0], lines[0]
  assert "Traceback" not in stderr
  return lines[0]


def _make(tmp_path_factory, name, argv, fault=None):
  run_dir = str(tmp_path_factory.mktemp(name) / "run")
  code = run_main_once(argv + [f"--run_dir={run_dir}"], {"BAN_TF_FAULT": fault} if fault else None)
  assert code == 0 or (fault and code == 2), code
  return run_dir


@pytest.fixture
def finished(fabricated_image_run):
  """A finished run of FINISHED, made without training (read it; _copy it to damage it)."""
  return fabricated_image_run


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
  run_dir = _make(tmp_path_factory, "partial", PARTIAL, fault="enospc@gen_0/epoch_3")
  ckpt = os.path.join(run_dir, "gen_0", "ckpt")
  assert sorted(n for n in os.listdir(ckpt) if n.endswith(".index")) == [
    "ckpt-1.index",
    "ckpt-2.index",
  ]
  assert not os.path.exists(os.path.join(run_dir, "gen_0", "DONE"))
  return run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """gen_0/metrics.json of the partial run's experiment, uninterrupted."""
  run_dir = _make(tmp_path_factory, "reference", PARTIAL)
  return json.load(open(os.path.join(run_dir, "gen_0", "metrics.json")))


def _copy(src, tmp_path):
  return copy_run(src, tmp_path)


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _rows(run_dir):
  res = json.load(open(os.path.join(run_dir, "results.json")))
  return ({g["gen"]: g for g in res["generations"]}, {e["name"]: e for e in res["ensembles"]})


# ---- finished runs: swapped, truncated and damaged files ---------------------------


def _swap_gen0_saved_model(run):  # the fingerprint file travels with the directory
  shutil.rmtree(os.path.join(run, "gen_0", "saved_model"))
  shutil.copytree(
    os.path.join(run, "gen_1", "saved_model"), os.path.join(run, "gen_0", "saved_model")
  )


def _swap_gen0_only_gen0_done(run):  # gens 1-3 would be trained from the wrong teacher
  for name in ("gen_1", "gen_2", "ensemble_2"):
    shutil.move(os.path.join(run, name), os.path.join(run, f"old_{name}"))
  shutil.rmtree(os.path.join(run, "gen_0", "saved_model"))
  shutil.copytree(
    os.path.join(run, "old_gen_1", "saved_model"), os.path.join(run, "gen_0", "saved_model")
  )


def _swap_gen1_keras_no_ensembles(run):
  shutil.copy(os.path.join(run, "gen_2", "model.keras"), os.path.join(run, "gen_1", "model.keras"))
  shutil.rmtree(os.path.join(run, "ensemble_2"))


def _truncate_gen1_keras(run):
  path = os.path.join(run, "gen_1", "model.keras")
  os.truncate(path, os.path.getsize(path) // 3)
  shutil.rmtree(os.path.join(run, "ensemble_2"))


def _write(rel, data):
  def damage(run):
    with open(os.path.join(run, rel), "wb") as f:
      f.write(data)

  return damage


RANDOM = bytes((i * 97 + 13) % 256 for i in range(300))


@pytest.mark.parametrize(
  "damage,needles",
  [
    (
      _swap_gen0_saved_model,
      ["gen_0/saved_model is not the model this run recorded for gen_0", "manifest.json"],
    ),
    (_swap_gen0_only_gen0_done, ["gen_0/saved_model is not the model this run recorded for gen_0"]),
    (_swap_gen1_keras_no_ensembles, ["gen_1/model.keras is not the model.keras this run recorded"]),
    (_truncate_gen1_keras, ["gen_1/model.keras is not the model.keras this run recorded"]),
    (
      _write("gen_1/metrics.json", b'{"gen": 1, "test_'),
      ["gen_1/metrics.json is damaged (JSONDecodeError", "delete gen_1/"],
    ),
    (_write("config.json", RANDOM), ["config.json is damaged", "--overwrite"]),
    (
      _write("config.json", b"[1, 2, 3]\n"),
      ["config.json is damaged (a JSON list, not an object)"],
    ),
    (_write("manifest.json", b"{}"), ["manifest.json is damaged"]),
  ],
  ids=[
    "swap_gen0_saved_model",
    "swap_gen0_only_gen0_done",
    "swap_gen1_keras",
    "truncated_gen1_keras",
    "gen1_metrics_json",
    "config_random_bytes",
    "config_json_list",
    "manifest_damaged",
  ],
)
def test_damaged_finished_run_is_refused_and_changes_nothing(
  finished, tmp_path, monkeypatch, capsys, damage, needles
):
  run = _copy(finished, tmp_path)
  damage(run)
  before = {n: _read(os.path.join(run, n)) for n in ("results.json", "results.md", "manifest.json")}
  code, err = _main(FINISHED + [f"--run_dir={run}", "--gens=3"], monkeypatch, capsys)
  assert code == 2
  _error_line(err, *needles)
  assert {n: _read(os.path.join(run, n)) for n in before} == before  # results keep every row
  assert not os.path.exists(os.path.join(run, "gen_3"))


@pytest.mark.slow
def test_damaged_ensemble_metrics_is_rebuilt_with_a_warning(
  finished, tmp_path, monkeypatch, capsys, caplog
):
  run = _copy(finished, tmp_path)
  _write("ensemble_2/metrics.json", b"not json")(run)
  before = _rows(run)[1]["BANE-2"]
  with caplog.at_level(logging.WARNING, logger="absl"):
    code, err = _main(FINISHED + [f"--run_dir={run}"], monkeypatch, capsys)
  assert code == 0, err
  assert "ensemble_2/metrics.json is damaged" in caplog.text and "rebuilding BANE-2" in caplog.text
  after = _rows(run)[1]["BANE-2"]
  assert after["test_accuracy"] == before["test_accuracy"] and "damaged" not in after


def test_smaller_gens_and_a_damaged_later_generation_keep_every_row(
  finished, tmp_path, monkeypatch, capsys
):
  run = _copy(finished, tmp_path)
  gens, ensembles = _rows(run)
  _write("gen_1/metrics.json", b"{broken")(run)  # not used by --gens=0, but its row must survive
  code, err = _main(FINISHED + [f"--run_dir={run}", "--gens=0"], monkeypatch, capsys)
  assert code == 0, err
  gens2, ensembles2 = _rows(run)
  assert sorted(gens2) == [0, 1, 2] and sorted(ensembles2) == ["BANE-2"]
  assert gens2[2] == gens[2] and gens2[0] == gens[0] and ensembles2 == ensembles
  assert gens2[1]["test_error"] == gens[1]["test_error"]
  assert "gen_1/metrics.json is damaged" in gens2[1]["damaged"]
  md = open(os.path.join(run, "results.md")).read()
  assert "| BAN-1 (damaged) |" in md and "| BANE-2 |" in md and "previous results.json" in md


# ---- paths, sizes and flag combinations: refused before any data is loaded ----------


@pytest.fixture
def read_only_dir(tmp_path):
  path = tmp_path / "ro"
  path.mkdir()
  if (
    subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True
    ).returncode
    != 0
  ):
    pytest.skip("cannot mount a read-only tmpfs (needs root)")
  yield str(path)
  subprocess.run(["umount", str(path)], check=True)


def test_run_dir_that_is_a_file_or_under_a_file(tmp_path, monkeypatch, capsys):
  f = tmp_path / "file"
  f.write_text("x")
  code, err = _main(BASE + ["--gens=0", f"--run_dir={f}"], monkeypatch, capsys)
  assert code == 2
  _error_line(err, f"--run_dir={f} is an existing file")
  code, err = _main(BASE + ["--gens=0", f"--run_dir={f}/run"], monkeypatch, capsys)
  assert code == 2
  _error_line(err, f"{f} is a file, so no directory can be made under it")
  assert f.read_text() == "x"


def test_run_dir_on_a_read_only_file_system(read_only_dir, monkeypatch, capsys):
  code, err = _main(BASE + ["--gens=0", f"--run_dir={read_only_dir}/run"], monkeypatch, capsys)
  assert code == 2
  _error_line(err, f"{read_only_dir} is not writable")


@pytest.mark.parametrize(
  "argv,needles",
  [
    (
      ["--train_examples=100000"],
      ["--train_examples=100000 exceeds the 60000 training examples", "use at most 60000"],
    ),
    (
      ["--train_examples=59990", "--val_examples=20"],
      ["exceeds the 59980 training examples", "--val_examples=20 are held out"],
    ),
    (
      ["--teacher_arch=tiny", "--arch=wrn-10-1", "--share_stem_head"],
      [
        "--share_stem_head: the teacher tiny has stem width 8 and 16 features",
        "student wrn-10-1 has 16 and 64",
      ],
    ),
    (
      ["--teacher_arch=tiny", "--arch=wrn-10-1", "--feature_weight=1"],
      [
        "--feature_weight: the student wrn-10-1 has 64 features but the teacher tiny has 16",
        "add --feature_projection",
      ],
    ),
  ],
)
def test_sizes_and_widths_are_refused_before_training(tmp_path, monkeypatch, capsys, argv, needles):
  run = tmp_path / "run"
  code, err = _main(
    [a for a in BASE if not a.startswith("--train_examples")]
    + ["--gens=1", f"--run_dir={run}"]
    + (
      argv
      if any(a.startswith("--train_examples") for a in argv)
      else ["--train_examples=256"] + argv
    ),
    monkeypatch,
    capsys,
  )
  assert code == 2
  _error_line(err, *needles)
  assert not run.exists()


def test_widths_from_names_equal_the_built_models():
  from ban_tf import archs, models  # pylint: disable=g-import-not-at-top

  for arch in (
    "tiny",
    "wrn-10-2",
    "preact-resnet-8",
    "densenet-10-4",
    "densenet-1-2-1-4-c0.75",
    "wrnw-1-8-8-12-16",
    "prebw-1-8-8-12-16-20",
  ):
    m = models.build_model(arch, 10, (8, 8, 3))
    built = {
      "stem": m.get_layer("stem").output.shape[-1],
      "features": m.get_layer("features").output.shape[-1],
    }
    assert archs.widths(arch) == built, arch


def test_feature_projection_fix_is_accepted(tmp_path):
  from ban_tf import config  # pylint: disable=g-import-not-at-top

  config.Config(
    teacher_arch="tiny",
    arch="wrn-10-1",
    feature_weight=1.0,
    feature_projection=True,
    run_dir=str(tmp_path),
  ).validate()


def test_missing_flagfile_is_one_clean_line(capsys):
  with pytest.raises(SystemExit) as e:
    main._parse(["ban_tf", "--flagfile=/no/such.flags"])
  assert e.value.code == 2
  line = _error_line(capsys.readouterr().err, "Unable to open flagfile", "/no/such.flags")
  assert "ERROR" not in line


# ---- checkpoints: an unreadable newest one falls back to the previous one -------------


def _truncate_newest_data(ckpt):
  path = os.path.join(ckpt, "ckpt-2.data-00000-of-00001")
  os.truncate(path, os.path.getsize(path) // 3)


def _empty_newest_index(ckpt):
  os.truncate(os.path.join(ckpt, "ckpt-2.index"), 0)


@pytest.mark.slow
def test_unreadable_newest_checkpoint_falls_back_repairs_and_resumes_bit_identically(
  partial, reference, tmp_path, monkeypatch, capsys, caplog
):
  """main() falls back from a truncated ckpt-2 to ckpt-1, repairs the index before training
  (a kill right then resumes cleanly), and the resumed teacher equals the uninterrupted one.
  Every other kind of damage (an empty index file, a deleted newest checkpoint, a garbled
  `checkpoint` file) takes the same fallback: rundir_test's unit tests."""
  from ban_tf import train  # pylint: disable=g-import-not-at-top

  run = _copy(partial, tmp_path)
  ckpt = os.path.join(run, "gen_0", "ckpt")
  _truncate_newest_data(ckpt)
  seen = []
  real = train._restore  # pylint: disable=protected-access

  def restore_then_look(gen, built):
    out = real(gen, built)
    seen.append((open(os.path.join(ckpt, "checkpoint")).read(), sorted(os.listdir(ckpt))))
    return out

  monkeypatch.setattr(train, "_restore", restore_then_look)
  with caplog.at_level(logging.INFO, logger="absl"):
    code, err = _main(PARTIAL + [f"--run_dir={run}"], monkeypatch, capsys)
  assert code == 0, err
  assert "gen_0/ckpt/ckpt-2 is unreadable" in caplog.text
  assert "gen 0: resuming from epoch 1" in caplog.text
  index, files = seen[0]
  assert 'model_checkpoint_path: "ckpt-1"' in index and "ckpt-2" not in index
  assert not [f for f in files if f.startswith("ckpt-2")]
  metrics = json.load(open(os.path.join(run, "gen_0", "metrics.json")))
  assert metrics["weights_sha256"] == reference["weights_sha256"]
  assert metrics["test_accuracy"] == reference["test_accuracy"]


@pytest.mark.parametrize(
  "damage,needles",
  [
    (
      lambda run: [
        _empty_newest_index(os.path.join(run, "gen_0", "ckpt")),
        os.truncate(os.path.join(run, "gen_0", "ckpt", "ckpt-1.index"), 0),
      ],
      [
        "gen_0/ckpt holds no readable checkpoint",
        "ckpt-2 is unreadable",
        "ckpt-1 is unreadable",
        "retrain this generation from epoch 0",
      ],
    ),
    (
      _write("gen_0/history.json", b"[{]"),
      ["gen_0/history.json is damaged (JSONDecodeError", "retrain this generation from epoch 0"],
    ),
    (
      _write("gen_0/history.json", b'{"epoch": 1}'),
      ["gen_0/history.json is damaged (a JSON dict, not a list)"],
    ),
  ],
  ids=["no_readable_checkpoint", "history_invalid_json", "history_not_a_list"],
)
def test_unrecoverable_checkpoint_state_is_one_line(
  partial, tmp_path, monkeypatch, capsys, damage, needles
):
  run = _copy(partial, tmp_path)
  damage(run)
  code, err = _main(PARTIAL + [f"--run_dir={run}"], monkeypatch, capsys)
  assert code == 2
  _error_line(err, *needles)
  assert not os.path.exists(os.path.join(run, "gen_0", "DONE"))


def test_fp16_loss_scale_is_checkpointed(tmp_path):
  """A LossScaleOptimizer's dynamic scale of 8192 restores as 8192 (not the initial 2^15)."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ban_tf import config, data, tasks, train  # pylint: disable=g-import-not-at-top

  cfg = config.Config(arch="tiny", batch_size=32, epochs=1, mixed_precision="fp16")
  ds = data.Dataset("fashion_mnist", SHARED_TFDS, train_examples=64)
  spec = train.GenerationSpec.generation(cfg, 0, str(tmp_path / "gen_0"))
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    task = tasks.get("image")
    built = train._build(cfg, task, spec, tf.distribute.get_strategy(), ds, 2)  # pylint: disable=protected-access
    assert isinstance(built.model.optimizer, keras.optimizers.LossScaleOptimizer)
    built.model.optimizer.dynamic_scale.assign(8192.0)
    built.model.optimizer.step_counter.assign(7)
    path = built.ckpt.save(str(tmp_path / "ckpt"))
    again = train._build(cfg, task, spec, tf.distribute.get_strategy(), ds, 2)  # pylint: disable=protected-access
    assert float(again.model.optimizer.dynamic_scale.numpy()) == 2.0**15
    again.ckpt.restore(path).assert_existing_objects_matched()
    assert float(again.model.optimizer.dynamic_scale.numpy()) == 8192.0
    assert int(again.model.optimizer.step_counter.numpy()) == 7
  finally:
    keras.mixed_precision.set_global_policy("float32")


# ---- ban_tf.evaluate: the same contract, per-generation damage ------------------------


def _delete_variables(run):
  d = os.path.join(run, "gen_1", "saved_model", "variables")
  for name in os.listdir(d):
    os.remove(os.path.join(d, name))


def _truncate_pb(run):
  path = os.path.join(run, "gen_1", "saved_model", "saved_model.pb")
  os.truncate(path, os.path.getsize(path) // 3)


def _scramble_variables(run):
  path = os.path.join(run, "gen_1", "saved_model", "variables", "variables.data-00000-of-00001")
  size = os.path.getsize(path)
  with open(path, "wb") as f:
    f.write(bytes((i * 37 + 11) % 251 for i in range(size)))


@pytest.mark.parametrize(
  "damage,needle",
  [
    (_delete_variables, "gen_1/saved_model cannot be loaded"),
    (_truncate_pb, "gen_1/saved_model cannot be loaded"),
    (_scramble_variables, "gen_1/saved_model cannot be loaded"),
    (_swap_gen0_saved_model, "gen_0/saved_model is not the model this run recorded"),
  ],
  ids=["variables_deleted", "pb_truncated", "variables_scrambled", "swapped"],
)
def test_evaluate_reports_a_damaged_generation_and_keeps_the_table(
  finished, tmp_path, capsys, damage, needle
):
  run = _copy(finished, tmp_path)
  damage(run)
  code, out, err = _evaluate([f"--run_dir={run}", "--split=test"], capsys)
  assert code == 2
  _error_line(err, "1 of 4 models could not be evaluated", needle)
  rows = [l for l in out.splitlines() if l.startswith("| ") and not l.startswith("| Model")]
  assert len(rows) == 4, out  # Teacher, BAN-1, BAN-2, Ens*2: none lost
  assert sum("(damaged)" in l for l in rows) == 1
  assert needle in out


@pytest.mark.parametrize(
  "argv,needles",
  [
    (["--batch_size=-5"], ["--batch_size=-5: must be >= 1"]),
    (["--split=train"], ["--split=train: use test or val"]),
    (["--run_dir=/no/such/run"], ["--run_dir=/no/such/run is not a directory"]),
  ],
)
def test_evaluate_flags_are_validated(finished, capsys, argv, needles):
  code, _, err = _evaluate(
    [f"--run_dir={finished}"] + argv if not argv[0].startswith("--run_dir") else argv, capsys
  )
  assert code == 2
  _error_line(err, *needles)


@pytest.mark.parametrize(
  "argv,needle",
  [
    (
      ["--run_dir=/no/run", "--images=a.png", "--top_k=2"],
      "--images, --top_k does not apply to --run_dir",
    ),
    (
      ["--saved_model=/no/model", "--images=a.png", "--split=val"],
      "--split does not apply to --saved_model",
    ),
  ],
)
def test_evaluate_refuses_a_flag_of_the_other_mode(capsys, argv, needle):
  """--run_dir=R --images=a.png re-evaluated the whole run and ignored the images."""
  code, _, err = _evaluate(argv, capsys)
  assert code == 2
  _error_line(err, needle)


def test_evaluate_a_seeds_parent_names_its_seed_runs(tmp_path, capsys):
  """A --seeds parent (config.json, seed_S/ runs, no gen_k/) is named as such, before any data is read."""
  cfg = config_lib.Config(dataset="no_such_dataset", arch="tiny", seeds=2)
  for sub in ("", "seed_0", "seed_100"):
    os.makedirs(tmp_path / sub, exist_ok=True)
    (tmp_path / sub / "config.json").write_text(cfg.to_json())
  code, _, err = _evaluate([f"--run_dir={tmp_path}"], capsys)
  assert code == 2
  _error_line(
    err, "is the parent of --seeds runs (seed_0, seed_100)", f"--run_dir={tmp_path}/seed_0"
  )


@pytest.mark.parametrize(
  "data,needle",
  [(RANDOM, "config.json is damaged"), (b'{"task": "speech"}', "config.json is damaged")],
)
def test_evaluate_garbage_config_is_one_line(finished, tmp_path, capsys, data, needle):
  run = _copy(finished, tmp_path)
  _write("config.json", data)(run)
  code, _, err = _evaluate([f"--run_dir={run}"], capsys)
  assert code == 2
  _error_line(err, needle)
