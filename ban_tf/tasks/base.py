"""The Task protocol and DataSpec: what generic code may ask of a task (see tasks/__init__)."""

import dataclasses

from ban_tf import errors
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
    assets: ((file name, text), ...) written beside every exported SavedModel
      (the vocabulary of a language model: vocab.txt).
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
    from ban_tf import export  # pylint: disable=g-import-not-at-top  (TensorFlow)

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
  """

  name = ""
  headline: results.Metric = None
  curve_label = ""  # y axis of `curve` in report plots
  perplexity = False  # evaluation also reports perplexity (Distiller(perplexity=True))
  extra_columns = ()
  result_keys = ()

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
    from ban_tf import models  # pylint: disable=g-import-not-at-top

    return models.to_stock(model) if models.has_fused_layers(model) else model

  def carries_state(self, cfg) -> bool:
    """Whether the models carry their state across consecutive batches (then the
    teacher is loaded through `serve_stateful`, and evaluation runs over streams)."""
    return False

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


def require(cond, msg):
  """Raises errors.UsageError(msg) unless cond."""
  if not cond:
    raise errors.UsageError(msg)
