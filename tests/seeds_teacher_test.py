"""--seeds=N with --teacher: one teacher per seed (`{seed}` in the path) or one fixed teacher.

Unit: the placeholder's resolution (Config.for_seed / seed_runs / resolved_teacher) and its
one-line usage errors, raised before any run directory is made. End to end on the shared
fashion_mnist (tiny arch, 256 examples, 1 epoch): a --seeds=2 teacher run, then
--seeds=2 --teacher=<it>/seed_{seed}/gen_0 imports each seed's own teacher, reruns resume
(also once the teachers are gone), a replaced teacher is refused (one run of students does all
three), and a fixed --teacher is recorded and announced as fixed.
"""

import dataclasses
import json
import os
import shutil

import pytest

from ban_tf import checks
from ban_tf import config as config_lib
from ban_tf import errors
from ban_tf import export
from tests.conftest import SHARED_TFDS
from tests.conftest import run_main

_HAS_DATA = os.path.isdir(os.path.join(SHARED_TFDS, "fashion_mnist"))

_ARGS = [
  "--task=image",
  "--dataset=fashion_mnist",
  f"--data_dir={SHARED_TFDS}",
  "--arch=tiny",
  "--train_examples=256",
  "--val_examples=64",
  "--test_split=test[:256]",
  "--batch_size=64",
  "--lr=0.05",
  "--epochs=1",
  "--verbose=0",
]


def _fake_generation(path):
  """A directory checks.check_path takes for a ban_tf generation (nothing is loaded)."""
  os.makedirs(os.path.join(path, "saved_model"), exist_ok=True)
  open(os.path.join(path, "saved_model", "saved_model.pb"), "w").close()


def _fake_import(run_dir, teacher):
  """run_dir/gen_0 as a finished import of `teacher` (what checks.imported_into reads)."""
  gen0 = os.path.join(run_dir, "gen_0")
  os.makedirs(gen0)
  with open(os.path.join(gen0, "metrics.json"), "w") as f:
    json.dump({checks.SOURCE_KEY: {"path": os.path.abspath(teacher), "given": teacher}}, f)
  open(os.path.join(gen0, "DONE"), "w").close()


def _validate(**kw):
  config_lib.Config(arch="tiny", **kw).validate()


def test_placeholder_resolves_per_seed():
  cfg = config_lib.Config(
    teacher="runs/t/seed_{seed}/gen_0", seeds=3, seed=5, student_seed=11, run_dir="runs/s"
  )
  subs = cfg.seed_runs()
  assert [s.seed for s in subs] == [5, 105, 205] == cfg.seed_list()
  assert [s.run_dir for s in subs] == ["runs/s/seed_5", "runs/s/seed_105", "runs/s/seed_205"]
  assert [s.resolved_teacher for s in subs] == [
    "runs/t/seed_5/gen_0",
    "runs/t/seed_105/gen_0",
    "runs/t/seed_205/gen_0",
  ]
  assert [s.student_seed for s in subs] == [11, 111, 211]  # moves with the base seed, as before
  # config.json keeps the placeholder in every seed run: they stay one experiment.
  assert {s.teacher for s in subs} == {cfg.teacher}
  assert all(s.seeds == 1 for s in subs) and cfg.teacher_per_seed
  assert cfg.seeds_note() is None
  # One run: itself, its default run directory filled in.
  one = config_lib.Config(teacher="t.keras")
  (only,) = one.seed_runs()
  assert only.run_dir == one.default_run_dir() and only.resolved_teacher == "t.keras"


def test_progress_total_counts_only_the_epochs_this_run_trains():
  """An imported --teacher's epochs are not this run's to train (console.Progress's total)."""
  cfg = config_lib.Config(arch="tiny", gens=2, epochs=3, seeds=2, baseline=True)
  assert cfg.trained_epochs == (3 + 1) * 3 * 2 and cfg.trains(0) and cfg.trains("baseline")
  taught = dataclasses.replace(cfg, teacher="t/seed_{seed}/gen_0")
  assert taught.trained_epochs == (2 + 1) * 3 * 2 and not taught.trains(0) and taught.trains(1)


def test_teacher_per_seed_and_the_fixed_teacher_note():
  assert config_lib.Config(seeds=3).teacher_per_seed  # each seed trains its own teacher
  fixed = config_lib.Config(teacher="runs/t/gen_0", seeds=3)
  assert not fixed.teacher_per_seed
  note = fixed.seeds_note()
  assert note.startswith("--seeds=3 with one fixed --teacher:") and "teacher variance" in note
  assert "seed_{seed}/gen_0" in note and "\n" not in note
  assert config_lib.Config(teacher="runs/t/gen_0").seeds_note() is None  # one seed: nothing to say


@pytest.mark.parametrize(
  "kw,fragment",
  [
    (dict(seeds=1), "{seed} takes one teacher per seed of --seeds=N: add --seeds=N"),
    (
      dict(seeds=2, teacher="t/seed_{seeds}/gen_0"),
      "malformed placeholder; the only one is {seed}",
    ),
    (dict(seeds=2, teacher="t/seed_{seed/gen_0"), "malformed placeholder"),
    (dict(seeds=2, teacher="t/seed_{}/gen_0"), "malformed placeholder"),
    (dict(seeds=2, run_dir="r/{seed}"), "--run_dir=r/{seed}: {seed} is replaced in --teacher only"),
    (dict(seeds=2, data_dir="d/{seed}"), "--data_dir=d/{seed}: {seed} is replaced in --teacher"),
  ],
)
def test_placeholder_usage_errors(tmp_path, monkeypatch, kw, fragment):
  monkeypatch.chdir(tmp_path)
  for s in (0, 100):
    _fake_generation(f"t/seed_{s}/gen_0")
  kw = dict(dict(teacher="t/seed_{seed}/gen_0", run_dir="r"), **kw)
  with pytest.raises(errors.UsageError) as err:
    _validate(**kw)
  assert fragment in str(err.value) and "\n" not in str(err.value)


def test_every_seeds_teacher_must_exist(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _fake_generation("t/seed_0/gen_0")
  with pytest.raises(errors.UsageError) as err:
    _validate(teacher="t/seed_{seed}/gen_0", seeds=3, run_dir="r")
  # Every missing one, the paths looked for, and the command that makes them all.
  assert str(err.value) == (
    "--teacher=t/seed_{seed}/gen_0: the teachers of seeds 100, 200 are missing (looked for "
    "t/seed_100/gen_0, t/seed_200/gen_0); seeds 0, 100, 200 each need their own teacher: one "
    "run of the teacher's flags with --seeds=3 --seed=0 --run_dir=t makes them"
  )
  _fake_generation("t/seed_100/gen_0")
  _fake_generation("t/seed_200/gen_0")
  _validate(teacher="t/seed_{seed}/gen_0", seeds=3, run_dir="r")
  # Another base seed names other teachers.
  with pytest.raises(
    errors.UsageError, match=r"the teacher of seed 300 is missing \(looked for t/seed_300/gen_0\)"
  ):
    _validate(teacher="t/seed_{seed}/gen_0", seeds=3, seed=100, run_dir="r")
  # Without the seed_{seed} form there is no teacher command to name.
  with pytest.raises(
    errors.UsageError,
    match="seeds 0, 100 are missing .looked for x_0.keras, x_100.keras.*train one",
  ):
    _validate(teacher="x_{seed}.keras", seeds=2, run_dir="r")
  # A resolved path that exists but is no teacher: check_path's error, naming it.
  os.makedirs("t/seed_300/gen_0")
  with pytest.raises(errors.UsageError, match="--teacher=t/seed_300/gen_0: holds neither"):
    _validate(teacher="t/seed_{seed}/gen_0", seeds=3, seed=100, run_dir="r")


def test_teachers_of_another_base_seed_are_named_with_the_seed_that_uses_them(
  tmp_path, monkeypatch
):
  """--seeds=2 --seed=1 with teachers made by --seeds=2 --seed=0 (seed_0, seed_100): the error
  names the missing seeds (1, 101) and the paths looked for, says which seeds the parent does
  hold and the --seed that uses them; it no longer suggests the teacher run --seed=1 into the
  directory that holds seed 0's run (which would not make them there)."""
  monkeypatch.chdir(tmp_path)
  for s in (0, 100):
    _fake_generation(f"t/seed_{s}/gen_0")
  with pytest.raises(errors.UsageError) as err:
    _validate(teacher="t/seed_{seed}/gen_0", seeds=2, seed=1, run_dir="r")
  assert str(err.value) == (
    "--teacher=t/seed_{seed}/gen_0: the teachers of seeds 1, 101 are missing (looked for "
    "t/seed_1/gen_0, t/seed_101/gen_0); seeds 1, 101 each need their own teacher: t holds the "
    "teachers of seeds 0, 100: pass --seed=0 to use them, or make the missing ones with one run "
    "of the teacher's flags with --seeds=2 --seed=1 --run_dir=<a new directory> and pass "
    "--teacher=<it>/seed_{seed}/gen_0"
  )
  # Only some of another base's teachers: no --seed to suggest, the teacher run still named.
  with pytest.raises(errors.UsageError) as err:
    _validate(teacher="t/seed_{seed}/gen_0", seeds=3, seed=100, run_dir="r")
  assert "the teachers of seeds 200, 300 are missing" in str(err.value)
  assert "t holds the teachers of seeds 0: make the missing ones with" in str(err.value)
  assert "--seed=0 to use" not in str(err.value) and "\n" not in str(err.value)


def test_an_imported_seeds_teacher_may_be_gone(tmp_path, monkeypatch):
  """The existing rule, per seed: a seed run that imported its teacher resumes from its copy."""
  monkeypatch.chdir(tmp_path)
  _fake_generation("t/seed_100/gen_0")
  _fake_import("r/seed_0", "t/seed_0/gen_0")  # seed 0 imported it; the file has gone since
  _validate(teacher="t/seed_{seed}/gen_0", seeds=2, run_dir="r")
  # Seed 0's import does not excuse seed 100's missing teacher (the fixed form neither).
  shutil.rmtree("t/seed_100")
  with pytest.raises(
    errors.UsageError, match=r"seed 100 is missing \(looked for t/seed_100/gen_0\)"
  ):
    _validate(teacher="t/seed_{seed}/gen_0", seeds=2, run_dir="r")
  with pytest.raises(errors.UsageError, match="--teacher=t/seed_0/gen_0: no such file"):
    _validate(teacher="t/seed_0/gen_0", seeds=2, run_dir="r2")


def test_overwrite_refuses_a_seeds_teacher_inside_the_run(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for s in (0, 100):
    _fake_generation(f"r/t/seed_{s}/gen_0")
  with pytest.raises(errors.UsageError, match="--teacher=r/t/seed_0/gen_0 is inside --run_dir=r"):
    _validate(teacher="r/t/seed_{seed}/gen_0", seeds=2, run_dir="r", overwrite=True)


def test_binary_refuses_before_anything_is_written(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  _fake_generation("t/seed_0/gen_0")
  code, _, err = run_main(
    monkeypatch,
    capsys,
    ["--arch=tiny", "--seeds=2", "--teacher=t/seed_{seed}/gen_0", "--run_dir=r"],
  )
  lines = err.strip().splitlines()
  assert (
    code == 2 and len(lines) == 1 and lines[0].startswith("error: --teacher=t/seed_{seed}/gen_0:")
  )
  assert "the teacher of seed 100 is missing (looked for t/seed_100/gen_0)" in lines[0]
  assert not os.path.exists("r")


@pytest.fixture(scope="module")
def teacher_seeds(tmp_path_factory):
  """A --seeds=2 teacher run: top/seed_0/gen_0 and top/seed_100/gen_0."""
  from tests.conftest import run_main_once  # pylint: disable=g-import-not-at-top

  top = str(tmp_path_factory.mktemp("seeds") / "t")
  assert run_main_once(_ARGS + ["--gens=0", "--seeds=2", f"--run_dir={top}"]) == 0
  return top


def _source(run_dir, seed):
  return export.read_json(os.path.join(run_dir, f"seed_{seed}", "gen_0", "metrics.json"))["source"]


@pytest.mark.skipif(not _HAS_DATA, reason="no shared fashion_mnist")
@pytest.mark.slow
def test_one_teacher_per_seed_end_to_end(teacher_seeds, tmp_path, monkeypatch, capsys):
  """Each seed imports its own teacher; a rerun resumes, also once the teachers are gone; a
  seed's teacher replaced since it was imported is refused (one line)."""
  teachers = str(tmp_path / "t")
  shutil.copytree(teacher_seeds, teachers)  # the replacement below changes it
  students = str(tmp_path / "s")
  template = f"{teachers}/seed_{{seed}}/gen_0"
  argv = _ARGS + ["--gens=1", "--seeds=2", f"--teacher={template}", f"--run_dir={students}"]
  code, out, err = run_main(monkeypatch, capsys, argv)
  assert code == 0, err
  assert "one fixed --teacher" not in out
  # Progress counts the 2 epochs this run trains (BAN-1 of each seed), not the imported teachers'
  # (it said 2/4 and 4/4: gen 0's epochs counted as done out of a total that held them).
  counts = [line.rsplit("(", 1)[1] for line in out.splitlines() if "BAN-1 epoch 1/1:" in line]
  assert counts == ["1/2 epochs)", "2/2 epochs)"], out
  sha = {}
  for seed in (0, 100):
    src = _source(students, seed)
    own = os.path.join(teachers, f"seed_{seed}", "gen_0")
    assert src["path"] == os.path.abspath(own) and src["given"] == own  # the resolved path
    assert src["sha256"] == checks.source_sha256(os.path.join(own, "saved_model"))
    sha[seed] = src["sha256"]
    # config.json keeps the placeholder (every seed run the same experiment as the parent's).
    with open(os.path.join(students, f"seed_{seed}", "config.json")) as f:
      assert json.load(f)["teacher"] == template
  assert sha[0] != sha[100]  # each seed imported its own teacher
  with open(os.path.join(students, "config.json")) as f:
    assert json.load(f)["teacher"] == template
  assert export.read_json(os.path.join(students, "results.json"))["teacher_per_seed"] is True

  def students_metrics():
    return {
      s: open(os.path.join(students, f"seed_{s}", "gen_1", "metrics.json")).read() for s in (0, 100)
    }

  before = students_metrics()
  # A rerun resumes: nothing is retrained.
  code, out, err = run_main(monkeypatch, capsys, argv)
  assert code == 0, err
  assert out.count("done before, skipped") == 4 and students_metrics() == before, out

  # The teachers gone: each seed run resumes from its own gen_0 copy.
  gone = str(tmp_path / "t_gone")
  os.rename(teachers, gone)
  code, out, err = run_main(monkeypatch, capsys, argv)
  assert code == 0, err
  assert students_metrics() == before
  os.rename(gone, teachers)

  # Seed 100's teacher replaced by seed 0's since it was imported: refused.
  shutil.rmtree(os.path.join(teachers, "seed_100", "gen_0"))
  shutil.copytree(
    os.path.join(teachers, "seed_0", "gen_0"), os.path.join(teachers, "seed_100", "gen_0")
  )
  code, _, err = run_main(monkeypatch, capsys, argv)
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1, err
  assert f"--teacher={teachers}/seed_100/gen_0 changed since this run imported it" in lines[0]
  assert students_metrics() == before


@pytest.mark.skipif(not _HAS_DATA, reason="no shared fashion_mnist")
@pytest.mark.slow
def test_a_fixed_teacher_is_recorded_and_announced(teacher_seeds, tmp_path, monkeypatch, capsys):
  students = str(tmp_path / "f")
  teacher = f"{teacher_seeds}/seed_0/gen_0"
  argv = _ARGS + ["--gens=0", "--seeds=2", f"--teacher={teacher}", f"--run_dir={students}"]
  code, out, err = run_main(monkeypatch, capsys, argv)
  assert code == 0, err
  assert "--seeds=2 with one fixed --teacher: every seed's students learn from the same" in out
  assert export.read_json(os.path.join(students, "results.json"))["teacher_per_seed"] is False
  assert _source(students, 0)["sha256"] == _source(students, 100)["sha256"]  # one model
  assert _source(students, 100)["path"] == os.path.abspath(teacher)
  with open(os.path.join(students, "seed_100", "config.json")) as f:
    assert not config_lib.Config.from_dict(json.load(f)).teacher_per_seed
