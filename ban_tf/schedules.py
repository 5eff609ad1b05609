"""Learning-rate schedules that resume exactly: a step schedule and a plateau schedule.

Both are pure functions of what a checkpoint restores (the optimizer's step
counter) or of what history.json holds (per-epoch validation perplexities), so a
resumed generation replays its learning rates exactly. Tasks (tasks/) pick one.
"""

import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="ban_tf")
class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
  """lr * decay^(number of boundaries passed); boundaries in optimizer steps.

  With `warmup_steps` > 0 the rate first rises linearly, lr * step / warmup_steps (as
  keras.optimizers.schedules.CosineDecay's warm-up from 0), then steps as above.
  """

  def __init__(self, lr, boundaries, decay, warmup_steps=0):
    self.lr = float(lr)
    self.boundaries = [int(b) for b in boundaries]
    self.decay = float(decay)
    self.warmup_steps = int(warmup_steps)

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    passed = (
      tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries])
      if self.boundaries
      else 0.0
    )
    lr = self.lr * tf.pow(self.decay, passed)
    if self.warmup_steps:
      lr = tf.where(step < self.warmup_steps, self.lr * step / self.warmup_steps, lr)
    return lr

  def get_config(self):
    return {
      "lr": self.lr,
      "boundaries": self.boundaries,
      "decay": self.decay,
      "warmup_steps": self.warmup_steps,
    }


def plateau_lr(lr, val_perplexities, decay, min_delta=0.0, reference="best"):
  """The rate after the given per-epoch validation perplexities (paper section 4.2).

  The rate is multiplied by `decay` at the start of an epoch whenever the previous
  epoch's validation perplexity
  * reference="best": did not improve on the best so far by more than `min_delta`
    (with delta 0 the PyTorch word-language-model example's rule, Table 6's LSTM);
  * reference="previous": fell by less than `min_delta` from the epoch before it (the
    paper's CNN-LSTM rule, "does not decrease by at least 0.5 after an epoch", read
    literally; Kim et al. state theirs the same way with 1.0). The first epoch never
    decays the rate.

  Raises:
    ValueError: an unknown reference.
  """
  if reference not in ("best", "previous"):
    raise ValueError(f"plateau reference must be best or previous, got {reference!r}")
  best = previous = math.inf
  for ppl in val_perplexities:
    if reference == "best":
      decays = not ppl < best - min_delta
    else:
      decays = previous - ppl < min_delta
    if decays:
      lr *= decay
    best, previous = min(best, ppl), ppl
  return lr


class PlateauDecay(keras.callbacks.Callback):
  """Sets the optimizer's rate at every epoch start from the history so far.

  Args:
    lr: initial rate; decay, min_delta, reference: see `plateau_lr`.
    history: the live list of per-epoch entries (train.EpochState fills it), each
      with "epoch" (1-based) and "val_perplexity".
    optimizer: a keras optimizer with a variable learning rate.
  """

  def __init__(self, lr, decay, min_delta, history, optimizer, reference="best"):
    super().__init__()
    self.lr, self.decay, self.min_delta = float(lr), float(decay), float(min_delta)
    self.history, self.optimizer, self.reference = history, optimizer, reference

  def on_epoch_begin(self, epoch, logs=None):
    ppls = [
      h["val_perplexity"] for h in self.history if h["epoch"] <= epoch and "val_perplexity" in h
    ]
    self.optimizer.learning_rate = plateau_lr(
      self.lr, ppls, self.decay, self.min_delta, self.reference
    )
