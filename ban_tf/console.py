"""What the binary prints: a quiet TensorFlow, the run's log file, run-level progress, Ctrl-C/SIGTERM.

The default console (--verbose=auto or 0) shows one line of config, a header per
generation, Keras' progress bar per epoch on a terminal, and one run-level line
per epoch (generation k/N, epoch e/E, elapsed time, ETA of the whole run). The
log file `log.txt` in the run directory keeps every log record (ours, Keras',
TensorFlow's Python logs and what TensorFlow printed while it was imported);
--verbose=1 or 2 also shows them on the console, with TensorFlow's C++ logs.

Ctrl-C (SIGINT) and SIGTERM (preemption) raise `Interrupted` in the main thread at
the next Python bytecode, i.e. after the TensorFlow call (train step) that is
running: that step is abandoned, the last epoch checkpoint stays, and main prints
one line and exits 128 + the signal number (130, 143). A rerun of the same
command resumes; stopping is as safe as SIGKILL at that point, which
tests/resume_test.py proves for every phase (checkpoints, exports and history.json
are written atomically or cut back on resume).
"""

import contextlib
import datetime
import logging as std_logging
import os
import re
import signal
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

import ban_tf
from ban_tf import results

LOG_FILE = "log.txt"


def is_verbose(verbose) -> bool:
  """--verbose=1 or 2 (or a bare --verbose): every log line on the console too."""
  return str(verbose) not in ("auto", "0")


def import_tensorflow(verbose):
  """Imports TensorFlow with its start-up noise out of the console.

  TensorFlow's C++ logging writes straight to file descriptor 2 while it loads
  (CUDA probes, CPU features, oneDNN notices), before TF_CPP_MIN_LOG_LEVEL is
  read for some of them, so for a quiet console fd 2 is redirected to a temporary
  file during the import; its text is kept for the log file (`startup_text`) and
  replayed on stderr if the import fails. TF_CPP_MIN_LOG_LEVEL=3 (unless set by the
  user) hides the C++ logs that come later (e.g. cuInit failing on a machine
  without GPU). Does nothing when TensorFlow is already imported; when verbose, it
  removes the quiet first import that `import ban_tf` arranges for library use
  (ban_tf/__init__.py), so that TensorFlow prints what it prints.
  """
  if is_verbose(verbose):
    ban_tf.uninstall_quiet_import()
    return
  if "tensorflow" in sys.modules:
    return
  with quiet_import():
    import tensorflow  # lazy: this function is TensorFlow's quiet first import  # noqa: F401
    import keras  # lazy: this function is TensorFlow's quiet first import  # noqa: F401


@contextlib.contextmanager
def quiet_import():
  """File descriptor 2 into a temporary file for the block (an import of TensorFlow);
  its text is kept for the log file (`startup_text`), and replayed on stderr if the
  block fails. Nested: only the outermost redirects."""
  global _startup_text, _quiet_depth
  if _quiet_depth:
    yield
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  sys.stderr.flush()
  saved = os.dup(2)
  _quiet_depth += 1
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    ok = False
    try:
      yield
      ok = True
    finally:
      _quiet_depth -= 1
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      _startup_text = startup_lines(tmp.read().decode(errors="replace"))
      if not ok:
        sys.stderr.write(_startup_text)


_quiet_depth = 0


_startup_text = ""
_STARTED = time.time()  # the process's start, near enough: the log file's header gives it
# A C++ log line's prefix: severity, date or 0000, time, thread id (absl's LOG format).
_CPP_PREFIX = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ")


def startup_lines(text):
  """`text` without repeated lines: TensorFlow loads two libraries that each print the same
  start-up banner; lines equal but for their C++ log prefix's time count as repeats."""
  seen, out = set(), []
  for line in text.splitlines(keepends=True):
    key = _CPP_PREFIX.sub(r"\1 ", line)
    if key not in seen:
      seen.add(key)
      out.append(line)
  return "".join(out)


class _Buffer(std_logging.Handler):
  """Keeps log records until the run directory (and its log.txt) is open."""

  def __init__(self):
    super().__init__(std_logging.DEBUG)
    self.records = []

  def emit(self, record):
    self.records.append(record)


_session = None


class _ConsoleFormat(std_logging.Formatter):
  """A console record as the binary's own lines are: `warning: ...` (like `error: ...`)."""

  def format(self, record):
    return f"{record.levelname.lower()}: {record.getMessage()}"


_CONSOLE_FORMAT = _ConsoleFormat()


@contextlib.contextmanager
def quiet_logs(verbose):
  """The console keeps warnings (all with `verbose`); every record waits for `log_file`.

  Python logs (absl, Keras, TensorFlow, tfds) all reach the root logger, where
  absl's handler writes them to stderr: that handler is raised to WARNING unless
  `verbose` (or absl's --logtostderr / --alsologtostderr), and a buffer keeps every record for log.txt, which opens only once the
  run directory is checked and locked (a refused run writes nothing). The console then
  shows a warning as `warning: MESSAGE`, the form of the binary's `error: ...` lines.
  """
  global _session
  import tensorflow as tf  # lazy: TensorFlow; console is on main's TF-free flag path

  root = std_logging.getLogger()
  absl_handler = logging.get_absl_handler()
  saved = (absl_handler.level, logging.get_verbosity(), tf.get_logger().level, _session)
  buffer = _Buffer()
  root.addHandler(buffer)
  _session = {"buffer": buffer}
  logging.set_verbosity(logging.INFO)
  tf.get_logger().setLevel(std_logging.INFO)
  formatter = absl_handler.python_handler.formatter
  if (
    not is_verbose(verbose) and not _absl_flag("logtostderr") and not _absl_flag("alsologtostderr")
  ):
    absl_handler.setLevel(std_logging.WARNING)
    absl_handler.python_handler.setFormatter(_CONSOLE_FORMAT)  # "warning: ...", as "error: ..."
  try:
    yield
  finally:
    root.removeHandler(buffer)
    absl_handler.python_handler.setFormatter(formatter)
    absl_handler.setLevel(saved[0])
    logging.set_verbosity(saved[1])
    tf.get_logger().setLevel(saved[2])
    _session = saved[3]


def _absl_flag(name):
  """The value of absl's own flag `name` (e.g. --logtostderr asks for every log line), or None."""
  try:
    return flags.FLAGS[name].value if flags.FLAGS.is_parsed() else None
  except KeyError:
    return None


@contextlib.contextmanager
def log_file(directory):
  """Every log record of the run, from its start, into directory/log.txt (appended).

  Inside `quiet_logs`, the records it kept are written first; outside it, this
  only adds the file.
  """
  path = os.path.join(directory, LOG_FILE)
  handler = std_logging.FileHandler(path, encoding="utf-8")
  handler.setFormatter(
    std_logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s")
  )
  handler.setLevel(std_logging.DEBUG)
  with open(path, "a", encoding="utf-8") as f:
    # The process's start: the records kept since (buffered) follow with their own times.
    started = datetime.datetime.fromtimestamp(_STARTED).isoformat(timespec="seconds")
    f.write(f"==== {started} pid {os.getpid()}: {' '.join(sys.argv)}\n")
    if _startup_text:
      f.write("(printed while TensorFlow was imported)\n" + _startup_text)
  root = std_logging.getLogger()
  buffer = _session["buffer"] if _session else None
  if buffer is not None:
    root.removeHandler(buffer)
    for record in buffer.records:
      handler.handle(record)
    buffer.records = []
  root.addHandler(handler)
  try:
    yield path
  finally:
    root.removeHandler(handler)
    handler.close()
    if buffer is not None:
      root.addHandler(buffer)


# ---- the binaries' entry point ---------------------------------------------------------


def run_app(main, **kwargs):
  """absl's app.run(main, **kwargs) for ban_tf's binaries (main, evaluate, report).

  A reader of stdout that goes away early (`python -m ban_tf.main --help | head`)
  ends the binary quietly, as it ends a C tool: exit code 141 (128 + SIGPIPE), no
  BrokenPipeError traceback. A training run stopped this way resumes like a killed one.
  """
  try:
    try:
      app.run(main, **kwargs)
    finally:
      # What is still buffered (a --help shorter than the buffer, printed before absl's exit)
      # is written here, where a closed pipe is caught, not at interpreter exit, where Python
      # prints "Exception ignored ... BrokenPipeError".
      sys.stdout.flush()
  except BrokenPipeError:
    # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail too.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(128 + signal.SIGPIPE)


# ---- interruption -------------------------------------------------------------------


class Interrupted(BaseException):
  """SIGINT or SIGTERM arrived; a BaseException so no `except Exception` swallows it."""

  def __init__(self, signum):
    super().__init__(signum)
    self.signum = signum
    self.where = None  # "gen_k epoch e", filled in by run_progress

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


@contextlib.contextmanager
def interruptible():
  """SIGINT and SIGTERM raise Interrupted (once; later signals wait for the exit) inside the block."""
  fired = []

  def handler(signum, frame):
    del frame
    if fired:
      return
    fired.append(signum)
    raise Interrupted(signum)

  old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for s, h in old.items():
      signal.signal(s, h)


def interrupted_line(exc=None) -> str:
  """The one line printed when the run stops on a signal (`exc`: the Interrupted)."""
  where = getattr(exc, "where", None)
  at = f"at {where}" if where else "before training started"
  return f"interrupted {at}: rerun the same command to resume"


# ---- run-level progress ---------------------------------------------------------------


def _count(n, word):
  return results.plural(n, word)


def _hms(seconds) -> str:
  return str(datetime.timedelta(seconds=int(round(max(seconds, 0)))))


class Progress:
  """Counts the run's epochs (all generations, baseline and seeds) for elapsed time and ETA.

  ETA = (wall time since the run started / epochs trained so far in this process) x
  epochs still to train: it includes evaluation and export time, and epochs that a
  resumed run finds done count as done. Only epochs this run trains are counted
  (Config.trained_epochs: an imported --teacher's never are).
  """

  def __init__(self, total_epochs, gens, out=None):
    self.total, self.gens = int(total_epochs), int(gens)
    self.out = out or sys.stdout
    self.t0 = time.time()
    self.done_before = 0  # epochs found done (skipped generations, resumed checkpoints)
    self.trained = 0  # epochs trained by this process
    self.where = None  # "gen_k epoch e" of the epoch being trained
    self.prefix = ""  # "seed S (i/n) " with --seeds

  def print(self, text):
    print(text, file=self.out, flush=True)

  def gen_label(self, gen) -> str:
    """'gen 1/3 BAN-1' (k of the N born-again generations; 0 is the teacher) or 'baseline'."""
    return "baseline" if gen.gen == "baseline" else f"gen {gen.gen}/{self.gens} {gen.role}"

  def skip(self, epochs, text=None):
    """A finished generation found on disk: its epochs count as done."""
    self.done_before += epochs
    if text:
      self.print(self.prefix + text)

  def generation(self, gen, header, first_epoch, epochs):
    self.done_before += first_epoch
    if (
      first_epoch >= epochs
    ):  # interrupted after its last epoch: only evaluation and export are left
      self.where = self._after_training(gen, epochs)
      resumed = f" (all {_count(epochs, 'epoch')} trained before: evaluating and exporting)"
    else:
      self.where = f"{os.path.basename(gen.out_dir)} epoch {first_epoch + 1}"
      resumed = f" (resuming at epoch {first_epoch + 1})" if first_epoch else ""
    self.print(f"{self.prefix}{self.gen_label(gen)}: {header}{resumed}")

  @staticmethod
  def _after_training(gen, epochs):
    return f"{os.path.basename(gen.out_dir)} evaluation (all {_count(epochs, 'epoch')} trained)"

  def epoch_begin(self, gen, epoch):
    self.where = f"{os.path.basename(gen.out_dir)} epoch {epoch + 1}"

  def epoch_end(self, gen, epoch, epochs, logs, lr):
    """Counts a trained epoch and prints its run-level line."""
    self.print(self.epoch_line(gen, epoch, epochs, logs, lr))

  def epoch_line(self, gen, epoch, epochs, logs, lr) -> str:
    """Counts a trained epoch; returns its run-level line."""
    self.trained += 1
    if epoch + 1 >= epochs:
      self.where = self._after_training(gen, epochs)
    elapsed = time.time() - self.t0
    remaining = max(self.total - self.done_before - self.trained, 0)
    eta = elapsed / self.trained * remaining
    shown = [
      f"{k} {logs[k]:.4g}"
      for k in (
        "loss",
        "accuracy",
        "perplexity",
        "teacher_agreement",
        "val_accuracy",
        "val_perplexity",
      )
      if k in logs
    ]
    return (
      f"{self.prefix}{self.gen_label(gen)} epoch {epoch + 1}/{epochs}: {', '.join(shown)}, "
      f"lr {lr:.3g} | elapsed {_hms(elapsed)}, run ETA {_hms(eta)} "
      f"({self.done_before + self.trained}/{self.total} epochs)"
    )


_progress = None


def progress():
  """The binary's Progress, or None (library use: nothing is printed)."""
  return _progress


@contextlib.contextmanager
def run_progress(total_epochs, gens, out=None):
  global _progress
  saved, _progress = _progress, Progress(total_epochs, gens, out)
  try:
    yield _progress
  except Interrupted as e:
    e.where = _progress.where
    raise
  finally:
    _progress = saved


def summary_line(cfg, replicas, spec) -> str:
  """The one-line config summary (config.json holds every field)."""
  teacher = cfg.teacher_label  # the architecture, or "<file> (pretrained)" with --teacher
  arch = cfg.arch_for(1) if teacher == cfg.arch_for(1) else f"{teacher} -> {cfg.arch_for(1)}"
  sizes = f"{spec.num_train}/{spec.num_val}/{spec.num_test} {spec.unit}"
  seeds = f"seeds {','.join(map(str, cfg.seed_list()))}" if cfg.seeds > 1 else f"seed {cfg.seed}"
  return (
    f"{spec.name} (train/val/test {sizes}), {arch}, {results.plural(cfg.gens, 'generation')} of {cfg.resolved_loss} "
    f"(T={cfg.temperature:g}), {results.plural(cfg.epochs, 'epoch')}, batch {cfg.batch_size}, lr {cfg.lr:g}, {seeds}, "
    f"{replicas} replica{'s' if replicas > 1 else ''}"
  )
