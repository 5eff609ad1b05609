"""Word-level language modelling: corpora (text_data.py), LSTMs (lm_models.py), plateau schedule, perplexity.

Outputs are next-token logits [N, T, V] and labels [N, T] token ids; the Distiller
averages every loss term per token (distiller.py). The headline metric is the
final-epoch test perplexity per token, exp(mean token cross-entropy), as in the
paper's Table 6. SavedModels take int32 token ids and carry vocab.txt inside them
(saved_model/vocab.txt, as an image SavedModel carries labels.txt).

Hidden state (--lm_state): `carry` (default) carries every LSTM state across the
consecutive windows of each batch row, for the student and the teacher (its
SavedModel's `serve_stateful` endpoint), reset per epoch, and evaluates over each
split as one stream (text_data.py, distiller.CarriedState); `reset` starts every
window from zeros.

Learning-rate schedule (paper section 4.2): plain SGD from `--lr`, multiplied by
`--lr_plateau_decay` at the start of an epoch whenever the validation perplexity of
the previous epoch did not improve by `--lr_plateau_min_delta` on the best so far or,
with `--lr_plateau_reference=previous`, on the epoch before it (Table 6 LSTM: x0.25,
delta 0, best; CNN-LSTM: x0.5, delta 0.5, previous); see schedules.plateau_lr. The rate is a pure function of the validation
perplexities in history.json, so a resumed generation replays it exactly.
"""

import math
import os

import numpy as np

from ban_tf import archs
from ban_tf import layout
from ban_tf import results
from ban_tf.tasks import base

VOCAB_FILE = "vocab.txt"
# `text` names the split: the console's "done: test perplexity (per token) 141.20, val perplexity ...".
TEST_PERPLEXITY = results.Metric(
  "test_perplexity", "Test perplexity", text="test perplexity (per token)"
)
VAL_PERPLEXITY = results.Metric("val_perplexity", "Val perplexity", text="val perplexity")


def perplexity(mean_ce):
  """exp(mean token cross-entropy), capped to stay finite."""
  return float(math.exp(min(mean_ce, 700.0)))


def read_vocab(directory):
  """The vocabulary a run wrote with its SavedModel: `directory` is gen_k/ or its saved_model/.

  Read from saved_model/vocab.txt (where runs write it, as image runs write labels.txt),
  else from gen_k/vocab.txt (where older runs wrote it).
  """
  for path in (
    os.path.join(directory, layout.SAVED_MODEL, VOCAB_FILE),
    os.path.join(directory, VOCAB_FILE),
    os.path.join(os.path.dirname(os.path.normpath(directory)), VOCAB_FILE),
  ):
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        return tuple(line.rstrip("\n") for line in f)
  raise FileNotFoundError(os.path.join(directory, layout.SAVED_MODEL, VOCAB_FILE))


class LanguageModel(base.Task):
  """--task=lm."""

  name = "lm"
  headline = TEST_PERPLEXITY
  extra_columns = (VAL_PERPLEXITY,)
  result_keys = ("test_accuracy", "test_error", "val_accuracy", "val_perplexity", "test_perplexity")
  curve_label = "validation perplexity"
  # The vocabulary decides which test words are <unk>; --bptt and --lm_state change how the
  # same tokens are scored, not which (--ptb_dir is a path: the test size catches other text).
  test_set_fields = ("dataset", "vocab_size")
  perplexity = True

  def parse_arch(self, arch):
    return archs.parse_lm_arch(arch)

  def validate(self, cfg):
    need = base.require
    need(cfg.bptt >= 1, f"--bptt={cfg.bptt}: must be >= 1")
    need(
      cfg.lr_schedule == "step" and cfg.warmup_epochs == 0,
      "--lr_schedule and --warmup_epochs set image schedules; language models decay on "
      "plateaus (--lr_plateau_decay): drop them",
    )
    need(
      cfg.vocab_size == 0 or cfg.vocab_size >= 2,
      f"--vocab_size={cfg.vocab_size}: must be 0 (all words) or >= 2 (<unk> and <eos>)",
    )
    need(
      0 < cfg.lr_plateau_decay <= 1, f"--lr_plateau_decay={cfg.lr_plateau_decay}: must be in (0, 1]"
    )
    need(
      cfg.lr_plateau_min_delta >= 0,
      f"--lr_plateau_min_delta={cfg.lr_plateau_min_delta}: must be >= 0",
    )
    need(
      cfg.lr_plateau_reference in ("best", "previous"),  # schedules.plateau_lr
      f"--lr_plateau_reference={cfg.lr_plateau_reference!r}: use best or previous",
    )
    need(cfg.lm_state in ("carry", "reset"), f"--lm_state={cfg.lm_state!r}: use carry or reset")
    need(
      cfg.dataset != "ptb" or cfg.ptb_dir,
      "--dataset=ptb needs --ptb_dir=DIR holding ptb.train.txt, ptb.valid.txt, ptb.test.txt",
    )
    need(
      not cfg.train_examples and not cfg.val_examples,
      "--train_examples/--val_examples are image-only: language models use the corpus' own splits",
    )
    need(
      not (
        cfg.image_folder
        or cfg.image_size
        or cfg.image_key
        or cfg.label_key
        or cfg.val_split
        or cfg.train_split != "train"
        or cfg.test_split != "test"
      ),
      "--image_folder, --image_size, --*_split and --image_key/--label_key are image-only: "
      "drop them with --task=lm",
    )
    need(
      not (
        cfg.feature_weight
        or cfg.share_stem_head
        or cfg.student_width_ratio != 1
        or cfg.densenet_compression != 0.5
      ),
      "--feature_weight, --share_stem_head, --student_width_ratio and --densenet_compression are image-only: "
      "drop them with --task=lm",
    )

  def load_data(self, cfg):
    from ban_tf import text_data  # lazy: TensorFlow; config validation imports tasks

    return text_data.TextDataset(
      cfg.dataset,
      ptb_dir=cfg.ptb_dir,
      data_dir=cfg.data_dir,
      vocab_size=cfg.vocab_size,
      bptt=cfg.bptt,
      state=cfg.lm_state,
    )

  def spec(self, dataset):
    info = dataset.info
    vocab = "".join(w + "\n" for w in info.vocab)
    return base.DataSpec(
      name=info.name,
      input_shape=(info.bptt,),
      input_dtype="int32",
      input_high=len(info.vocab),
      input_name="tokens",
      serving_shape=(None,),
      num_outputs=len(info.vocab),
      output_shape=(None, len(info.vocab)),
      output_unit="words",
      assets=((VOCAB_FILE, vocab),),
      unit="tokens",
      num_train=info.num_train,
      num_val=info.num_val,
      num_test=info.num_test,
    )

  def build_model(self, arch, dataset, *, dropout, name, init_weights=None):
    del init_weights  # image backbones only (Config.validate)
    from ban_tf import lm_models  # lazy: TensorFlow; config validation imports tasks

    return lm_models.build_model(arch, dataset.info.vocab, dropout=dropout, name=name)

  def stateful_model(self, model):
    from ban_tf import lm_models  # lazy: TensorFlow; config validation imports tasks

    try:
      return lm_models.stateful(model)
    except ValueError:  # not one LM (a BANE ensemble: generations.build_stateful_ensemble)
      return None

  def stock_model(self, model):
    """Tied embedding / character CNN as stock layers (lm_models.to_stock)."""
    from ban_tf import lm_models  # lazy: TensorFlow; config validation imports tasks

    return lm_models.to_stock(model)

  def carry(self, cfg):
    """--lm_state=carry: the student and the teacher (its `serve_stateful`) carry their
    state across windows, and evaluation runs over streams; reset: nothing carried."""
    from ban_tf import carry  # lazy: TensorFlow; config validation imports tasks

    return carry.Carry(self.stateful_model) if cfg.lm_state == "carry" else carry.Reset()

  def make_optimizer(self, cfg, steps_per_epoch):
    """SGD with a constant rate that `callbacks` drive; gradient clipping is in the Distiller."""
    del steps_per_epoch
    import keras  # lazy: TensorFlow; config validation imports tasks

    return keras.optimizers.SGD(
      learning_rate=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
    )

  def callbacks(self, cfg, history, optimizer):
    from ban_tf import schedules  # lazy: TensorFlow; config validation imports tasks

    return [
      schedules.PlateauDecay(
        cfg.lr,
        cfg.lr_plateau_decay,
        cfg.lr_plateau_min_delta,
        history,
        optimizer,
        reference=cfg.lr_plateau_reference,
      )
    ]

  def summarize(self, result):
    return {
      f"{split}_perplexity": perplexity(result[f"{split}_loss"])
      for split in ("val", "test")
      if f"{split}_loss" in result
    }

  def curve(self, history):
    hist = [h for h in history if "val_perplexity" in h]
    return [h["epoch"] for h in hist], [h["val_perplexity"] for h in hist], "val"

  prediction_arrays = ("nll", "labels", "sentence")

  def per_example(self, model, dataset, split, batch_size, *, probabilities, stateful):
    """{"nll": float32 [T], "labels": int32 [T], "sentence": int32 [T]} of every scored token.

    Scored as the run's evaluation scores them (text_data.TextDataset.val/test:
    one stream with the state carried under --lm_state=carry, the rows' windows
    under reset), so exp(mean nll) is the reported perplexity. `sentence` is each
    token's line of the corpus (text_data.TextDataset.eval_sentences).
    """
    nll, labels = [], []
    batches = getattr(dataset, split)(batch_size)
    for out, y, _ in base.serve_batches(model, batches, stateful=stateful):
      log_p = base.log_probabilities(out, probabilities)
      nll.append(-np.take_along_axis(log_p, y[:, None].astype(np.int64), -1)[:, 0])
      labels.append(y)
    sentence = dataset.eval_sentences(split, batch_size)
    labels = np.concatenate(labels).astype(np.int32)
    if sentence.shape != labels.shape:
      raise ValueError(
        f"{split}: {labels.size} scored tokens but {sentence.size} sentence ids (layout mismatch)"
      )
    return {
      "nll": np.concatenate(nll).astype(np.float32),
      "labels": labels,
      "sentence": sentence.astype(np.int32),
    }

  def headline_from(self, outputs):
    """Perplexity of stored outputs: exp(mean nll) (float64 mean)."""
    return perplexity(float(np.mean(outputs["nll"], dtype=np.float64)))

  def compare(self, row, ref, *, seed=0):
    """Δ perplexity: paired bootstrap over sentences + sign-flip randomization test."""
    from ban_tf import stats  # lazy: SciPy (~1 s CPU); config validation imports tasks

    if not (
      np.array_equal(row["labels"], ref["labels"])
      and np.array_equal(row["sentence"], ref["sentence"])
    ):
      raise ValueError("the two models were not scored on the same tokens (labels differ)")
    return stats.paired_lm(row["nll"], ref["nll"], row["sentence"], seed=seed)
