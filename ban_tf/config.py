"""The resolved experiment: a frozen Config built once from flags, validated, saved.

Library code takes a Config (or plain arguments), never absl FLAGS, so tests build
one directly with `Config(...)`. The dataclass fields are the one source of the
flags' names, types and defaults: main.define_flags defines one flag per field
(tests/config_test.py checks it), `Config.from_flags` reads them back, and
`Config.from_dict` reads a run directory's config.json.

Validation imports no TensorFlow or Keras (architecture names are parsed by
archs.py), so a bad flag fails at once; what only one task checks lives in that
task's `validate` (tasks/).
"""

import dataclasses
import json
import math
import os
from typing import Optional

from ban_tf import archs
from ban_tf import errors
from ban_tf import layout
from ban_tf import checks
from ban_tf import tasks

TEACHER_OUTPUTS = ("logits", "probabilities")
LOSSES = ("ban", "ban_l", "kd", "cwtm", "dkpp")
TASKS = tuple(tasks.TASKS)
AUGMENTS = ("auto", "none", "crop", "flip", "flip_crop", "inception")
# Data sets whose labels change under a horizontal flip (digits, text).
_NO_FLIP = ("mnist", "svhn_cropped", "emnist", "kmnist", "binarized_mnist")

# Fields that do not change what is trained: they may differ when a run resumes.
NON_EXPERIMENT_FIELDS = frozenset(
  {
    "run_dir",
    "data_dir",
    "ptb_dir",
    "overwrite",
    "gens",
    "num_cpu_devices",
    "verbose",
    "steps_per_execution",
    "seeds",
    "strategy",
    "device_augment",
  }
)
STRATEGIES = ("auto", "multi_worker")
# In --teacher, replaced by each --seeds run's base seed: one teacher per seed (docs/variants.md).
TEACHER_SEED = "{seed}"
# Every seed a run uses goes to keras.utils.set_random_seed (and NumPy's RandomState),
# which take 0 <= seed < 2**32.
SEED_RANGE = (0, 2**32 - 1)
LR_SCHEDULES = ("step", "cosine")


def check_writable_dir(path: str, flag: str) -> None:
  """Raises errors.UsageError unless `path` is, or can be created as, a writable directory.

  Creates nothing: checks the path itself when it exists, else its nearest
  existing ancestor (os.access: write and search permission; EROFS on a
  read-only file system).
  """
  target = os.path.abspath(path)
  if os.path.exists(target) and not os.path.isdir(target):
    raise errors.UsageError(
      f"{flag}={path} is an existing file, not a directory: pass a directory path"
    )
  probe = target
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if not os.path.isdir(probe):
    raise errors.UsageError(
      f"{flag}={path}: {probe} is a file, so no directory can be made under it: "
      "pass a path under a directory"
    )
  if not os.access(probe, os.W_OK | os.X_OK):
    raise errors.UsageError(
      f"{flag}={path}: {probe} is not writable (read-only file system or no permission): "
      "pass a writable location"
    )


@dataclasses.dataclass(frozen=True)
class Config:
  """Every knob of a run. Defaults are the paper's (WRN) CIFAR recipe."""

  # Data.
  task: str = "image"  # image (classification) | lm (word-level language modelling)
  dataset: str = "cifar10"
  data_dir: Optional[str] = None
  train_examples: int = 0  # 0 = all (minus the validation hold-out)
  val_examples: int = 0
  image_folder: Optional[str] = None  # DIR/{train,test[,val]}/<class>/<image> instead of tfds
  train_split: str = "train"  # tfds split names; slices such as train[:90%] work
  val_split: Optional[str] = None  # a named validation split (instead of --val_examples)
  test_split: str = "test"
  # (H, W) to resize every image to; () = the data set's own (fixed) size.
  image_size: tuple = dataclasses.field(
    default=(), metadata={"item": int, "hint": "two integers H,W (e.g. 32,32)"}
  )
  image_key: Optional[str] = None  # tfds feature names (default image, label)
  label_key: Optional[str] = None
  augment: str = "auto"
  # Augment in the compiled train step instead of per example on the host (bit-identical
  # batches either way, so it may differ on resume; docs/performance.md for the default).
  device_augment: bool = True
  ptb_dir: Optional[str] = None  # lm: directory of ptb.{train,valid,test}.txt (--dataset=ptb)
  vocab_size: int = 0  # lm: cap on the vocabulary (0 = every training word)
  bptt: int = 35  # lm: unrolled steps per window
  lm_state: str = (
    "carry"  # lm: carry the LSTM state across consecutive windows (reset per epoch) | reset
  )
  # Models.
  arch: str = "wrn-28-1"
  teacher_arch: Optional[str] = None  # generation 0's architecture; default = arch
  student_width_ratio: float = 1.0  # -match- students: widths = ratio x teacher's blocks
  share_stem_head: bool = False  # copy + freeze the teacher's "stem" and "logits" (Table 5)
  densenet_compression: float = 0.5  # transition compression of a DenseNet --arch (Table 4)
  dropout: float = 0.0
  teacher_dropout: Optional[float] = None  # generation 0's dropout; None = --dropout
  # keras:NAME backbones' initial weights: imagenet or a weights file of the backbone without
  # its top (every generation; classifier fresh). None: from scratch, as the paper's BAN.
  init_weights: Optional[str] = None
  # Generation 0 from PATH instead of training it: a run's gen_k/, a SavedModel or a .keras file.
  teacher: Optional[str] = None
  teacher_outputs: str = "logits"  # what --teacher outputs: logits | probabilities
  # Generations and objective.
  gens: int = 3
  loss: str = "ban"
  temperature: float = 1.0
  kd_weight: float = 1.0
  label_weight: float = 0.0
  ensemble_include_teacher: bool = False
  feature_weight: float = 0.0  # activation matching: weight of (1/D)||f_s - f_t||^2
  feature_projection: bool = False  # learned Dense projection of the student's features
  # Optimisation (SGD Nesterov, step schedule).
  epochs: int = 200
  batch_size: int = 128
  lr: float = 0.1
  momentum: float = 0.9
  nesterov: bool = True
  weight_decay: float = 5e-4
  lr_milestones: tuple = dataclasses.field(
    default=(0.3, 0.6, 0.8), metadata={"hint": "comma-separated fractions of the epochs"}
  )
  lr_decay: float = 0.2
  # image: step (x lr_decay at each milestone) | cosine (Keras CosineDecay to 0 at the end).
  lr_schedule: str = "step"
  warmup_epochs: int = 0  # image: linear warm-up from 0 to --lr over the first N epochs
  # lm: lr x lr_plateau_decay whenever val perplexity does not improve by > min_delta.
  lr_plateau_decay: float = 0.25
  lr_plateau_min_delta: float = 0.0
  lr_plateau_reference: str = (
    "best"  # lm: compare with the best epoch so far, or with the previous one
  )
  clip_norm: float = 0.0  # global gradient-norm clipping (0 = off)
  # Execution.
  seed: int = 0
  student_seed: Optional[int] = None  # BAN-1's seed (BAN-k: + k - 1); None = seed + 1
  seeds: int = 1  # repeat the run with seeds seed, seed+100, ... into run_dir/seed_S/
  baseline: bool = False  # also train a label-only student-arch baseline per seed
  run_dir: Optional[str] = None
  num_cpu_devices: int = 0
  strategy: str = "auto"  # auto: one device, N logical CPUs or all GPUs; multi_worker: TF_CONFIG
  deterministic: bool = False
  # BatchNorm under several replicas: False = per-replica batch statistics, moving
  # statistics averaged over replicas after every step; True = batch statistics of
  # the global batch (Keras synchronized=True, torch SyncBatchNorm).
  sync_batchnorm: bool = False
  overwrite: bool = False
  steps_per_execution: int = 1
  jit_compile: bool = False
  mixed_precision: str = "none"
  verbose: str = "auto"

  # ---- construction -----------------------------------------------------------
  @classmethod
  def from_flags(cls, fv) -> "Config":
    """The Config of parsed absl flags `fv` (main.define_flags: one flag per field).

    Raises:
      errors.UsageError: a list flag (--lr_milestones) that does not parse.
    """
    kwargs = {}
    for f in dataclasses.fields(cls):
      value = fv[f.name].value
      if isinstance(f.default, tuple):  # list flags: comma-separated numbers
        item = f.metadata.get("item", float)
        try:
          value = tuple(item(v) for v in value)
        except ValueError:
          raise errors.UsageError(
            f"--{f.name}={','.join(value)}: use {f.metadata.get('hint', 'comma-separated numbers')}"
          ) from None
      kwargs[f.name] = value
    for name in (
      "image_folder",
      "data_dir",
      "ptb_dir",
      "init_weights",
    ):  # absolute in config.json: evaluate and resume
      if (
        kwargs.get(name) and "://" not in kwargs[name] and kwargs[name] != "imagenet"
      ):  # work from any directory (gs://... as given)
        kwargs[name] = os.path.abspath(kwargs[name])
    return cls(**kwargs)

  @classmethod
  def from_dict(cls, d: dict) -> "Config":
    """The Config stored in a config.json; unknown keys (e.g. `resolved`) are dropped,
    missing ones (run directories written before a field existed) take the default."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    for k, v in kwargs.items():
      if isinstance(names[k].default, tuple) and isinstance(v, list):
        kwargs[k] = tuple(v)
    return cls(**kwargs)

  # ---- derived values -------------------------------------------------------
  @property
  def resolved_loss(self) -> str:
    """`ban` with a label term is BAN+L; everything else is as given."""
    if self.loss == "ban" and self.label_weight > 0:
      return "ban_l"
    return self.loss

  @property
  def resolved_label_weight(self) -> float:
    if self.resolved_loss == "ban_l" and self.label_weight == 0:
      return 1.0  # BAN+L: a plain sum of the two terms (paper.md, section 1).
    if self.resolved_loss in ("ban", "dkpp"):
      return 0.0
    if self.resolved_loss == "cwtm":
      return 1.0
    return self.label_weight

  @property
  def resolved_kd_weight(self) -> float:
    return 0.0 if self.resolved_loss == "cwtm" else self.kd_weight

  def objective(self):
    """What a student generation optimises: the one resolved losses.Objective."""
    from ban_tf import losses  # lazy: TensorFlow; validation runs before it loads

    return losses.Objective(
      loss=self.resolved_loss,
      temperature=self.temperature,
      kd_weight=self.resolved_kd_weight,
      label_weight=self.resolved_label_weight,
      feature_weight=self.feature_weight,
      feature_projection=self.feature_projection,
      share_stem_head=self.share_stem_head,
    )

  def arch_for(self, gen: int) -> str:
    """Generation `gen`'s architecture; -match- students resolved to explicit widths."""
    if gen == 0 and self.teacher_arch:
      return self.teacher_arch
    arch = (
      self.arch
      if gen == 0
      else archs.resolve_arch(self.arch, self.teacher_arch, self.student_width_ratio)
    )
    return archs.with_compression(arch, self.densenet_compression)

  def seed_for(self, gen) -> int:
    """Generation `gen`'s seed: seed + gen, or --student_seed + gen - 1 for students
    (the baseline, "baseline", uses BAN-1's)."""
    gen = 1 if gen == "baseline" else gen
    if gen == 0 or self.student_seed is None:
      return self.seed + gen
    return self.student_seed + gen - 1

  def dropout_for(self, gen) -> float:
    """Generation `gen`'s dropout: --teacher_dropout for generation 0 when given, else --dropout."""
    return self.teacher_dropout if gen == 0 and self.teacher_dropout is not None else self.dropout

  @property
  def teacher_label(self) -> str:
    """Generation 0 in titles: its architecture, or the --teacher file's name."""
    if self.teacher:
      return f"{os.path.basename(os.path.normpath(self.teacher))} (pretrained)"
    return self.arch_for(0)

  def trains(self, gen) -> bool:
    """Whether this run trains generation `gen` (0..gens, or "baseline"): every one but an
    imported --teacher (generation 0, whose epochs this run never trains)."""
    return not (gen == 0 and self.teacher)

  @property
  def trained_epochs(self) -> int:
    """The epochs this command trains, its progress total (console.Progress): per base seed,
    --epochs of every generation it `trains` and of the baseline."""
    per_seed = sum(self.trains(g) for g in range(self.gens + 1)) + (1 if self.baseline else 0)
    return per_seed * self.epochs * self.seeds

  def seed_list(self) -> list:
    """Base seeds of a --seeds=N run: seed, seed + 100, ... (generation k adds k)."""
    return [self.seed + 100 * i for i in range(self.seeds)]

  def for_seed(self, seed: int, parent: str) -> "Config":
    """The one-seed run of base seed `seed` of a --seeds run whose directory is `parent`.

    Its run directory is parent/seed_S; --student_seed moves with the base seed, so each
    seed's students differ too. --teacher keeps its `{seed}` form (what config.json
    stores, the same in every seed run); `resolved_teacher` is the path it imports.
    """
    student_seed = None if self.student_seed is None else self.student_seed + seed - self.seed
    return dataclasses.replace(
      self,
      seed=seed,
      seeds=1,
      student_seed=student_seed,
      run_dir=os.path.join(parent, layout.numbered(layout.SEED, seed)),
    )

  def seed_runs(self) -> list:
    """The one-seed Configs this command runs: itself (run_dir resolved) for --seeds=1,
    else `for_seed` of every base seed under run_dir (generations.run_seeds)."""
    run_dir = self.run_dir or self.default_run_dir()
    if self.seeds == 1:
      return [dataclasses.replace(self, run_dir=run_dir)]
    return [self.for_seed(seed, run_dir) for seed in self.seed_list()]

  @property
  def resolved_teacher(self) -> Optional[str]:
    """The --teacher path this (one-seed) run imports: `{seed}` replaced by its base seed."""
    return self.teacher.replace(TEACHER_SEED, str(self.seed)) if self.teacher else None

  @property
  def teacher_per_seed(self) -> bool:
    """Whether each base seed has its own teacher: trained by its run (no --teacher), or
    --teacher with `{seed}`. False for one fixed --teacher shared by every seed, whose
    seed spread then leaves out the teacher's own variance."""
    return not self.teacher or TEACHER_SEED in self.teacher

  def seeds_note(self) -> Optional[str]:
    """The console line of a --seeds run that shares one fixed --teacher (None otherwise)."""
    if self.seeds == 1 or self.teacher_per_seed:
      return None
    return (
      f"--seeds={self.seeds} with one fixed --teacher: every seed's students learn from the same "
      "teacher, so the spread excludes teacher variance; for one teacher per seed, train it with "
      f"--seeds={self.seeds} and pass --teacher=<its run_dir>/seed_{TEACHER_SEED}/gen_0 "
      "(docs/variants.md)"
    )

  def all_seeds(self) -> dict:
    """{seed: what uses it} for every seed the run derives: each --seeds base seed
    (seed + 100 i) and, per base, every generation's (seed_for: base + k, or the
    --student_seed moved with the base + k - 1) and the baseline's."""
    out = {}
    for base in self.seed_list():
      student = None if self.student_seed is None else self.student_seed + base - self.seed
      sub = dataclasses.replace(self, seed=base, student_seed=student, seeds=1)
      at = f" of base seed {base}" if self.seeds > 1 else ""
      for gen in range(self.gens + 1):
        out.setdefault(sub.seed_for(gen), f"generation {gen}{at}")
      if self.baseline:
        out.setdefault(sub.seed_for("baseline"), f"the baseline{at}")
    return out

  @property
  def data_name(self) -> str:
    """The tfds name, or the image folder's name."""
    if self.image_folder:
      return os.path.basename(os.path.normpath(self.image_folder))
    return self.dataset

  @property
  def resolved_augment(self) -> str:
    if self.augment != "auto":
      return self.augment
    return (
      "crop" if not self.image_folder and self.dataset.split("/")[0] in _NO_FLIP else "flip_crop"
    )

  @property
  def resolved_device_augment(self) -> bool:
    """Augmentation in the train step: --device_augment where the task has it (images; text has none)."""
    return tasks.get(self.task).device_augment(self)

  def default_run_dir(self) -> str:
    arch = self.arch if not self.teacher_arch else f"{self.teacher_arch}-to-{self.arch}"
    arch = arch.replace(":", "_")  # keras:NAME
    return os.path.join(
      "runs", f"{self.data_name.replace('/', '_')}-{arch}-{self.resolved_loss}-seed{self.seed}"
    )

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["lr_milestones"] = list(self.lr_milestones)
    d["image_size"] = list(self.image_size)
    d["resolved"] = {
      "loss": self.resolved_loss,
      "temperature": self.temperature,
      "kd_weight": self.resolved_kd_weight,
      "label_weight": self.resolved_label_weight,
      "feature_weight": self.feature_weight,
      "feature_projection": self.feature_projection,
      "share_stem_head": self.share_stem_head,
      "augment": self.resolved_augment,
    }
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  def experiment_diff(self, stored: dict) -> list:
    """Fields that differ from a stored config.json and change the experiment."""
    mine = self.to_dict()
    # A field missing from an older config.json did not exist then: the run used
    # what is now its default.
    stored = dict(Config().to_dict(), **stored)
    keys = (set(mine) | set(stored)) - NON_EXPERIMENT_FIELDS

    def same(k):
      a, b = mine.get(k), stored.get(k)
      if (
        k == "image_folder" and isinstance(a, str) and isinstance(b, str)
      ):  # older runs stored it as given
        return os.path.abspath(a) == os.path.abspath(b)
      return a == b

    return sorted(k for k in keys if not same(k))

  # ---- validation -------------------------------------------------------------
  def _check_teacher_paths(self) -> None:
    """--teacher and its `{seed}` placeholder; every path a seed run imports exists.

    Pure Python. `{seed}` belongs in --teacher only, with --seeds >= 2; any other brace
    there is a malformed placeholder. Each seed run's path must exist unless that run
    already imported it (it resumes from its gen_0 copy; checks.imported_into).
    Raises errors.UsageError naming the first path at fault.
    """
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name != "teacher" and isinstance(value, str) and TEACHER_SEED in value:
        raise errors.UsageError(
          f"--{f.name}={value}: {TEACHER_SEED} is replaced in --teacher only (each --seeds run "
          "already writes its own run_dir/seed_S/): drop it"
        )
    if not self.teacher:
      return
    rest = self.teacher.replace(TEACHER_SEED, "")
    if "{" in rest or "}" in rest:
      raise errors.UsageError(
        f"--teacher={self.teacher}: a malformed placeholder; the only one is {TEACHER_SEED} (each "
        "--seeds run's base seed), e.g. --teacher=runs/t/seed_{seed}/gen_0"
      )
    if TEACHER_SEED in self.teacher and self.seeds < 2:
      raise errors.UsageError(
        f"--teacher={self.teacher}: {TEACHER_SEED} takes one teacher per seed of --seeds=N: add "
        "--seeds=N (N >= 2, as the teacher run had), or name one teacher"
      )
    run_dir = self.run_dir or self.default_run_dir()
    missing = []  # (seed, path) of every seed run whose own teacher is not there
    for sub in self.seed_runs():
      path = sub.resolved_teacher
      if self.overwrite:  # --overwrite deletes the run directory before the teacher is read
        real = os.path.realpath(path)
        top = os.path.realpath(run_dir)
        if real == top or real.startswith(top + os.sep):
          raise errors.UsageError(
            f"--teacher={path} is inside --run_dir={run_dir}, which --overwrite deletes: copy "
            "the teacher out of it first, or pass another --run_dir"
          )
      if checks.imported_into(sub.run_dir, path):
        continue
      if self.teacher_per_seed and not os.path.exists(path):
        missing.append((sub.seed, path))
        continue
      checks.check_path(path)
    if missing:
      raise errors.UsageError(self._missing_teachers(missing))

  def _missing_teachers(self, missing) -> str:
    """The one-line error for seed runs whose `{seed}` teacher is missing: which seeds, the
    paths looked for, and the fix. When the teachers' parent holds the teachers of other
    seeds (a teacher run made with another --seed), it names them and the --seed that uses
    them, rather than a teacher run that would not make the missing ones there."""
    s = "s" if len(missing) > 1 else ""
    head = (
      f"--teacher={self.teacher}: the teacher{s} of seed{s} "
      f"{', '.join(str(seed) for seed, _ in missing)} {'are' if s else 'is'} missing (looked "
      f"for {', '.join(path for _, path in missing)}); seeds "
      f"{', '.join(map(str, self.seed_list()))} each need their own teacher: "
    )
    seed_dir = layout.numbered(layout.SEED, TEACHER_SEED)  # seed_{seed}
    parent, _, _ = self.teacher.partition(seed_dir)
    parent = parent.rstrip("/")
    if seed_dir not in self.teacher or not parent:
      return head + "train one teacher per seed there first"
    make = f"one run of the teacher's flags with --seeds={self.seeds} --seed={self.seed}"
    prefix = layout.numbered(layout.SEED, "")
    found = set()
    for name in os.listdir(parent) if os.path.isdir(parent) else ():
      number = name[len(prefix) :] if name.startswith(prefix) else ""
      if number.isdigit() and os.path.exists(self.teacher.replace(TEACHER_SEED, number)):
        found.add(int(number))
    others = sorted(found - set(self.seed_list()))
    if not others:
      return head + f"{make} --run_dir={parent} makes them"
    base = others[0]
    use = (
      f"pass --seed={base} to use them, or "
      if all(base + 100 * i in found for i in range(self.seeds))
      else ""
    )
    return head + (
      f"{parent} holds the teachers of seeds {', '.join(map(str, others))}: {use}make the "
      f"missing ones with {make} --run_dir=<a new directory> and pass "
      f"--teacher=<it>/{seed_dir}/gen_0"
    )

  def _validate_seeds(self, need) -> None:
    """Every seed the run derives (all_seeds) is in SEED_RANGE; checked before anything is written."""
    low, high = SEED_RANGE
    need(low <= self.seed <= high, f"--seed={self.seed}: must be in [{low}, {high}]")
    need(
      self.student_seed is None or low <= self.student_seed <= high,
      f"--student_seed={self.student_seed}: must be in [{low}, {high}]",
    )
    if self.gens < 0 or self.seeds < 1:  # their own checks name them
      return
    for seed, user in self.all_seeds().items():
      need(
        low <= seed <= high,
        f"--seed={self.seed}"
        + (f" --student_seed={self.student_seed}" if self.student_seed is not None else "")
        + f" --gens={self.gens}"
        + (f" --seeds={self.seeds}" if self.seeds > 1 else "")
        + f" gives {user} the seed {seed}, outside [{low}, {high}]: use a smaller seed",
      )

  def check_paths(self) -> None:
    """The run directory (--run_dir or the default) can be created and written.

    Checked before TensorFlow loads any data. Raises errors.UsageError naming the
    path: an existing file, a path under a file, or a directory this process may
    not write (no permission, or a read-only file system).
    """
    check_writable_dir(self.run_dir or self.default_run_dir(), "--run_dir")

  def validate(self, num_replicas: int = 1) -> None:
    """Raises errors.UsageError (one line, naming the fix) on a bad value."""

    def need(cond, msg):
      if not cond:
        raise errors.UsageError(msg)

    for f in dataclasses.fields(
      self
    ):  # nan and inf pass every comparison below (or fail it obscurely)
      values = getattr(self, f.name)
      values = values if isinstance(values, tuple) else (values,)
      bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
      need(not bad, f"--{f.name}={bad[0] if bad else ''}: must be a finite number")
    self._validate_seeds(need)
    need(self.gens >= 0, f"--gens={self.gens}: must be >= 0 (0 trains only the teacher)")
    need(self.epochs >= 1, f"--epochs={self.epochs}: must be >= 1")
    need(self.batch_size >= 1, f"--batch_size={self.batch_size}: must be >= 1")
    need(
      self.batch_size % max(num_replicas, 1) == 0,
      f"--batch_size={self.batch_size} is not divisible by the {num_replicas} replicas: "
      f"use a multiple of {num_replicas}",
    )
    need(self.lr > 0, f"--lr={self.lr}: must be > 0")
    need(0 <= self.momentum < 1, f"--momentum={self.momentum}: must be in [0, 1)")
    need(self.weight_decay >= 0, f"--weight_decay={self.weight_decay}: must be >= 0")
    need(self.temperature > 0, f"--temperature={self.temperature}: must be > 0")
    need(self.kd_weight >= 0, f"--kd_weight={self.kd_weight}: must be >= 0")
    need(self.label_weight >= 0, f"--label_weight={self.label_weight}: must be >= 0")
    need(
      self.loss in LOSSES,
      f"--loss={self.loss!r}: unknown objective; use one of {', '.join(LOSSES)}",
    )
    need(
      self.resolved_kd_weight > 0 or self.resolved_label_weight > 0,
      "--kd_weight and --label_weight are both 0: the students would learn nothing",
    )
    need(self.augment in AUGMENTS, f"--augment={self.augment!r}: use one of {', '.join(AUGMENTS)}")
    need(0 <= self.dropout < 1, f"--dropout={self.dropout}: must be in [0, 1)")
    need(
      self.teacher_dropout is None or 0 <= self.teacher_dropout < 1,
      f"--teacher_dropout={self.teacher_dropout}: must be in [0, 1)",
    )
    need(
      self.teacher_outputs in TEACHER_OUTPUTS,
      f"--teacher_outputs={self.teacher_outputs!r}: use one of {', '.join(TEACHER_OUTPUTS)}",
    )
    need(
      not (self.teacher and self.teacher_dropout is not None),
      "--teacher_dropout sets the dropout of a trained generation 0, and --teacher gives one: drop one",
    )
    need(
      self.teacher or self.teacher_outputs == "logits",
      "--teacher_outputs says what a --teacher=PATH model outputs: add --teacher or drop it",
    )
    self._check_teacher_paths()
    need(
      self.train_examples >= 0, f"--train_examples={self.train_examples}: must be >= 0 (0 = all)"
    )
    need(self.val_examples >= 0, f"--val_examples={self.val_examples}: must be >= 0")
    need(
      len(self.image_size) in (0, 2) and all(int(v) >= 1 for v in self.image_size),
      f"--image_size={','.join(map(str, self.image_size))}: use two positive integers H,W (e.g. 32,32)",
    )
    need(
      not (self.val_split and self.val_examples),
      f"--val_split={self.val_split} and --val_examples={self.val_examples} both name a validation split: drop one",
    )
    need(
      bool(self.train_split) and bool(self.test_split),
      "--train_split and --test_split must not be empty",
    )
    need(
      not self.image_folder
      or not (
        self.val_split
        or self.image_key
        or self.label_key
        or self.train_split != "train"
        or self.test_split != "test"
      ),
      "--image_folder reads DIR/train, DIR/val and DIR/test: drop --train_split/--val_split/--test_split/"
      "--image_key/--label_key",
    )
    default_dataset = next(f.default for f in dataclasses.fields(self) if f.name == "dataset")
    need(
      not self.image_folder or self.dataset == default_dataset,
      f"--image_folder={self.image_folder} and --dataset={self.dataset} both name the data: drop one",
    )
    need(
      all(0 < m < 1 for m in self.lr_milestones)
      and all(a < b for a, b in zip(self.lr_milestones, self.lr_milestones[1:])),
      f"--lr_milestones={','.join(map(str, self.lr_milestones))}: use strictly increasing "
      "fractions of the epochs in (0, 1), e.g. 0.3,0.6,0.8",
    )
    need(0 < self.lr_decay <= 1, f"--lr_decay={self.lr_decay}: must be in (0, 1]")
    need(
      self.lr_schedule in LR_SCHEDULES,
      f"--lr_schedule={self.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}",
    )
    need(
      0 <= self.warmup_epochs < self.epochs,
      f"--warmup_epochs={self.warmup_epochs}: must be in [0, --epochs={self.epochs})",
    )
    need(self.num_cpu_devices >= 0, f"--num_cpu_devices={self.num_cpu_devices}: must be >= 0")
    need(
      self.strategy in STRATEGIES,
      f"--strategy={self.strategy!r}: use one of {', '.join(STRATEGIES)}",
    )
    need(
      self.strategy != "multi_worker" or self.num_cpu_devices == 0,
      "--strategy=multi_worker and --num_cpu_devices are exclusive: drop --num_cpu_devices",
    )
    need(
      self.strategy != "multi_worker" or self.seeds == 1,
      "--strategy=multi_worker runs one seed per launch: drop --seeds (launch once per --seed)",
    )
    need(
      self.steps_per_execution >= 1,
      f"--steps_per_execution={self.steps_per_execution}: must be >= 1",
    )
    need(
      self.mixed_precision in ("none", "bf16", "fp16"),
      f"--mixed_precision={self.mixed_precision!r}: use none, bf16 or fp16",
    )
    need(
      self.verbose in ("auto", "0", "1", "2"), f"--verbose={self.verbose!r}: use auto, 0, 1 or 2"
    )
    need(self.feature_weight >= 0, f"--feature_weight={self.feature_weight}: must be >= 0")
    need(
      not self.feature_projection or self.feature_weight > 0,
      "--feature_projection needs --feature_weight > 0 (it projects the matched features)",
    )
    need(
      0 < self.student_width_ratio <= 4,
      f"--student_width_ratio={self.student_width_ratio}: must be in (0, 4] (the paper uses 1 and 0.5)",
    )
    need(self.seeds >= 1, f"--seeds={self.seeds}: must be >= 1")
    need(
      self.gens >= 1 or not (self.baseline or self.share_stem_head or self.feature_weight),
      "--baseline, --share_stem_head and --feature_weight need students: use --gens >= 1",
    )
    need(
      self.gens >= 1 or not self.ensemble_include_teacher,
      "--ensemble_include_teacher adds the teacher to the BANE-k ensembles of students, and "
      "--gens=0 trains none: use --gens >= 1 or drop it",
    )
    need(self.task in TASKS, f"--task={self.task!r}: use one of {', '.join(TASKS)}")
    need(self.clip_norm >= 0, f"--clip_norm={self.clip_norm}: must be >= 0 (0 = off)")
    if self.init_weights:
      need(
        any(archs.is_keras_arch(a) for a in (self.arch, self.teacher_arch) if a),
        f"--init_weights={self.init_weights} initialises keras:NAME backbones: use "
        "--arch=keras:NAME (or drop --init_weights)",
      )
      need(
        self.init_weights == "imagenet" or os.path.isfile(self.init_weights),
        f"--init_weights={self.init_weights}: no such file: pass imagenet or a weights file of the "
        "backbone without its top (.h5 or .weights.h5)",
      )
    task = tasks.get(self.task)
    task.validate(self)
    for flag, arch, gen in (("--teacher_arch", self.teacher_arch, 0), ("--arch", self.arch, 1)):
      if arch is not None:
        try:
          task.parse_arch(self.arch_for(gen))
        except ValueError as e:
          raise errors.UsageError(f"{flag}={arch!r}: {e}") from None
