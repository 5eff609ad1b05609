"""The Task protocol and DataSpec: what generic code may ask of a task (see tasks/__init__)."""

import dataclasses
import os

import numpy as np

from ban_tf import errors
from ban_tf import layout
from ban_tf import predictions
from ban_tf import results


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the generic code may know about a data set.

  Attributes:
    name: the data set's name.
    input_shape: one example: (H, W, C) raw pixels, or (T,) token ids.
    input_dtype: "float32" (pixels in [0, input_high]) or "int32" (ids < input_high).
    input_high: upper bound of the input values (255 for pixels, V for token ids).
    input_name: the SavedModels' serving input: "pixels" or "tokens".
    serving_shape: one example as the SavedModels accept it: (H, W, C), or (None,)
      (token windows of any length).
    num_outputs: softmax width: the number of classes, or the vocabulary size.
    output_shape: one example's output: (C,) class logits, or (None, V)
      next-token logits (None: one per input position).
    output_unit: what the outputs score: "classes" or "words".
    class_names: written to labels.txt inside image SavedModels (may be empty).
    assets: ((file name, text), ...) written inside every exported SavedModel, beside
      its saved_model.pb as labels.txt is (the vocabulary of a language model:
      vocab.txt; runs before issue 23 have it beside the SavedModel, gen_k/vocab.txt).
    unit: what "one" counts in the splits' sizes: "examples" or "tokens".
    num_train, num_val, num_test: split sizes in `unit`s.
  """

  name: str
  input_shape: tuple
  input_dtype: str
  input_high: int
  input_name: str
  serving_shape: tuple
  num_outputs: int
  output_shape: tuple
  output_unit: str = "classes"
  class_names: tuple = ()
  assets: tuple = dataclasses.field(default=(), repr=False)
  unit: str = "examples"
  num_train: int = 0
  num_val: int = 0
  num_test: int = 0

  def example_inputs(self, n=4):
    """A fixed pseudo-random input batch (the SavedModel fingerprint's)."""
    from ban_tf import export  # lazy: TensorFlow; config validation imports tasks

    tokens = self.input_high if self.input_dtype.startswith("int") else None
    return export.fingerprint_inputs(self.input_shape, n=n, num_tokens=tokens)

  def matches_outputs(self, out_shape) -> bool:
    """Whether a model output of shape [N, ...] fits this data set's outputs."""
    want = self.output_shape
    got = tuple(out_shape[1:])
    return len(got) == len(want) and all(w is None or w == g for w, g in zip(want, got))


class Task:
  """The protocol every task implements (a base class, so the seam reads in one place).

  Attributes:
    name: the --task value.
    headline: the metric results tables, seed summaries and report plots lead
      with (lower is better).
    extra_columns: further results-table columns (shown when some row has them).
    perplexity: whether evaluation reports `perplexity` (val_perplexity in
      history.json), exp of the mean cross-entropy.
    result_keys: metrics.json fields that results.json keeps per row, beyond the
      generic ones (gen, role, arch, params, epochs, seconds, seed, objective, teacher).
    test_set_fields: the config.json fields that decide which test examples a run is
      scored on (beside --task and the test size results.json records): runs that
      agree on them can be compared example by example (report.py).
  """

  name = ""
  headline: results.Metric = None
  curve_label = ""  # y axis of `curve` in report plots
  perplexity = False  # evaluation also reports perplexity (Distiller(perplexity=True))
  extra_columns = ()
  result_keys = ()
  test_set_fields = ("dataset",)

  # ---- validation (no TensorFlow) ---------------------------------------------
  def parse_arch(self, arch: str) -> dict:
    """Raises ValueError (one line, naming the accepted forms) on a bad name."""
    raise NotImplementedError

  def validate(self, cfg) -> None:
    """The task's own checks of a config.Config; raises errors.UsageError."""

  # ---- data and models ----------------------------------------------------------
  def load_data(self, cfg):
    """The data set: an object with train(batch_size, *, seed, augment, first_epoch,
    epochs) -> (dataset, steps), val(batch_size) (None without a val split),
    test(batch_size), steps_per_epoch(batch_size) and `info`."""
    raise NotImplementedError

  def spec(self, dataset) -> DataSpec:
    raise NotImplementedError

  def build_model(self, arch, dataset, *, dropout, name, init_weights=None):
    """A functional keras.Model from the inputs `spec` describes to float32 logits.

    Image models also have "features" and "logits" layers, and the CIFAR zoo "stem"
    (models.py). `init_weights` (--init_weights): a pretrained backbone's weights, or None.
    Raises errors.UsageError on weights that cannot be used.
    """
    raise NotImplementedError

  def stateful_model(self, model):
    """`model` with its recurrent state as input and output ([x, state] -> [outputs,
    state], sharing its weights), exported as `serve_stateful`; None: it has none."""
    return None

  def stock_model(self, model):
    """`model` with stock Keras layers only: what model.keras holds, so that plain
    Keras loads it without importing ban_tf and gets the same outputs. Default: the
    fused BatchNormalization layers replaced (models.to_stock)."""
    from ban_tf import models  # lazy: TensorFlow; config validation imports tasks

    return models.to_stock(model) if models.has_fused_layers(model) else model

  def carry(self, cfg):
    """What the models do with their state between batches (carry.py): carry.Reset()
    (nothing carried) unless the task says otherwise. Generic code calls it; it never
    asks the task which mode it is in."""
    from ban_tf import carry  # lazy: TensorFlow; config validation imports tasks

    return carry.Reset()

  # ---- training -------------------------------------------------------------------
  def device_augment(self, cfg) -> bool:
    """Whether training batches are augmented inside the compiled step (--device_augment)."""
    return False

  def train_data(self, cfg, dataset, *, seed, first_epoch):
    """Training batches for epochs [first_epoch, cfg.epochs), a function of (seed, epoch) only."""
    on_device = {"device_augment": True} if self.device_augment(cfg) else {}
    ds, _ = dataset.train(
      cfg.batch_size,
      seed=seed,
      augment=cfg.resolved_augment,
      first_epoch=first_epoch,
      epochs=cfg.epochs,
      **on_device,
    )
    return ds

  def train_augmenter(self, cfg, dataset, seed):
    """The in-step half of on-device augmentation (Distiller(augment=...)), or None."""
    return dataset.train_augmenter(seed, cfg.resolved_augment) if self.device_augment(cfg) else None

  def make_optimizer(self, cfg, steps_per_epoch):
    raise NotImplementedError

  def callbacks(self, cfg, history, optimizer) -> list:
    """Keras callbacks run before the generic per-epoch state (train.EpochState):
    they may add entries to the epoch's logs, which history.json then records."""
    return []

  def summarize(self, result: dict) -> dict:
    """Fields derived from a generation's (or an ensemble's) evaluation, added to
    its metrics.json. `result` holds {split}_loss and {split}_accuracy for the
    evaluated splits (split: val, test)."""
    return {}

  # ---- reading a finished run -----------------------------------------------------
  def curve(self, history: list):
    """(epochs, values, what) of one generation's history.json for report plots."""
    raise NotImplementedError

  # ---- per-example outputs (predictions.py) and paired comparisons (stats.py) ------
  prediction_arrays = ()  # the arrays every split of a predictions.npz holds (predictions.py)

  def per_example(self, model, dataset, split, batch_size, *, probabilities, stateful):
    """One split's per-example outputs of a loaded SavedModel, as predictions.py stores them.

    Args:
      model: tf.saved_model.load of a run's SavedModel (its `serve`, or `serve_stateful`).
      dataset: the task's data set (load_data); `split` is "test" or "val".
      batch_size: the run's evaluation batch size (the layout the reported numbers used).
      probabilities: the model serves probabilities (a BANE ensemble), not logits.
      stateful: carry the state over the split's consecutive windows (carry.Carry).

    Returns:
      {array name: numpy array} (`prediction_arrays`), in the pipeline's order,
      padding left out.
    """
    raise NotImplementedError

  def headline_from(self, outputs: dict) -> float:
    """The headline metric (table units) recomputed from one split's stored outputs."""
    raise NotImplementedError

  def compare(self, row: dict, ref: dict, *, seed: int = 0):
    """stats.Comparison of two models' stored outputs of one split (row minus ref, headline units).

    Raises:
      ValueError: the two were not scored on the same examples (labels differ).
    """
    raise NotImplementedError

  def store_predictions(self, cfg, dataset, model_dir, *, probabilities=False, loaded=None):
    """Computes model_dir/predictions.npz from model_dir/saved_model (test, and val when the
    data set has one), scored as the run's evaluation scores; returns its path.

    `loaded`: that SavedModel's tf.saved_model.load object when the caller holds one
    (rundir.ModelDir.seal, from the export); else it is loaded here.

    Raises:
      errors.UsageError: the SavedModel cannot be loaded (evaluate.load's message).
    """
    import tensorflow as tf  # lazy: TensorFlow; config validation imports tasks

    saved = os.path.join(model_dir, layout.SAVED_MODEL)
    if not os.path.exists(os.path.join(saved, layout.SAVED_MODEL_PB)):
      raise errors.UsageError(
        f"{saved} is missing: its per-example outputs cannot be computed; restore it, or retrain it"
      )
    try:
      model = loaded if loaded is not None else tf.saved_model.load(saved)
    except Exception as e:  # pylint: disable=broad-except  (truncated proto, scrambled variables)
      raise errors.UsageError(
        f"{saved} cannot be loaded ({type(e).__name__}): it is damaged; restore it, or retrain it"
      ) from None
    carry = self.carry(cfg)  # scored as the run's evaluation scores (a stream, or windows)
    splits = {}
    for split in ("test", "val"):
      if getattr(dataset, split)(cfg.batch_size) is None:
        continue
      splits[split] = carry.per_example(
        self.per_example, model, dataset, split, cfg.batch_size, probabilities
      )
    return predictions.write(model_dir, splits, task=self.name)


def serve_batches(model, batches, *, stateful=False):
  """Yields (outputs float64 [M, V], labels int [M], weights float64 [M]) per batch of a loaded
  SavedModel over (inputs, labels[, weights]) batches, one row per scored label.

  An image batch gives M = N examples; a language-model batch [N, T] gives M = N * T
  tokens (row-major), each token weighted by its row's weight. Without weights
  every label weighs 1; weight 0 is padding (data.Dataset pads the last batch).
  `stateful`: call `serve_stateful`, carrying the state from batch to batch (the
  batches are consecutive windows of the same rows, --lm_state=carry); else `serve`.
  Used by evaluate.score and the tasks' `per_example`, so both score alike.
  """
  import tensorflow as tf  # lazy: TensorFlow; config validation imports tasks
  from ban_tf import export  # lazy: TensorFlow; config validation imports tasks

  state = None
  for batch in batches:
    x, y = batch[0], np.asarray(batch[1])
    w = np.asarray(batch[2]).astype(np.float64) if len(batch) > 2 else np.ones(y.shape[:1])
    w = np.broadcast_to(w.reshape(w.shape + (1,) * (y.ndim - 1)), y.shape).reshape(-1)
    if stateful:
      fn = getattr(model, export.STATEFUL)
      if state is None:
        size = fn.concrete_functions[0].structured_input_signature[0][1].shape[-1]
        state = tf.zeros([x.shape[0], size])
      res = fn(x, state)
      state = res["state"]
      out = next(v for k, v in res.items() if k != "state").numpy().astype(np.float64)
    else:
      out = getattr(model, export.SERVE)(x).numpy().astype(np.float64)
    yield out.reshape(-1, out.shape[-1]), y.reshape(-1), w


def log_probabilities(out, probabilities):
  """log p [M, V] (float64) of `serve_batches` outputs: logits (log-softmax) or probabilities."""
  if probabilities:
    return np.log(np.maximum(out, 1e-30))
  m = out.max(-1, keepdims=True)
  return out - m - np.log(np.exp(out - m).sum(-1, keepdims=True))


def require(cond, msg):
  """Raises errors.UsageError(msg) unless cond."""
  if not cond:
    raise errors.UsageError(msg)


def non_default(cfg, names):
  """The fields among `names` whose value in the Config `cfg` is not the field's default."""
  defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
  return [n for n in names if getattr(cfg, n) != defaults[n]]
