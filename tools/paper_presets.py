"""Prints the markdown table of every paper preset: its model's parameters against the paper's.

  python tools/paper_presets.py > /tmp/presets.md   # the table of docs/presets.md
  python tools/paper_presets.py --headers           # rewrites each preset's seeds-grade lines

Each preset's header ends with its seeds-grade version (`seeds_header`): --seeds=SEEDS into
its own run directory (`seeds_run_dir`), a column taking one teacher per seed from its row's
teacher preset run the same way (--teacher=<that run>/seed_{seed}/gen_0). tests/presets_test.py
fails when a file's lines differ from what this writes.

One row per flags/paper/*.flags: the file, where its teacher comes from (the preset that
trains a row's one teacher, which its students' --teacher names), the architecture
(teacher -> student when they differ), the trainable parameters of the student it builds (models.param_count /
lm_models.param_count, pure Python, equal to the built Keras model's), the paper's count
for that row, the difference in %, and the paper's result (the file's first line).
Language models are counted with PTB's 10,000-word vocabulary.
"""

import glob
import os
import sys

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ban_tf import lm_models  # pylint: disable=g-import-not-at-top,wrong-import-position  # noqa: E402
from ban_tf import main  # pylint: disable=g-import-not-at-top,wrong-import-position  # noqa: E402
from ban_tf import models  # pylint: disable=g-import-not-at-top,wrong-import-position  # noqa: E402

PRESET_DIR = os.path.join(REPO, "flags", "paper")
PTB_VOCAB = 10000
_CLASSES = {"cifar10": 10, "cifar100": 100}

# The paper's parameter count of the model each row's student is (paper.md, section 5).
# Tables 2 and 3 print no counts: their DenseNets and WRNs are Table 1's.
_TABLE1 = {
  "wrn-28-1": 0.38e6,
  "wrn-28-2": 1.48e6,
  "wrn-28-5": 9.16e6,
  "wrn-28-10": 36e6,
  "densenet-112-33": 6.3e6,
  "densenet-90-60": 16.1e6,
  "densenet-80-80": 22.4e6,
  "densenet-80-120": 50.4e6,
}
_TABLE4 = {
  "0.5x-depth": 21.2e6,
  "2x-depth": 13.7e6,
  "3x-depth": 12.9e6,
  "4x-depth": 12.6e6,
  "0.5x-compression": 5.1e6,
  "0.75x-compression": 10.1e6,
  "1.5x-compression": 80.5e6,
}
_TABLE5 = {
  "pre-resnet-14-0.5": 7.3e6,
  "pre-resnet-14-1": 17.7e6,
  "wide-resnet-1-1": 20.9e6,
  "match-wide-resnet-2-1": 43.1e6,
  "wide-resnet-4-0.5": 24.3e6,
  "wide-resnet-4-1": 87.3e6,
}
_TABLE6 = {"lstm": 52e6, "cnn-lstm": 19e6}


def paper_params(name):
  """The paper's parameter count for preset `name` (file name without .flags)."""
  table, row = name.split("_", 1)
  if table in ("table1", "table2"):
    return _TABLE1[row.split("_")[0]]
  if table == "table3":
    wrn, student = row.split("_")
    return _TABLE1["densenet-90-60"] if student == "dense-90-60" else _TABLE1[wrn]
  return {"table4": _TABLE4, "table5": _TABLE5, "table6": _TABLE6}[table][row]


def preset_config(path):
  fv = flags.FlagValues()
  main.define_flags(fv)
  fv(["prog", f"--flagfile={path}", "--ptb_dir=/ptb"])
  return main.config_from_flags(fv)


def teacher_source(cfg, by_run_dir):
  """Where a preset's generation 0 comes from: the preset whose run it is taken from
  (--teacher=RUN/gen_0), "trains it" for a teacher-only preset, "own" otherwise."""
  if cfg.teacher:
    run = os.path.dirname(os.path.normpath(cfg.teacher))
    return by_run_dir.get(run, cfg.teacher)
  return "trains it" if cfg.gens == 0 else "own"


def rows():
  """One dict per preset: file, teacher, student, source, params, paper_params, diff, result."""
  out = []
  paths = sorted(glob.glob(os.path.join(PRESET_DIR, "*.flags")))
  configs = {os.path.basename(p)[: -len(".flags")]: preset_config(p) for p in paths}
  by_run_dir = {c.run_dir: f"{n}.flags" for n, c in configs.items() if c.run_dir}
  for path in paths:
    name = os.path.basename(path)[: -len(".flags")]
    cfg = configs[name]
    teacher, student = cfg.arch_for(0), cfg.arch_for(1)
    if cfg.task == "lm":
      params = lm_models.param_count(student, PTB_VOCAB)
    else:
      params = models.param_count(student, _CLASSES[cfg.dataset])
    paper = paper_params(name)
    with open(path) as f:
      first = f.readline().strip()
    result = first.split(": ", 1)[1] if ": " in first else first
    out.append(
      {
        "file": name + ".flags",
        "teacher": teacher,
        "student": student,
        "source": teacher_source(cfg, by_run_dir),
        "params": params,
        "paper_params": paper,
        "diff": 100.0 * (params / paper - 1),
        "result": result,
      }
    )
  return out


SEEDS = 5  # the N of every preset's seeds-grade commands
SEEDS_MARK = "# Seeds-grade"  # the first line of the generated block
_COMMAND = "#   python -m ban_tf.main "


def seeds_run_dir(name, cfg):
  """The run directory of preset `name`'s seeds-grade version: its --run_dir (default
  runs/paper/<name>) + "_seeds", apart from its one-seed run, whose config.json differs."""
  return (cfg.run_dir or f"runs/paper/{name}") + "_seeds"


def _command(name, cfg, teacher=None):
  args = [f"--flagfile=flags/paper/{name}.flags", f"--seeds={SEEDS}"]
  args.append(f"--run_dir={seeds_run_dir(name, cfg)}")
  if teacher:
    args.append(f"--teacher={teacher}")
  return _COMMAND + " ".join(args)


def seeds_header(name, configs=None):
  """The comment lines that end preset `name`'s header: how to run its seeds-grade version.

  A row's teacher preset: itself with --seeds=SEEDS, and the --teacher its columns then take.
  A column (--teacher=RUN/gen_0 of a teacher preset): that teacher preset with --seeds=SEEDS,
  then this preset with --seeds=SEEDS --teacher=<the teacher's seeds run>/seed_{seed}/gen_0,
  each seed's students learning from their own teacher. A preset that trains its own
  teacher: itself with --seeds=SEEDS. `configs`: {name: Config} of every preset (read when None).
  """
  configs = configs or _configs()
  cfg = configs[name]
  doc = 'docs/presets.md "Seeds-grade runs"'
  if cfg.teacher:
    by_run_dir = {c.run_dir: n for n, c in configs.items() if c.run_dir}
    row = by_run_dir[os.path.dirname(os.path.normpath(cfg.teacher))]
    teacher = seeds_run_dir(row, configs[row]) + "/seed_{seed}/gen_0"
    return [
      f"{SEEDS_MARK} ({doc}): the row's teacher with --seeds={SEEDS}, then this column "
      "with each seed's own teacher:",
      _command(row, configs[row]),
      _command(name, cfg, teacher),
    ]
  if cfg.gens == 0:
    teacher = seeds_run_dir(name, cfg) + "/seed_{seed}/gen_0"
    return [
      f"{SEEDS_MARK} ({doc}): this teacher with --seeds={SEEDS}, then each column of the row "
      f"with --seeds={SEEDS} --teacher={teacher} (its header has the command):",
      _command(name, cfg),
    ]
  return [
    f"{SEEDS_MARK} ({doc}): each seed trains its own teacher:",
    _command(name, cfg),
  ]


def write_headers():
  """Rewrites the seeds-grade block of every preset's header (after its other comments)."""
  configs = _configs()
  for name in configs:
    path = os.path.join(PRESET_DIR, f"{name}.flags")
    with open(path) as f:
      lines = f.read().splitlines()
    lines = [
      line for line in lines if not (line.startswith(SEEDS_MARK) or line.startswith(_COMMAND))
    ]
    first_flag = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    lines[first_flag:first_flag] = seeds_header(name, configs)
    with open(path, "w") as f:
      f.write("\n".join(lines) + "\n")


def _configs():
  paths = sorted(glob.glob(os.path.join(PRESET_DIR, "*.flags")))
  return {os.path.basename(p)[: -len(".flags")]: preset_config(p) for p in paths}


def _millions(n):
  return f"{n / 1e6:.2f}M"


def presets_table():
  lines = [
    "| File | Teacher from | Arch (teacher -> student) | Parameters | Paper's | Diff | Paper's result |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows():
    arch = r["student"] if r["teacher"] == r["student"] else f"{r['teacher']} -> {r['student']}"
    source = f"`{r['source']}`" if r["source"].endswith(".flags") else r["source"]
    cells = [
      f"`{r['file']}`",
      source,
      f"`{arch}`",
      _millions(r["params"]),
      f"{r['paper_params'] / 1e6:g}M",
      f"{r['diff']:+.1f}%",
      r["result"].replace("|", "\\|"),
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  if sys.argv[1:] == ["--headers"]:
    write_headers()
  else:
    sys.stdout.write(presets_table())
