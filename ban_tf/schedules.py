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
  """lr * decay^(number of boundaries passed); boundaries in optimizer steps."""

  def __init__(self, lr, boundaries, decay):
    self.lr = float(lr)
    self.boundaries = [int(b) for b in boundaries]
    self.decay = float(decay)

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries]) if self.boundaries else 0.0
    return self.lr * tf.pow(self.decay, passed)

  def get_config(self):
    return {"lr": self.lr, "boundaries": self.boundaries, "decay": self.decay}


def plateau_lr(lr, val_perplexities, decay, min_delta=0.0):
  """The rate after the given per-epoch validation perplexities.

  The rate is multiplied by `decay` at the start of an epoch whenever the previous
  epoch's validation perplexity did not improve on the best so far by more than
  `min_delta` (paper section 4.2).
  """
  best = math.inf
  for ppl in val_perplexities:
    if not ppl < best - min_delta:
      lr *= decay
    best = min(best, ppl)
  return lr


class PlateauDecay(keras.callbacks.Callback):
  """Sets the optimizer's rate at every epoch start from the history so far.

  Args:
    lr: initial rate; decay, min_delta: see `plateau_lr`.
    history: the live list of per-epoch entries (train.EpochState fills it), each
      with "epoch" (1-based) and "val_perplexity".
    optimizer: a keras optimizer with a variable learning rate.
  """

  def __init__(self, lr, decay, min_delta, history, optimizer):
    super().__init__()
    self.lr, self.decay, self.min_delta = float(lr), float(decay), float(min_delta)
    self.history, self.optimizer = history, optimizer

  def on_epoch_begin(self, epoch, logs=None):
    ppls = [h["val_perplexity"] for h in self.history if h["epoch"] <= epoch and "val_perplexity" in h]
    self.optimizer.learning_rate = plateau_lr(self.lr, ppls, self.decay, self.min_delta)
