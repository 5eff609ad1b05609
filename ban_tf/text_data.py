"""Word-level language-modelling data: corpus readers, vocabulary, Zaremba batching.

Corpora:
* ``ptb``: the Mikolov files ``ptb.{train,valid,test}.txt`` in ``--ptb_dir`` (already
  lower-cased, 10k words, rare words replaced by ``<unk>``). Every line is split on
  white space and gets an end-of-sentence token ``<eos>``. Any corpus in that format
  works the same way.
* a tfds text data set (``tiny_shakespeare``): splits train/validation/test, each a
  ``text`` string. It is lower-cased, split into words and punctuation marks, and
  every non-empty line gets ``<eos>``.

The vocabulary comes from the training split only: ``<unk>`` (id 0) and ``<eos>``
(id 1), then words by decreasing frequency (ties alphabetical), capped at
``vocab_size`` entries (0 = all); other words map to ``<unk>``.

Batching is Zaremba et al.'s: the token stream of a split is cut into `batch_size`
contiguous rows ([batch, L]); window k is ``x = rows[:, k*T:(k+1)*T]`` with targets
``y = rows[:, k*T+1:(k+1)*T+1]``. Training uses the full windows only.

``state="carry"`` (--lm_state, the default): the models carry their LSTM state from
window k to window k+1 of the same row, so training windows come in order (k = 0, 1,
... every epoch; the state is reset at each epoch's start), and evaluation runs over
the whole split as one stream: ``[<eos>] + ids`` as one row, cut into consecutive
windows of T, so every token of the split is scored (the first one after a sentence
boundary) whatever --batch_size.
``state="reset"``: every window starts from a zero state; training windows are
shuffled per (seed, epoch) and evaluation scores the rows' windows (each row's
first token and the ``len % batch_size`` tail are not scored).
"""

import collections
import dataclasses
import os
import re

import numpy as np
import tensorflow as tf

from ban_tf import errors
from ban_tf import tfdata

UNK = "<unk>"
EOS = "<eos>"
PTB_FILES = {"train": "ptb.train.txt", "val": "ptb.valid.txt", "test": "ptb.test.txt"}
_TFDS_SPLITS = {"train": "train", "val": "validation", "test": "test"}
_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


@dataclasses.dataclass(frozen=True)
class TextInfo:
  """Described like data.DataInfo, so train/generations treat both tasks alike.

  `num_classes` is the vocabulary size (the softmax width) and `image_shape` the
  model input of one example: a window of `bptt` token ids.
  """

  name: str
  num_classes: int
  image_shape: tuple
  vocab: tuple = dataclasses.field(repr=False)  # id -> word
  bptt: int
  num_train: int  # tokens
  num_val: int
  num_test: int
  mean: tuple = None
  std: tuple = None
  class_names: tuple = ()


def read_lines_ptb(path):
  """Token lists of a Mikolov-format file (one sentence per line, space separated).

  The file is UTF-8; a leading byte-order mark (U+FEFF, as some Windows editors write)
  is dropped, not read as a word.

  Raises:
    errors.DataError: the file is not UTF-8 (naming the byte offset of the first bad byte).
  """
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise errors.DataError(
      f"{path}: byte {e.start} (0x{raw[e.start]:02x}) is not UTF-8: convert the file to UTF-8 "
      "(e.g. iconv -f latin1 -t utf-8)"
    ) from None
  lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # as text mode reads them
  return [line.split() + [EOS] for line in lines if line.strip()]


def tokenize_text(text):
  """Lower-cased words and punctuation marks per non-empty line, each ending in <eos>."""
  return [_WORD_RE.findall(line.lower()) + [EOS] for line in text.split("\n") if line.strip()]


def build_vocab(lines, vocab_size=0):
  """<unk>, <eos>, then words by decreasing count (ties alphabetical); capped at vocab_size."""
  counts = collections.Counter(w for line in lines for w in line)
  for special in (UNK, EOS):
    counts.pop(special, None)
  words = sorted(counts, key=lambda w: (-counts[w], w))
  vocab = [UNK, EOS] + words
  return tuple(vocab[:vocab_size] if vocab_size else vocab)


def to_ids(lines, vocab):
  index = {w: i for i, w in enumerate(vocab)}
  unk = index[UNK]
  return np.array([index.get(w, unk) for line in lines for w in line], dtype=np.int32)


def batchify(ids, batch_size):
  """The token stream as `batch_size` contiguous rows [batch, L]; the tail is dropped."""
  length = len(ids) // batch_size
  return np.asarray(ids[: length * batch_size], np.int32).reshape(batch_size, length)


def windows(rows, bptt, full_only=True):
  """(x, y) BPTT windows of `rows` [B, L]: x = rows[:, s:s+T], y shifted by one."""
  out = []
  for start in range(0, rows.shape[1] - 1, bptt):
    t = min(bptt, rows.shape[1] - 1 - start)
    if full_only and t < bptt:
      break
    out.append((rows[:, start : start + t], rows[:, start + 1 : start + 1 + t]))
  return out


class TextDataset:
  """A word-level corpus with the same pipeline interface as data.Dataset."""

  def __init__(self, name, *, ptb_dir=None, data_dir=None, vocab_size=0, bptt=35, state="reset"):
    if state not in ("carry", "reset"):
      raise ValueError(f"state={state!r}: use carry or reset")
    self.state = state
    splits = _read_ptb(ptb_dir) if name == "ptb" else _read_tfds(name, data_dir)
    vocab = build_vocab(splits["train"], vocab_size)
    self.ids = {k: to_ids(v, vocab) for k, v in splits.items()}
    self.info = TextInfo(
      name=name,
      num_classes=len(vocab),
      image_shape=(bptt,),
      vocab=vocab,
      bptt=bptt,
      num_train=len(self.ids["train"]),
      num_val=len(self.ids["val"]),
      num_test=len(self.ids["test"]),
    )

  def _train_windows(self, batch_size):
    wins = windows(batchify(self.ids["train"], batch_size), self.info.bptt)
    if not wins:
      raise errors.UsageError(
        f"--batch_size={batch_size} x --bptt={self.info.bptt} leaves no training window in "
        f"{self.info.num_train} tokens: use a smaller batch or --bptt"
      )
    return wins

  def steps_per_epoch(self, batch_size):
    """Training steps (BPTT windows) per epoch; builds no input pipeline."""
    return len(self._train_windows(batch_size))

  def train(self, batch_size, *, seed, augment=None, first_epoch=0, epochs=1):
    """Full BPTT windows for epochs [first_epoch, epochs), shuffled per (seed, epoch).

    Returns (dataset, steps_per_epoch). `augment` is ignored (image-only).
    """
    del augment
    wins = self._train_windows(batch_size)
    x = tf.constant(np.stack([w[0] for w in wins]))
    y = tf.constant(np.stack([w[1] for w in wins]))
    if self.state == "carry":  # in order: window k+1 continues window k of every row
      order = np.tile(np.arange(len(wins)), max(epochs - first_epoch, 0))
    else:
      order = np.concatenate(
        [
          # RandomState takes seeds < 2**32; the modulus keeps every smaller value as it was.
          np.random.RandomState((seed * 1000003 + e) % 2**32).permutation(len(wins))
          for e in range(first_epoch, epochs)
        ]
        or [np.zeros([0], np.int64)]
      )
    ds = tf.data.Dataset.from_tensor_slices(order).map(lambda i: (tf.gather(x, i), tf.gather(y, i)))
    return tfdata.untuned(ds.prefetch(tf.data.AUTOTUNE)), len(wins)

  def val(self, batch_size):
    return self._eval("val", batch_size)

  def test(self, batch_size):
    return self._eval("test", batch_size)

  def stream(self, split):
    """The whole split as one row: ``[<eos>] + ids`` -> (x [1, n], y [1, n]), n = len(ids)."""
    ids = np.concatenate([[self.info.vocab.index(EOS)], self.ids[split]]).astype(np.int32)[None]
    return ids[:, :-1], ids[:, 1:]

  def _eval(self, split, batch_size):
    if self.state == "carry":  # one stream; consecutive windows carry the state (any batch size)
      x, y = self.stream(split)
      n = x.shape[1]
      if n < 1:
        raise errors.UsageError(f"the {split} split is empty")
      t = self.info.bptt
      full = n // t * t  # full windows [1, T], then at most one shorter one
      parts = []
      if full:
        parts.append(
          tf.data.Dataset.from_tensor_slices(
            (x[0, :full].reshape(-1, 1, t), y[0, :full].reshape(-1, 1, t))
          )
        )
      if full < n:
        parts.append(tf.data.Dataset.from_tensors((x[:, full:], y[:, full:])))
      ds = parts[0] if len(parts) == 1 else parts[0].concatenate(parts[1])
      return tfdata.untuned(ds.prefetch(tf.data.AUTOTUNE))
    wins = windows(batchify(self.ids[split], batch_size), self.info.bptt, full_only=False)
    if not wins:
      raise errors.UsageError(
        f"the {split} split has {len(self.ids[split])} tokens, too few for --batch_size={batch_size}"
      )
    ds = None
    for x, y in wins:  # at most two distinct window lengths
      d = tf.data.Dataset.from_tensors((x, y))
      ds = d if ds is None else ds.concatenate(d)
    return tfdata.untuned(ds.prefetch(tf.data.AUTOTUNE))

  def eval_sentences(self, split, batch_size):
    """int32 [scored tokens]: the sentence of each token `val`/`test` score, in their order.

    A sentence is one line of the corpus (a PTB line; a non-empty line of a tfds
    text, e.g. a verse or speech line of tiny_shakespeare), numbered from 0 in
    corpus order; its <eos> belongs to it. The order follows the pipeline: the
    stream under carry, each window's [rows, T] targets row-major under reset.
    """
    ids = self.ids[split]
    eos = self.info.vocab.index(EOS)
    sentence = np.concatenate([[0], np.cumsum(ids[:-1] == eos)]).astype(np.int32)
    if self.state == "carry":
      return sentence
    positions = batchify(np.arange(len(ids)), batch_size)
    return np.concatenate(
      [sentence[y.reshape(-1)] for _, y in windows(positions, self.info.bptt, full_only=False)]
    )

  def eval_tokens(self, split, batch_size):
    """The number of tokens `val`/`test` score (carry: all; reset: the rows' tail and firsts are not)."""
    if self.state == "carry":
      return len(self.ids[split])
    return batch_size * (len(self.ids[split]) // batch_size - 1)


def _read_ptb(ptb_dir):
  if not ptb_dir:
    raise errors.UsageError(
      "--dataset=ptb needs --ptb_dir=DIR holding ptb.train.txt, ptb.valid.txt, ptb.test.txt"
    )
  missing = [f for f in PTB_FILES.values() if not os.path.exists(os.path.join(ptb_dir, f))]
  if missing:
    raise errors.DataError(
      f"--ptb_dir={ptb_dir} lacks {', '.join(missing)}: point it at the Mikolov PTB files"
    )
  return {k: read_lines_ptb(os.path.join(ptb_dir, f)) for k, f in PTB_FILES.items()}


def _read_tfds(name, data_dir):
  import tensorflow_datasets as tfds  # lazy: tfds (~0.4 s CPU): --dataset=ptb reads text files

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.DataError(
      f"text dataset {name!r} could not be opened ({type(e).__name__}): "
      "use --dataset=ptb --ptb_dir=DIR or tiny_shakespeare with --data_dir"
    ) from None
  if "text" not in builder.info.features:
    raise errors.DataError(
      f"dataset {name!r} has no 'text' feature: use a text corpus such as tiny_shakespeare"
    )
  if not builder.is_prepared():
    raise errors.DataError(
      f"dataset {name!r} is not prepared in {data_dir or 'the default tfds directory'}: "
      "pass --data_dir pointing at a prepared TFDS directory (docs/data.md: 'tfds data sets', preparing one offline)"
    )
  out = {}
  for key, split in _TFDS_SPLITS.items():
    text = "\n".join(
      ex["text"].decode("utf-8") for ex in tfds.as_numpy(builder.as_dataset(split=split))
    )
    out[key] = tokenize_text(text)
  return out
