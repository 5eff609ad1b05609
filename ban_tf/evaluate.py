"""Uses exported SavedModels on their own: re-evaluates a run, or classifies image files.

  python -m ban_tf.evaluate --run_dir=runs/x [--split=test|val] [--data_dir=...]
  python -m ban_tf.evaluate --saved_model=runs/x/gen_1/saved_model --images=a.png,b.jpg --top_k=3

A run of any task: its config.json names the task (tasks/) and the data; the
table printed is the run's results table (test and val error, or val and test
perplexity for a language model), recomputed from the SavedModels.

Models are loaded with tf.saved_model.load and called through their `serve`
endpoint (float32 raw pixels [N, H, W, C] or int32 token ids [N, T] -> logits,
or mean probabilities for BANE ensembles; --images reads `serving_default`, whose
output name says which: `logits` or `probabilities`): no Keras model code, Distiller or custom objects are involved,
so the numbers printed here check what was exported, not what was in memory.
"""

import dataclasses
import os
import re
import sys

import numpy as np
from absl import flags
from PIL import Image
from PIL import ImageOps

from ban_tf import console

if __name__ == "__main__":  # the binary: TensorFlow's start-up noise stays off the console
  console.import_tensorflow("auto")
import tensorflow as tf  # noqa: E402  # pylint: disable=g-import-not-at-top,wrong-import-position

from ban_tf import config as config_lib  # noqa: E402  # pylint: disable=wrong-import-position
from ban_tf import errors  # noqa: E402  # pylint: disable=wrong-import-position
from ban_tf import export  # noqa: E402  # pylint: disable=wrong-import-position
from ban_tf import layout  # noqa: E402  # pylint: disable=wrong-import-position
from ban_tf import report  # noqa: E402  # pylint: disable=wrong-import-position
from ban_tf import results as results_lib  # noqa: E402  # pylint: disable=wrong-import-position
from ban_tf import rundir  # noqa: E402  # pylint: disable=wrong-import-position
from ban_tf import tasks  # noqa: E402  # pylint: disable=wrong-import-position
from ban_tf.tasks import base  # noqa: E402  # pylint: disable=wrong-import-position

SPLITS = ("test", "val")


def load(path):
  """The SavedModel at `path` (its `serve` function); raises errors.UsageError."""
  if not os.path.exists(os.path.join(path, layout.SAVED_MODEL_PB)):
    raise errors.UsageError(
      f"{path} is not a SavedModel directory (no saved_model.pb): pass gen_k/saved_model"
    )
  try:
    return tf.saved_model.load(path)
  except Exception as e:  # pylint: disable=broad-except  (truncated proto, missing or scrambled variables)
    raise errors.UsageError(
      f"{path} cannot be loaded ({type(e).__name__}): it is damaged; restore it, "
      "or retrain its generation"
    ) from None


def score(model, dataset, probabilities=False, stateful=False):
  """Mean cross-entropy and top-1 accuracy of a loaded SavedModel over (inputs, labels[, weights]) batches.

  Every label counts once: an example of a classifier ([N, C] outputs), or a token
  of a language model ([N, T, V] outputs, [N, T] labels). Examples of weight 0 are
  padding (data.Dataset pads the last batch) and are not counted; a weight applies
  to every token of its row. `probabilities`: the model serves probabilities (BANE
  ensembles, by the disk contract), not logits. `stateful`: call `serve_stateful`
  instead, carrying the state from batch to batch (the batches are consecutive
  windows of the same rows: a language model run with --lm_state=carry).

  Returns:
    {"loss": nats per label, "accuracy": fraction, "count": labels scored}.
  """
  ce = correct = count = 0.0
  for out, y, w in base.serve_batches(model, dataset, stateful=stateful):
    log_p = base.log_probabilities(out, probabilities)
    ce -= float(np.sum(w * np.take_along_axis(log_p, y[:, None], -1)[:, 0]))
    correct += float(np.sum(w * (np.argmax(out, -1) == y)))
    count += float(w.sum())
  return {"loss": ce / count, "accuracy": correct / count, "count": int(count)}


def accuracy(model, dataset):
  """Top-1 accuracy of a loaded SavedModel over (inputs, labels[, weights]) batches."""
  return score(model, dataset)["accuracy"]


def evaluate_run(run_dir, split=None, data_dir=None, batch_size=None):
  """Evaluates every gen_k/ and ensemble_k/ SavedModel of a run.

  Args:
    run_dir: a run directory written by ban_tf.main (its config.json names the
      task and the data).
    split: "test" or "val"; None: both (val only where the run has one).
    data_dir: overrides the run's --data_dir (the data moved).
    batch_size: evaluation batch size (default: the run's; a language model's
      evaluation layout depends on it, so keep it to match results.json).

  Returns:
    A dict shaped like results.json: "generations" and "ensembles", each with
    {split}_loss, {split}_accuracy, {split}_error and the task's derived fields
    (perplexities), plus gen/arch/params or name/members; "splits" and "task";
    "predictions_computed": the models whose per-example outputs (predictions.py)
    were missing and are now computed from their SavedModels and stored. With the test
    split, each row's `vs_teacher` / `vs_baseline` (report.attach_comparisons: what
    results.json holds), or "comparisons_error": why a stored outputs file cannot be used.

  Raises:
    errors.UsageError: not a run directory, no such split, nothing exported.
  """
  if split is not None and split not in SPLITS:
    raise errors.UsageError(
      f"--split={split}: use test or val (the training split is not evaluated)"
    )
  if batch_size is not None and batch_size < 0:
    raise errors.UsageError(f"--batch_size={batch_size}: must be >= 1 (or 0 for the run's)")
  if not os.path.isdir(run_dir):
    raise errors.UsageError(
      f"--run_dir={run_dir} is not a directory: pass a run directory written by ban_tf.main"
    )
  run = rundir.RunFiles(run_dir)
  cfg_path = run.config_path
  if not os.path.exists(cfg_path):
    raise errors.UsageError(
      f"{run_dir} has no config.json: pass a run directory written by ban_tf.main"
    )
  stored = export.read_json_checked(cfg_path, "restore it (it holds the run's flags and data set)")
  try:
    cfg = config_lib.Config.from_dict(stored)
    task = tasks.get(cfg.task)
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    raise errors.UsageError(
      f"{cfg_path} is damaged ({type(e).__name__}: not a ban_tf config): restore it"
    ) from None
  if not run.exported(layout.GEN):  # before the data set is read
    seed_runs = run.seed_runs()
    if seed_runs:
      raise errors.UsageError(
        f"{run_dir} is the parent of --seeds runs ({', '.join(seed_runs)}): evaluate one "
        f"at a time, --run_dir={os.path.join(run_dir, seed_runs[0])}"
      )
    raise errors.UsageError(
      f"{run_dir} holds no exported generation (gen_k/saved_model): is the run finished?"
    )
  if data_dir:
    cfg = dataclasses.replace(cfg, data_dir=data_dir)
  dataset = task.load_data(cfg)
  batch_size = batch_size or cfg.batch_size
  pipelines = {
    s: getattr(dataset, s)(batch_size) for s in (("val", "test") if split is None else (split,))
  }
  if split == "val" and pipelines["val"] is None:
    raise errors.UsageError(
      f"{run_dir} was trained without a validation split (--val_examples=0, no "
      "--val_split or val/ folder): use --split=test"
    )
  pipelines = {s: ds for s, ds in pipelines.items() if ds is not None}

  def evaluated(model, probabilities):
    """The model's numbers, or {"damaged": why} when it is missing, unreadable, or not
    the model the run recorded (manifest.py): one damaged model never loses the table."""
    path = model.read_saved_model
    rel = os.path.relpath(path, run_dir)
    try:
      if not os.path.exists(os.path.join(path, layout.SAVED_MODEL_PB)):
        return {"damaged": f"{rel} is missing or incomplete (no saved_model.pb)"}
      model.check()
      loaded = load(path)
      entry = {}
      for s, ds in pipelines.items():  # carrying the state over the stream where the task does
        res = task.carry(cfg).score(score, loaded, ds, probabilities)
        entry.update(
          {
            f"{s}_loss": res["loss"],
            f"{s}_accuracy": res["accuracy"],
            f"{s}_error": 1.0 - res["accuracy"],
          }
        )
    except errors.UsageError as e:
      return {"damaged": str(e)}
    except Exception as e:  # pylint: disable=broad-except  (TF load/call errors: many kinds)
      return {
        "damaged": f"{rel} cannot be loaded or run ({type(e).__name__}): restore it, or retrain it"
      }
    entry.update(task.summarize(entry))
    return entry

  def meta(model):
    m, _ = model.metrics_or_why()
    return m or {}  # names and sizes only: the numbers come from the SavedModel

  out = {
    "task": task.name,
    "splits": list(pipelines),
    "split": split,
    "dataset": cfg.data_name,
    "seed": cfg.seed,
    "generations": [],
    "ensembles": [],
  }
  for gen, model in run.exported(layout.GEN):
    m = meta(model)
    out["generations"].append(
      {
        "gen": gen,
        "arch": m.get("arch", "?"),
        "params": m.get("params", 0),
        **evaluated(model, probabilities=False),
      }
    )
  for k, model in run.exported(layout.ENSEMBLE):
    m = meta(model)  # ensembles serve mean probabilities (generations.build_ensemble)
    out["ensembles"].append(
      {
        "name": m.get("name", f"BANE-{k}"),
        "members": m.get("members", []),
        **evaluated(model, probabilities=True),
      }
    )
  # Per-example outputs (predictions.py) of models finished before they were stored.
  from ban_tf import report  # lazy: report (matplotlib, SciPy: ~0.75 s CPU): --images needs none

  rows = {
    "generations": [g for g in out["generations"] if not g.get("damaged")],
    "ensembles": [e for e in out["ensembles"] if not e.get("damaged")],
    "baseline": {"gen": "baseline"} if export.is_done(os.path.join(run_dir, "baseline")) else None,
  }
  out["predictions_computed"] = report.ensure_predictions(run_dir, cfg, rows, dataset)
  if "test" in pipelines:
    # Δ vs teacher (and vs baseline) with its 95% CI, p and verdict, from the stored per-example
    # outputs: the report's computation (results.md's numbers), written onto the rows above.
    try:
      report.attach_comparisons(run_dir, task, rows)
    except errors.UsageError as e:  # a damaged outputs file: the table stands, the error follows
      out["comparisons_error"] = str(e)
  return out


def table(evaluated):
  """The run's results table (results.table, the task's columns) of an evaluate_run result."""
  task = tasks.get(evaluated.get("task", "image"))
  if evaluated["splits"] != ["val"]:
    return results_lib.table(evaluated, task.headline, task.extra_columns)

  # Only the val split: it goes in the table's main column, and only there.
  def as_test(entry):
    return {k: v for k, v in entry.items() if not k.startswith("val_")} | {
      "test_" + k[4:]: v for k, v in entry.items() if k.startswith("val_")
    }

  as_results = {
    "generations": [as_test(g) for g in evaluated["generations"]],
    "ensembles": [as_test(e) for e in evaluated["ensembles"]],
  }
  return results_lib.table(as_results, task.headline).replace("Test ", "Val ")


def differences(evaluated, results):
  """{field: largest |difference| to results.json} over the models both hold.

  Fields: {split}_accuracy and the task's headline and extra metrics (e.g.
  test_perplexity) of the evaluated splits.
  """
  task = tasks.get(evaluated.get("task", "image"))
  fields = [f"{s}_accuracy" for s in evaluated["splits"]]
  fields += [
    m.key
    for m in (task.headline,) + tuple(task.extra_columns)
    if m.key.split("_")[0] in evaluated["splits"] and m.derive is None
  ]
  stored = {("g", g["gen"]): g for g in results["generations"]}
  stored.update({("e", e["name"]): e for e in results["ensembles"]})
  diffs = {}
  for key, e in [(("g", g["gen"]), g) for g in evaluated["generations"]] + [
    (("e", x["name"]), x) for x in evaluated["ensembles"]
  ]:
    for f in fields:
      if key in stored and f in stored[key] and f in e:
        diffs[f] = max(diffs.get(f, 0.0), abs(stored[key][f] - e[f]))
  return diffs


def max_difference(evaluated, results):
  """Largest |accuracy difference| to results.json, over the models both hold."""
  diffs = [v for k, v in differences(evaluated, results).items() if k.endswith("_accuracy")]
  return max(diffs) if diffs else None


# ---- image files ----------------------------------------------------------------
def input_shape(path, model=None):
  """(H, W, C) the SavedModel was trained on (from its fingerprint batch)."""
  fp = os.path.join(path, export.FINGERPRINT_FILE)
  if os.path.exists(fp):
    return tuple(np.load(fp)["inputs"].shape[1:])
  spec = (model or load(path)).signatures["serving_default"].structured_input_signature[1]
  shape = tuple(next(iter(spec.values())).shape[1:])
  if None in shape:
    raise errors.UsageError(
      f"{path} has no {export.FINGERPRINT_FILE} and accepts any image size, so the size to "
      "resize images to is unknown: export it with a fixed input shape (keras.Input((H, W, C)))"
    )
  return shape


def class_names(path, num_classes):
  """labels.txt inside the SavedModel (or beside it, gen_k/labels.txt), else the run's tfds
  data set, else class_0..."""
  labels = os.path.join(path, export.LABELS_FILE)
  if not os.path.exists(labels):
    labels = os.path.join(os.path.dirname(os.path.normpath(path)), export.LABELS_FILE)
  if os.path.exists(labels):
    with open(labels) as f:
      names = [line.rstrip("\n") for line in f]
    if len(names) == num_classes:
      return names
  cfg_path = rundir.RunFiles(
    os.path.dirname(os.path.dirname(os.path.abspath(path)))
  ).config_path  # a run's gen_k/saved_model
  if os.path.exists(cfg_path):
    try:
      import tensorflow_datasets as tfds  # lazy: tfds (~0.4 s CPU): class names only

      cfg = export.read_json(cfg_path)
      names = list(
        tfds.builder(cfg["dataset"], data_dir=cfg.get("data_dir")).info.features["label"].names
      )
      if len(names) == num_classes:
        return names
    except Exception:  # pylint: disable=broad-except  (names are a nicety; numbers still print)
      pass
  return [f"class_{i}" for i in range(num_classes)]


def load_image(path, shape):
  """Raw 0..255 float32 pixels of an image file, EXIF orientation applied, converted and
  resized to (H, W, C). Raises errors.UsageError (an unreadable or oversized file)."""
  if len(shape) != 3:  # a language model's [T] tokens, a flattened [H*W] vector, ...
    raise errors.UsageError(
      f"the model takes inputs of shape {tuple(shape)} per example, not images [H, W, C]: "
      "--images needs an image model (evaluate a language model with --run_dir)"
    )
  h, w, c = shape
  if c not in (1, 3):
    raise errors.UsageError(
      f"the model takes {c}-channel images: only 1 (grey) or 3 (RGB) are supported"
    )
  try:
    with Image.open(path) as im:
      # Upright, as a photo viewer (and an --image_folder run, data.pil_pixels) reads it.
      im = ImageOps.exif_transpose(im).convert("L" if c == 1 else "RGB")
      if im.size != (w, h):
        im = im.resize((w, h), Image.BILINEAR)
      pixels = np.asarray(im, dtype=np.float32)
  except Image.DecompressionBombError as e:
    raise errors.UsageError(
      f"{path}: too large to decode safely ({e}): pass a smaller image"
    ) from None
  except (OSError, ValueError) as e:
    raise errors.UsageError(
      f"{path}: not a readable image ({type(e).__name__}): pass PNG or JPEG files"
    ) from None
  return pixels[..., None] if c == 1 else pixels


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _classifier(path, model, outputs="auto"):
  """(callable float32 pixels [N, H, W, C] -> probabilities [N, K], a note or None).

  Reads `serving_default` and what its output is named: `logits` (generations) or
  `probabilities` (BANE ensembles), the names ban_tf writes. A SavedModel whose one output
  has another name (a model.export() elsewhere, or a ban_tf run from before outputs were
  named, `output_0`) needs `outputs` (--outputs=logits|probabilities); with "auto" its rows
  are read as probabilities when they are non-negative and sum to 1, else as logits, and
  the note says so. Raises errors.UsageError for a model that serves no single image batch.
  """
  sig = getattr(model, "signatures", {}).get("serving_default")
  if sig is None:
    if not hasattr(model, export.SERVE):
      raise errors.UsageError(
        f"{path} has neither a serving_default signature nor a `{export.SERVE}` function: "
        "export it with model.export(DIR)"
      )
    fn, name, dtype, keys = (
      (lambda x: {"output_0": getattr(model, export.SERVE)(x)}),
      None,
      tf.float32,
      ["output_0"],
    )
  else:
    inputs = dict(sig.structured_input_signature[1])
    if len(inputs) != 1:
      raise errors.UsageError(
        f"{path}: serving_default takes {sorted(inputs)}: it must take one image batch"
      )
    ((name, spec),) = inputs.items()
    fn, dtype, keys = sig, spec.dtype, sorted(sig.structured_outputs)
  named = [k for k in (export.PROBABILITIES, export.LOGITS) if k in keys]
  if outputs != "auto" and outputs in keys:
    key = kind = outputs
  elif outputs != "auto" and len(keys) == 1 and not named:
    key, kind = keys[0], outputs
  elif outputs != "auto":
    raise errors.UsageError(
      f"{path}: serving_default returns {keys}, not {outputs}: drop --outputs={outputs} "
      "(outputs named logits or probabilities are read by their name)"
    )
  elif named:
    key = kind = named[0]
  elif len(keys) == 1:
    key, kind = keys[0], None
  else:
    raise errors.UsageError(
      f"{path}: serving_default returns {keys}, none named {export.LOGITS} or "
      f"{export.PROBABILITIES}: pass --outputs=logits|probabilities and one output"
    )

  def classify_batch(x):
    x = tf.cast(tf.constant(x), dtype)
    out = (fn(**{name: x}) if name else fn(x))[key].numpy().astype(np.float64)
    if kind == export.PROBABILITIES:
      return out
    if kind == export.LOGITS:
      return _softmax(out)
    return out if np.all(out >= 0) and np.allclose(out.sum(-1), 1.0, atol=1e-4) else _softmax(out)

  note = None
  if kind is None:
    note = (
      f"note: {path} serves '{key}', named neither {export.LOGITS} nor {export.PROBABILITIES} (an export from "
      "elsewhere, or a ban_tf run from before outputs were named): read as probabilities where its rows are "
      "non-negative and sum to 1, else as logits; --outputs=logits|probabilities says which"
    )
  return classify_batch, note


def classify(saved_model, images, top_k=3, outputs="auto"):
  """[(image path, [(class name, probability), ...top_k])] for image files.

  `saved_model`: a SavedModel directory, or a run's gen_k/ or ensemble_k/ holding one.
  `outputs`: what serving_default returns where its output is not named logits or
  probabilities (see _classifier): auto, logits or probabilities.
  """
  saved_model = layout.saved_model_of(saved_model) or saved_model
  model = load(saved_model)
  shape = input_shape(saved_model, model)
  batch = np.stack([load_image(p, shape) for p in images])
  classify_batch, note = _classifier(saved_model, model, outputs)
  if note:
    print(note, file=sys.stderr)
  probs = classify_batch(batch)
  names = class_names(saved_model, probs.shape[-1])
  top = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
  return [(p, [(names[i], float(probs[n, i])) for i in top[n]]) for n, p in enumerate(images)]


def _given(fv, name):
  """Whether flag `name` was set on the command line (False for a plain namespace, as tests pass)."""
  try:
    return bool(fv[name].present)
  except (TypeError, KeyError, AttributeError):
    return False


def main(argv, fv):
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments {argv[1:]}: flags take the form --name=value")
  if bool(fv.run_dir) == bool(fv.saved_model):
    raise errors.UsageError(
      "pass --run_dir=DIR (re-evaluate a run) or --saved_model=DIR --images=... (classify)"
    )
  # A flag of the other mode would be ignored silently (--run_dir=R --images=a.png re-evaluated the run).
  other = (
    ("split", "data_dir", "batch_size", "output_json")
    if fv.saved_model
    else ("images", "top_k", "outputs")
  )
  given = [f"--{name}" for name in other if _given(fv, name)]
  if given:
    mode = (
      "--saved_model (classify --images)" if fv.saved_model else "--run_dir (re-evaluate a run)"
    )
    raise errors.UsageError(
      f"{', '.join(given)} does not apply to {mode}: drop it, or use the other mode"
    )
  if fv.saved_model:
    if not fv.images:
      raise errors.UsageError("--saved_model needs --images=a.png,b.jpg")
    if fv.top_k < 1:
      raise errors.UsageError(f"--top_k={fv.top_k}: must be >= 1")
    outputs = getattr(fv, "outputs", "auto") or "auto"
    if outputs not in ("auto", export.LOGITS, export.PROBABILITIES):
      raise errors.UsageError(f"--outputs={outputs}: use auto, logits or probabilities")
    for path, top in classify(fv.saved_model, fv.images, fv.top_k, outputs):
      print(f"{path}: " + ", ".join(f"{name} ({p:.3f})" for name, p in top))
    return
  evaluated = evaluate_run(fv.run_dir, fv.split or None, fv.data_dir, fv.batch_size)
  damaged = [e for e in evaluated["generations"] + evaluated["ensembles"] if e.get("damaged")]
  print(
    f"{fv.run_dir}: {' and '.join(evaluated['splits'])} split(s), "
    f"{results_lib.plural(len(evaluated['generations']), 'generation')} and "
    f"{results_lib.plural(len(evaluated['ensembles']), 'ensemble')} reloaded from their SavedModels\n"
  )
  print(table(evaluated) + report.comparisons_note(evaluated))
  if evaluated.get("predictions_computed"):
    print(
      "per-example outputs computed and stored (predictions.npz) for "
      + ", ".join(evaluated["predictions_computed"])
    )
  results_path = rundir.RunFiles(fv.run_dir).results_path
  if os.path.exists(results_path):
    try:
      diffs = differences(evaluated, export.read_json_checked(results_path, "not compared"))
    except (errors.UsageError, KeyError, TypeError) as e:
      print(f"results.json not compared: {e}")
      diffs = {}
    accs = [v for k, v in diffs.items() if k.endswith("_accuracy")]
    if accs:
      print(f"max |accuracy difference| vs results.json: {max(accs):.2e}")
    for k, v in diffs.items():
      if not k.endswith("_accuracy"):
        print(f"max |{k} difference| vs results.json: {v:.2e}")
  if fv.output_json:
    export.write_json(evaluated, fv.output_json)
  if damaged:
    total = len(evaluated["generations"]) + len(evaluated["ensembles"])
    raise errors.UsageError(
      f"{len(damaged)} of {total} models could not be evaluated ({damaged[0]['damaged']}"
      + (", ..." if len(damaged) > 1 else "")
      + "): see the damaged rows above"
    )
  if evaluated.get("comparisons_error"):  # the table above stands without paired statistics
    raise errors.UsageError(evaluated["comparisons_error"])


def define_flags(fv):
  """The binary's flags, on `fv` (absl FlagValues; tests pass a fresh one)."""
  d = lambda define, *a: define(*a, flag_values=fv)
  d(
    flags.DEFINE_string,
    "run_dir",
    None,
    "Run directory whose gen_k/ and ensemble_k/ SavedModels to re-evaluate.",
  )
  d(
    flags.DEFINE_string,
    "split",
    None,
    "Split to evaluate on: test or val (default: val, where the run has one, and test).",
  )
  d(flags.DEFINE_string, "data_dir", None, "TFDS data directory (default: the run's config.json).")
  d(flags.DEFINE_integer, "batch_size", 0, "Evaluation batch size (default: the run's).")
  d(flags.DEFINE_string, "output_json", None, "Also write the numbers as JSON here.")
  d(flags.DEFINE_string, "saved_model", None, "A SavedModel directory to classify --images with.")
  d(
    flags.DEFINE_list,
    "images",
    [],
    "Image files (PNG/JPEG) to classify; resized to the model's input.",
  )
  d(flags.DEFINE_integer, "top_k", 3, "How many classes to print per image.")
  d(
    flags.DEFINE_string,
    "outputs",
    "auto",
    "What --saved_model serves where its output is named neither logits "
    "nor probabilities (ban_tf names them): logits or probabilities (auto: rows that sum to 1 are probabilities).",
  )


def cli(argv, fv):
  """main() under the binary's error contract: one `error: ...` line on stderr and
  exit code 2 for bad flags, paths and damaged files; returns 0 otherwise."""
  try:
    main(argv, fv)
  except errors.UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  from absl import logging  # pylint: disable=g-import-not-at-top

  define_flags(flags.FLAGS)

  def _parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      print("error: " + re.sub(r"^(ERROR:+\s*)+", "", str(e)) + " (see --help)", file=sys.stderr)
      sys.exit(2)

  def _main(argv):
    tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.WARNING)  # tfds logs every file it opens at INFO
    sys.exit(cli(argv, flags.FLAGS))

  console.run_app(_main, flags_parser=_parse)
