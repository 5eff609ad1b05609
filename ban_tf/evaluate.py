"""Uses exported SavedModels on their own: re-evaluates a run, or classifies image files.

  python -m ban_tf.evaluate --run_dir=runs/x [--split=test|val] [--data_dir=...]
  python -m ban_tf.evaluate --saved_model=runs/x/gen_1/saved_model --images=a.png,b.jpg --top_k=3

Models are loaded with tf.saved_model.load and called through their `serve`
endpoint (float32 raw pixels [N, H, W, C] -> logits, or mean probabilities for
BANE ensembles): no Keras model code, Distiller or custom objects are involved,
so the numbers printed here check what was exported, not what was in memory.
"""

import glob
import os
import re
import sys

import numpy as np
import tensorflow as tf

from ban_tf import errors
from ban_tf import export

SPLITS = ("test", "val")


def load(path):
  """The SavedModel at `path` (its `serve` function); raises errors.UsageError."""
  if not os.path.exists(os.path.join(path, "saved_model.pb")):
    raise errors.UsageError(f"{path} is not a SavedModel directory (no saved_model.pb): pass gen_k/saved_model")
  return tf.saved_model.load(path)


def accuracy(model, dataset):
  """Top-1 accuracy of a loaded SavedModel over (images, labels[, weights]) batches.

  Examples of weight 0 are padding (data.Dataset pads the last batch) and are not counted.
  """
  correct = total = 0
  for batch in dataset:
    x, y = batch[0], batch[1].numpy()
    real = batch[2].numpy() > 0 if len(batch) > 2 else np.ones(y.shape, bool)
    pred = np.argmax(getattr(model, export.SERVE)(x).numpy(), axis=-1)
    correct += int(np.sum((pred == y) & real))
    total += int(np.sum(real))
  return correct / total


def _numbered(run_dir, prefix):
  found = []
  for path in glob.glob(os.path.join(run_dir, f"{prefix}_*", "saved_model")):
    m = re.fullmatch(rf"{prefix}_(\d+)", os.path.basename(os.path.dirname(path)))
    if m:
      found.append((int(m.group(1)), path))
  return sorted(found)


def evaluate_run(run_dir, split="test", data_dir=None, batch_size=None):
  """Evaluates every gen_k/ and ensemble_k/ SavedModel of a run on `split`.

  Returns a dict shaped like results.json: generations and ensembles, each with
  `{split}_accuracy` and `{split}_error` (plus gen/arch/params/name/members).
  """
  from ban_tf import data  # pylint: disable=g-import-not-at-top  (tfds is only needed here)
  if split not in SPLITS:
    raise errors.UsageError(f"--split={split!r}: use test or val")
  cfg_path = os.path.join(run_dir, "config.json")
  if not os.path.exists(cfg_path):
    raise errors.UsageError(f"{run_dir} has no config.json: pass a run directory written by ban_tf.main")
  cfg = export.read_json(cfg_path)
  if split == "val" and not (cfg.get("val_examples") or cfg.get("val_split") or cfg.get("image_folder")):
    raise errors.UsageError(f"{run_dir} was trained without a validation split (--val_examples=0): use --split=test")
  dataset = data.Dataset.from_config(cfg, data_dir)
  batch_size = batch_size or cfg.get("batch_size", 128)
  ds = dataset.test(batch_size) if split == "test" else dataset.val(batch_size)
  if ds is None:  # an image folder without DIR/val
    raise errors.UsageError(f"{run_dir} was trained without a validation split: use --split=test")
  out = {"split": split, "dataset": cfg["dataset"], "seed": cfg.get("seed"), "generations": [], "ensembles": []}
  for gen, path in _numbered(run_dir, "gen"):
    meta_path = os.path.join(os.path.dirname(path), "metrics.json")
    meta = export.read_json(meta_path) if os.path.exists(meta_path) else {}
    acc = accuracy(load(path), ds)
    out["generations"].append({"gen": gen, "arch": meta.get("arch", "?"), "params": meta.get("params", 0),
                               f"{split}_accuracy": acc, f"{split}_error": 1.0 - acc})
  for k, path in _numbered(run_dir, "ensemble"):
    meta_path = os.path.join(os.path.dirname(path), "metrics.json")
    meta = export.read_json(meta_path) if os.path.exists(meta_path) else {}
    acc = accuracy(load(path), ds)
    out["ensembles"].append({"name": meta.get("name", f"BANE-{k}"), "members": meta.get("members", []),
                             f"{split}_accuracy": acc, f"{split}_error": 1.0 - acc})
  if not out["generations"]:
    raise errors.UsageError(f"{run_dir} holds no exported generation (gen_k/saved_model): is the run finished?")
  return out


def table(evaluated):
  """The results table (generations.results_table) of an evaluate_run result."""
  from ban_tf import generations  # pylint: disable=g-import-not-at-top  (only for its table)
  split = evaluated["split"]
  def row(entry):  # the evaluated split goes in the table's main column, and only there
    return {k: v for k, v in entry.items() if not k.startswith(split)} | {"test_error": entry[f"{split}_error"]}
  as_results = {"generations": [row(g) for g in evaluated["generations"]],
                "ensembles": [row(e) for e in evaluated["ensembles"]]}
  text = generations.results_table(as_results)
  return text if split == "test" else text.replace("Test error", "Val error")


def max_difference(evaluated, results):
  """Largest |accuracy difference| to results.json, over the models both hold."""
  split = evaluated["split"]
  stored = {("g", g["gen"]): g for g in results["generations"]}
  stored.update({("e", e["name"]): e for e in results["ensembles"]})
  diffs = []
  for key, e in [(("g", g["gen"]), g) for g in evaluated["generations"]] + \
                [(("e", x["name"]), x) for x in evaluated["ensembles"]]:
    if key in stored and f"{split}_accuracy" in stored[key]:
      diffs.append(abs(stored[key][f"{split}_accuracy"] - e[f"{split}_accuracy"]))
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
    raise errors.UsageError(f"{path} has no {export.FINGERPRINT_FILE} and accepts any image size: cannot resize")
  return shape


def class_names(path, num_classes):
  """labels.txt beside the SavedModel, else the run's tfds data set, else class_0..."""
  labels = os.path.join(path, export.LABELS_FILE)
  if os.path.exists(labels):
    with open(labels) as f:
      names = [line.rstrip("\n") for line in f]
    if len(names) == num_classes:
      return names
  cfg_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.json")
  if os.path.exists(cfg_path):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      cfg = export.read_json(cfg_path)
      names = list(tfds.builder(cfg["dataset"], data_dir=cfg.get("data_dir")).info.features["label"].names)
      if len(names) == num_classes:
        return names
    except Exception:  # pylint: disable=broad-except  (names are a nicety; numbers still print)
      pass
  return [f"class_{i}" for i in range(num_classes)]


def load_image(path, shape):
  """Raw 0..255 float32 pixels of an image file, converted and resized to (H, W, C)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w, c = shape
  if c not in (1, 3):
    raise errors.UsageError(f"the model takes {c}-channel images: only 1 (grey) or 3 (RGB) are supported")
  try:
    with Image.open(path) as im:
      im = im.convert("L" if c == 1 else "RGB")
      if im.size != (w, h):
        im = im.resize((w, h), Image.BILINEAR)
      pixels = np.asarray(im, dtype=np.float32)
  except (OSError, ValueError) as e:
    raise errors.UsageError(f"{path}: not a readable image ({type(e).__name__}): pass PNG or JPEG files") from None
  return pixels[..., None] if c == 1 else pixels


def _as_probabilities(out):
  """Ensembles already output probabilities; generations output logits."""
  if np.all(out >= 0) and np.allclose(out.sum(-1), 1.0, atol=1e-4):
    return out
  e = np.exp(out - out.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def classify(saved_model, images, top_k=3):
  """[(image path, [(class name, probability), ...top_k])] for image files."""
  model = load(saved_model)
  shape = input_shape(saved_model, model)
  batch = np.stack([load_image(p, shape) for p in images])
  probs = _as_probabilities(getattr(model, export.SERVE)(tf.constant(batch)).numpy())
  names = class_names(saved_model, probs.shape[-1])
  top = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
  return [(p, [(names[i], float(probs[n, i])) for i in top[n]]) for n, p in enumerate(images)]


def main(argv, fv):
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments {argv[1:]}: flags take the form --name=value")
  if bool(fv.run_dir) == bool(fv.saved_model):
    raise errors.UsageError("pass --run_dir=DIR (re-evaluate a run) or --saved_model=DIR --images=... (classify)")
  if fv.saved_model:
    if not fv.images:
      raise errors.UsageError("--saved_model needs --images=a.png,b.jpg")
    if fv.top_k < 1:
      raise errors.UsageError(f"--top_k={fv.top_k}: must be >= 1")
    for path, top in classify(fv.saved_model, fv.images, fv.top_k):
      print(f"{path}: " + ", ".join(f"{name} ({p:.3f})" for name, p in top))
    return
  evaluated = evaluate_run(fv.run_dir, fv.split, fv.data_dir, fv.batch_size)
  print(f"{fv.run_dir}: {evaluated['split']} split, {len(evaluated['generations'])} generations and "
        f"{len(evaluated['ensembles'])} ensembles reloaded from their SavedModels\n")
  print(table(evaluated))
  results_path = os.path.join(fv.run_dir, "results.json")
  if os.path.exists(results_path):
    diff = max_difference(evaluated, export.read_json(results_path))
    if diff is not None:
      print(f"max |accuracy difference| vs results.json: {diff:.2e}")
  if fv.output_json:
    export.write_json(evaluated, fv.output_json)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("run_dir", None, "Run directory whose gen_k/ and ensemble_k/ SavedModels to re-evaluate.")
  flags.DEFINE_enum("split", "test", SPLITS, "Split to evaluate on (val: the run's held-out examples).")
  flags.DEFINE_string("data_dir", None, "TFDS data directory (default: the run's config.json).")
  flags.DEFINE_integer("batch_size", 0, "Evaluation batch size (default: the run's).")
  flags.DEFINE_string("output_json", None, "Also write the numbers as JSON here.")
  flags.DEFINE_string("saved_model", None, "A SavedModel directory to classify --images with.")
  flags.DEFINE_list("images", [], "Image files (PNG/JPEG) to classify; resized to the model's input.")
  flags.DEFINE_integer("top_k", 3, "How many classes to print per image.")

  def _main(argv):
    tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.WARNING)  # tfds logs every file it opens at INFO
    try:
      main(argv, flags.FLAGS)
    except errors.UsageError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(_main)
