"""The language-modelling task's hooks: optimizer, plateau schedule, perplexity, table.

train.py and generations.py call these when `cfg.task == "lm"`; everything else (the
Distiller, checkpoints, export, resume) is shared with image classification.

Learning-rate schedule (paper section 4.2): plain SGD from `--lr`, multiplied by
`--lr_plateau_decay` at the start of an epoch whenever the validation perplexity of
the previous epoch did not improve on the best so far by more than
`--lr_plateau_min_delta` (Table 6 LSTM: x0.25, delta 0; CNN-LSTM: x0.5, delta 0.5).
The rate is a pure function of the validation perplexities in history.json, so a
resumed generation replays it exactly.
"""

import math
import os

import keras
import tensorflow as tf

from ban_tf import distiller as distiller_lib
from ban_tf import export


def make_optimizer(cfg):
  """SGD with a constant (callback-driven) rate; gradient clipping is in the Distiller."""
  return keras.optimizers.SGD(learning_rate=cfg.lr, momentum=cfg.momentum,
                              nesterov=cfg.nesterov and cfg.momentum > 0)


def plateau_lr(lr, val_perplexities, decay, min_delta=0.0):
  """The rate after the given per-epoch validation perplexities (see module doc)."""
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
    history: the live list of per-epoch entries (train._EpochState fills it), each
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


def perplexity(mean_ce):
  return float(math.exp(min(mean_ce, 700.0)))


def finish_generation(result, gen_dir, vocab, writer, step):
  """Adds val/test perplexity to `result` and TensorBoard; writes vocab.txt beside the SavedModel."""
  result["test_perplexity"] = perplexity(result["test_loss"])
  if "val_loss" in result:
    result["val_perplexity"] = perplexity(result["val_loss"])
  with writer.as_default(step=step):
    for split in ("val", "test"):
      if f"{split}_perplexity" in result:
        tf.summary.scalar(f"{split}/final_perplexity", result[f"{split}_perplexity"])
  writer.flush()
  write_vocab(vocab, gen_dir)


def write_vocab(vocab, directory):
  export.write_text("".join(w + "\n" for w in vocab), os.path.join(directory, "vocab.txt"))


def read_vocab(directory):
  with open(os.path.join(directory, "vocab.txt"), encoding="utf-8") as f:
    return tuple(line.rstrip("\n") for line in f)


def evaluate_ensemble(model, dataset, batch_size):
  """Per-token CE/accuracy/perplexity of a model returning probabilities [N, T, V].

  The log of the mean probabilities is a valid logit vector (softmax(log p) = p), so
  the Distiller's token-level test step scores the ensemble exactly like a member.
  """
  inputs = keras.Input(shape=model.inputs[0].shape[1:], dtype=model.inputs[0].dtype)
  log_probs = keras.layers.Activation(_safe_log, dtype="float32", name="log_probs")(model(inputs))
  scorer = distiller_lib.Distiller(keras.Model(inputs, log_probs))
  scorer.compile()
  out = {}
  for split in ("val", "test"):
    res = scorer.evaluate(getattr(dataset, split)(batch_size), verbose=0, return_dict=True)
    out[f"{split}_loss"] = float(res["label_loss"])
    out[f"{split}_accuracy"] = float(res["accuracy"])
    out[f"{split}_perplexity"] = perplexity(res["label_loss"])
  out["test_error"] = 1.0 - out["test_accuracy"]
  return out


def _safe_log(p):
  return keras.ops.log(keras.ops.maximum(p, 1e-30))


def results_table(results):
  """Table 6 style: validation and test perplexity per generation and ensemble."""
  gens = results["generations"]
  base = gens[0].get("test_perplexity") if gens else None
  lines = ["| Model | Arch | Params | Val perplexity | Test perplexity | Δ test vs teacher |",
           "|---|---|---|---|---|---|"]

  def fmt(x):
    return "" if x is None else f"{x:.2f}"

  def row(name, arch, params, val, test):
    delta = "" if base is None or name == "Teacher" else f"{test - base:+.2f}"
    return f"| {name} | {arch} | {params} | {fmt(val)} | {fmt(test)} | {delta} |"

  from ban_tf import generations  # pylint: disable=g-import-not-at-top  (circular)
  for g in gens:
    name = "Teacher" if g["gen"] == 0 else f"BAN-{g['gen']}"
    lines.append(row(name, g["arch"], generations.format_params(g["params"]), g.get("val_perplexity"),
                     g["test_perplexity"]))
  for e in results["ensembles"]:
    members = ",".join("T" if m == 0 else str(m) for m in e["members"])
    lines.append(row(f"{e['name']} ({members})", "ensemble", "", e.get("val_perplexity"),
                     e["test_perplexity"]))
  return "\n".join(lines) + "\n"
