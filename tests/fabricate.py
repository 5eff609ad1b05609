"""Run directories made without training, through the same writer as real runs (rundir.py).

`finished_run` seals tiny untrained models with made-up metrics into a run directory
exactly as training does (ModelDir.seal: SavedModel, model.keras, metrics.json, the
manifest entry, DONE), so damaged-file, manifest and results cases run in seconds on a
copy; given the Config of real flags (conftest.config_of), the run is one that main()
and ban_tf.evaluate accept as that experiment's (its models fit the data set's shape, and
each has its per-example outputs, so a rerun computes nothing). `partial_generation` leaves a generation stopped after some epochs: real epoch
checkpoints (tf.train.CheckpointManager, as train.py writes them) and history.json,
for checkpoint fallback and repair cases that run in milliseconds.
"""

import keras
import numpy as np
import tensorflow as tf

from ban_tf import config as config_lib
from ban_tf import export
from ban_tf import manifest
from ban_tf import predictions
from ban_tf import rundir
from ban_tf import tasks
from ban_tf.tasks import base

NUM_CLASSES = 3
SPEC = base.DataSpec(
  name="fake",
  input_shape=(4, 4, 1),
  input_dtype="float32",
  input_high=255,
  input_name="pixels",
  serving_shape=(4, 4, 1),
  num_outputs=NUM_CLASSES,
  output_shape=(NUM_CLASSES,),
  class_names=("a", "b", "c"),
)


def config(gens=2, **kwargs):
  """The Config a fabricated run records (config.json); `gens` as --gens."""
  return config_lib.Config(arch="tiny", dataset="fake", epochs=1, gens=gens, **kwargs)


def tiny_model(seed, spec=SPEC):
  """A one-layer classifier of `spec`'s images (SPEC's: 51 parameters), initialised from
  `seed` (distinct fingerprints)."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input(spec.input_shape, name=spec.input_name)
  x = keras.layers.Flatten()(inputs)
  x = keras.layers.Rescaling(1.0 / 255, name="features")(x)
  logits = keras.layers.Dense(spec.num_outputs, name="logits")(x)
  return keras.Model(inputs, logits, name=f"m{seed}")


def fake_metrics(gen, accuracy, params=51):
  return {
    "gen": gen,
    "role": "baseline" if gen == "baseline" else "teacher" if gen == 0 else f"BAN-{gen}",
    "arch": "tiny",
    "params": params,
    "seed": 0,
    "epochs": 1,
    "seconds": 1.0,
    "test_loss": 1.0,
    "test_accuracy": accuracy,
    "test_error": 1.0 - accuracy,
  }


def fake_history(cfg, accuracy):
  """history.json of cfg.epochs epochs with the keys training writes (val_* with a val split)."""
  out = []
  for e in range(1, cfg.epochs + 1):
    h = {"epoch": e, "loss": 1.0 / e, "accuracy": accuracy, "learning_rate": 0.1, "seconds": 1.0}
    if cfg.val_examples:
      h.update(val_accuracy=accuracy, val_label_loss=1.0 / e)
    out.append(h)
  return out


def split_arrays(dataset, batch_size):
  """{split: (images, labels)} of a data.Dataset's test and val examples (the val split
  when it has one), read once, in its evaluation order, padding dropped."""
  out = {}
  for split in ("test", "val"):
    batches = getattr(dataset, split)(batch_size)
    if batches is None:
      continue
    xs, ys = [], []
    for batch in batches:
      x, y = np.asarray(batch[0]), np.asarray(batch[1])
      keep = np.asarray(batch[2]) > 0 if len(batch) > 2 else np.ones(len(y), bool)
      xs.append(x[keep])
      ys.append(y[keep])
    out[split] = (np.concatenate(xs), np.concatenate(ys))
  return out


def store_outputs(model, splits, probabilities):
  """seal's `outputs`: writes predictions.npz (predictions.write, the arrays of
  tasks/image.py's per_example) of the Keras `model` on `splits` (split_arrays). The
  shortcut past task.store_predictions (which reads the SavedModel and the data set
  again for every model) is the point: one read of the data for the whole run.
  `probabilities`: the model outputs probabilities (an ensemble), else logits."""

  def write(model_dir, loaded=None):
    del loaded  # the Keras model is read, not the SavedModel
    arrays = {}
    for split, (x, y) in splits.items():
      out = model.predict(x, batch_size=256, verbose=0).astype(np.float64)
      probs = out if probabilities else np.exp(out - out.max(-1, keepdims=True))
      probs = probs / probs.sum(-1, keepdims=True)
      arrays[split] = {
        "probabilities": probs.astype(np.float16),
        "labels": y.astype(np.int32),
        "predicted": np.argmax(out, -1).astype(np.int32),
      }
    return predictions.write(model_dir, arrays, task="image")

  return write


def finished_run(path, gens=2, ensembles=True, baseline=False, cfg=None):
  """A finished run in `path`: gen_0..gen_{gens}, ensemble_2..gens, optionally baseline/,
  results.json and results.md; every model sealed by ModelDir.seal. Returns `path`.

  `cfg`: the image experiment it records (config.json; its models fit cfg's data set,
  loaded as main() loads it; each model's predictions.npz holds its outputs on that data
  set's test and val examples (store_outputs), and its recorded test accuracy is its
  true one); default: config(gens, baseline), on
  SPEC's made-up data, without predictions.npz.
  """
  task = tasks.get("image")
  dataset = None if cfg is None else task.load_data(cfg)
  spec = SPEC if cfg is None else task.spec(dataset)
  splits = None if cfg is None else split_arrays(dataset, cfg.batch_size)
  cfg = cfg or config(gens=gens, baseline=baseline)

  def outputs(model, probabilities):
    return None if splits is None else store_outputs(model, splits, probabilities)

  def test_accuracy(model, made_up):
    """The model's accuracy on the test split when there is one (so a rebuilt or
    re-evaluated figure equals it), else `made_up`."""
    if splits is None:
      return made_up
    x, y = splits["test"]
    return float(np.mean(np.argmax(model.predict(x, batch_size=256, verbose=0), -1) == y))

  # Local imports: generations and report pull in the whole binary (only this helper needs them).
  from ban_tf import generations  # pylint: disable=g-import-not-at-top
  from ban_tf import report  # pylint: disable=g-import-not-at-top

  with rundir.RunDir(path, cfg, spec=spec) as run:
    models = {}
    for k in list(range(gens + 1)) + (["baseline"] if baseline else []):
      model = models[k] = tiny_model(seed=7 if k == "baseline" else k, spec=spec)
      g = run.generation(k)
      g.make()
      accuracy = test_accuracy(model, 0.5 + 0.1 * (k if k != "baseline" else 0))
      g.write_history(fake_history(cfg, accuracy))
      result = fake_metrics(k, accuracy, params=model.count_params())
      result["weights_sha256"] = manifest.weights_digest(model)
      g.seal(
        task,
        spec,
        result,
        model=model,
        keras_model=model,
        record={"weights_sha256": result["weights_sha256"]},
        outputs=outputs(model, False),
      )
    for k in range(2, gens + 1) if ensembles else ():
      members = list(range(1, k + 1))
      ensemble = generations.build_ensemble([models[m] for m in members], name=f"bane_{k}")
      accuracy = test_accuracy(ensemble, 0.8)
      result = {
        "name": f"BANE-{k}",
        "members": members,
        "test_accuracy": accuracy,
        "test_error": 1.0 - accuracy,
      }
      run.ensemble(k).seal(
        task,
        spec,
        result,
        model=ensemble,
        output_name=export.PROBABILITIES,
        outputs=outputs(ensemble, True),
      )
    report.write_results(run.path, generations.collect_results(run), cfg, spec=spec)
  return path


def checkpoint(seed=0):
  """(tf.train.Checkpoint, its epoch variable, its model) as train.make_checkpoint lays one out."""
  model = tiny_model(seed)
  epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
  return (
    tf.train.Checkpoint(student=model, variables=list(model.variables), epoch=epoch),
    epoch,
    model,
  )


def partial_generation(model_dir, epochs=2):
  """`model_dir` (a rundir.ModelDir) stopped after `epochs` epochs: ckpt-1..ckpt-{epochs}
  (the last two kept, as training keeps them) and history.json of those epochs."""
  ckpt, epoch, model = checkpoint()
  model_dir.make()
  manager = model_dir.checkpoint_manager(ckpt)
  history = []
  for e in range(1, epochs + 1):
    for w in model.weights:
      w.assign(w + np.float32(e))  # each epoch's weights differ
    history.append({"epoch": e, "loss": 1.0 / e, "learning_rate": 0.1, "seconds": 1.0})
    model_dir.write_history(history)
    epoch.assign(e)
    manager.save(checkpoint_number=e)
  return model
