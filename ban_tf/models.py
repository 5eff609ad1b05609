"""Model zoo for ban_tf: CIFAR Wide-ResNets, DenseNet-BC, pre-activation ResNets, a tiny net.

`build_model(arch, num_classes, input_shape)` returns a functional `keras.Model` that maps
raw float32 pixels in [0, 255] to float32 logits. Every model has the same three named
layers that other modules rely on:

* ``"stem"``: the first convolution (shared and frozen between teacher and student in the
  DenseNet -> ResNet experiments of the paper).
* ``"features"``: the global-average-pooled penultimate activation.
* ``"logits"``: the final Dense layer, always float32 so that a ``mixed_bfloat16`` policy
  still yields float32 logits.

Teacher-matched students (paper section 3.4, Table 5): ``wrn-match-U`` / ``prebn-match-U``
are resolved by `resolve_arch` against a DenseNet teacher into explicit-width nets
``wrnw-U-S-W1-W2-W3-F`` (basic blocks) / ``prebw-...`` (pre-activation bottlenecks); see
docs/variants.md. `copy_and_freeze` shares "stem" and "logits" between two models.

Input normalisation ``(x - mean) / std`` is a non-trainable float32 layer inside the model,
so an exported SavedModel takes raw pixels.

Convolutions are bias-free and initialised He-normal with ``fan_out`` (untruncated), as in
the reference WRN/DenseNet PyTorch code. Initializers draw their seeds from Keras' global
seed state, so ``keras.utils.set_random_seed(s)`` before a build makes it reproducible.

DenseNet depth reading (`densenet_layers`). DenseNet-BC-D-K has (D - 4) // 6 bottleneck
layers (each a 1x1 + 3x3 conv) in each of its 3 dense blocks, growth K, compression 0.5, as
in the DenseNet-BC reference code, which floors the same way when D is not 6n+4: 112 -> 18,
106 -> 17, 90 -> 14, 80 -> 12 per block. The paper's own counts pin this reading: Table 4's
half-depth student of DenseNet-90-60 is exactly 21.2M as a 7/7/7 growth-120 net, and Table 5's
WRN students, whose widths follow the teacher's blocks, land within 1%. Its "112-33" at 6.3M
is DenseNet-BC-106-33 (6.27M), the coupled-ensemble building block: the presets build that.
Explicit layers `densenet-L1-L2-L3-K` keep any other reading reachable (the previous one,
(D - 4) // 2 layers spread over the blocks, was densenet-14-14-15-60 for 90-60). A
`-cTHETA` suffix sets the transitions' compression (default 0.5; `--densenet_compression`).
Parameter counts: `param_count` (pure Python, equal to `count_params` of the built model);
docs/presets.md compares every preset with the paper.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

ARCH_HELP = (
    "wrn-D-K (D = 6n+4, e.g. wrn-28-10), densenet-D-K (DenseNet-BC, even D >= 10, "
    "(D-4)//6 layers per block, e.g. densenet-90-60) or densenet-L1-L2-L3-K (layers per block), "
    "either with an optional -cTHETA compression (e.g. densenet-90-60-c0.25), "
    "preact-resnet-D (D = 6n+2, e.g. preact-resnet-20), tiny, "
    "and explicit widths wrnw-U-S-W1-W2-W3[-F] / prebw-U-S-W1-W2-W3[-F] (U units per stage, "
    "stem S, stage widths W, optional final 1x1 conv to F channels), or the teacher-matched "
    "students wrn-match-U / prebn-match-U (students only: widths from a DenseNet --teacher_arch)"
)

_WRN_RE = re.compile(r"^wrn-(\d+)-(\d+)$")
_DENSENET_RE = re.compile(r"^densenet-(\d+)-(\d+)(?:-(\d+)-(\d+))?(?:-c(\d*\.?\d+))?$")
DENSENET_COMPRESSION = 0.5
_PREACT_RE = re.compile(r"^preact-resnet-(\d+)$")
_WIDTHS_RE = re.compile(r"^(wrnw|prebw)-(\d+)-(\d+)-(\d+)-(\d+)-(\d+)(?:-(\d+))?$")
_MATCH_RE = re.compile(r"^(wrn|prebn)-match-(\d+)$")


def _bad(arch: str, why: str) -> ValueError:
  return ValueError(f"Bad arch {arch!r}: {why}. Accepted forms: {ARCH_HELP}.")


def parse_arch(arch: str) -> dict:
  """Validates an architecture name and returns its hyperparameters.

  Args:
    arch: e.g. "wrn-28-10", "densenet-90-60", "preact-resnet-20" or "tiny"
      (case-insensitive).

  Returns:
    A dict with "family" ("wrn", "densenet", "preact_resnet", "tiny",
    "wrn_widths" or "preact_bottleneck") and "name" (the default model name, e.g.
    "wrn_28_10"), plus per family:
    wrn: "depth", "widen", "blocks_per_stage";
    densenet: "depth", "growth", "layers_per_block" (tuple of 3), "compression";
    preact_resnet: "depth", "blocks_per_stage";
    wrn_widths / preact_bottleneck: "units" (per stage), "stem", "widths" (3),
    "out" (width of the final 1x1 conv, or None).

  Raises:
    ValueError: unknown family or invalid depth/width, with a one-line fix.
  """
  if not isinstance(arch, str):
    raise _bad(str(arch), "expected a string")
  a = arch.strip().lower()
  if a == "tiny":
    return {"family": "tiny", "name": "tiny"}
  if m := _WRN_RE.match(a):
    depth, widen = int(m[1]), int(m[2])
    if depth < 10 or (depth - 4) % 6:
      raise _bad(arch, f"wrn depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    if widen < 1:
      raise _bad(arch, f"wrn widen factor must be >= 1, got {widen}")
    return {"family": "wrn", "name": a.replace("-", "_"), "depth": depth, "widen": widen,
            "blocks_per_stage": (depth - 4) // 6}
  if m := _DENSENET_RE.match(a):
    return _parse_densenet(arch, a, m)
  if m := _PREACT_RE.match(a):
    depth = int(m[1])
    if depth < 8 or (depth - 2) % 6:
      raise _bad(arch, f"preact-resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, ...), got {depth}")
    return {"family": "preact_resnet", "name": a.replace("-", "_"), "depth": depth,
            "blocks_per_stage": (depth - 2) // 6}
  if m := _WIDTHS_RE.match(a):
    units, stem = int(m[2]), int(m[3])
    widths = (int(m[4]), int(m[5]), int(m[6]))
    out = int(m[7]) if m[7] else None
    if units < 1 or stem < 1 or min(widths) < 1 or (out is not None and out < 1):
      raise _bad(arch, "units, stem and widths must be >= 1")
    if m[1] == "prebw" and min(widths) < 4:
      raise _bad(arch, "bottleneck stage widths must be >= 4 (the bottleneck is width / 4)")
    return {"family": "wrn_widths" if m[1] == "wrnw" else "preact_bottleneck",
            "name": a.replace("-", "_"), "units": units, "stem": stem, "widths": widths,
            "out": out}
  if _MATCH_RE.match(a):
    raise _bad(arch, "a -match- student needs a DenseNet teacher: resolve it with "
                     "models.resolve_arch(arch, teacher_arch, ratio) (--arch with --teacher_arch)")
  raise _bad(arch, "unknown or malformed architecture name")


def densenet_layers(depth: int) -> tuple:
  """Bottleneck layers per dense block of DenseNet-BC-`depth`: (D - 4) // 6 in each of 3.

  Floors as the DenseNet-BC reference code does when D is not 6n+4 (90 -> 14, 80 -> 12).
  """
  return ((depth - 4) // 6,) * 3


def _parse_densenet(arch: str, a: str, m) -> dict:
  """`densenet-D-K[-cTHETA]` or `densenet-L1-L2-L3-K[-cTHETA]` (see the module doc)."""
  if m[3] is None:
    depth, growth = int(m[1]), int(m[2])
    if depth < 10 or (depth - 4) % 2:
      raise _bad(arch, f"densenet depth must be even and >= 10 ((depth - 4) // 6 layers per block), got {depth}")
    layers = densenet_layers(depth)
  else:
    layers, growth = (int(m[1]), int(m[2]), int(m[3])), int(m[4])
    if min(layers) < 1:
      raise _bad(arch, f"densenet blocks need >= 1 layer each, got {layers}")
    depth = 4 + 2 * sum(layers)
  if growth < 1:
    raise _bad(arch, f"densenet growth rate must be >= 1, got {growth}")
  compression = float(m[5]) if m[5] else DENSENET_COMPRESSION
  if not 0 < compression <= 1:
    raise _bad(arch, f"densenet compression must be in (0, 1], got {m[5]}")
  return {"family": "densenet", "name": a.replace("-", "_").replace(".", "p"), "depth": depth,
          "growth": growth, "layers_per_block": layers, "compression": compression}


def with_compression(arch: str, compression: float) -> str:
  """`arch` with the DenseNet transition compression `compression` (--densenet_compression).

  The default 0.5 returns `arch` unchanged; any other value appends `-cTHETA` to a
  DenseNet name.

  Raises:
    ValueError: another compression for a non-DenseNet, or for a name that has one.
  """
  if compression == DENSENET_COMPRESSION:
    return arch
  spec = parse_arch(arch)
  if spec["family"] != "densenet":
    raise ValueError(f"a compression of {compression} needs a DenseNet, got {arch!r}")
  if _DENSENET_RE.match(arch.strip().lower())[5]:
    raise ValueError(f"{arch!r} already names its compression")
  return f"{arch}-c" + f"{compression:.6f}".rstrip("0").rstrip(".")


def _transition_width(channels: int, compression: float) -> int:
  # floor(theta * c), as the DenseNet-BC reference code; at least one channel.
  return max(1, int(math.floor(compression * channels)))


def densenet_widths(arch: str) -> dict:
  """Channel counts of a DenseNet-BC: stem, per-block outputs after the transition
  (the last block compressed by the same factor, as if a transition followed),
  and the pooled feature width.

  E.g. densenet-90-60 (14/14/14): stem 120, blocks (480, 660, 750), features 1500.
  """
  spec = parse_arch(arch)
  if spec["family"] != "densenet":
    raise ValueError(f"{arch!r} is not a DenseNet (widths can only be matched to densenet-D-K)")
  g = spec["growth"]
  c = 2 * g
  stem, blocks = c, []
  for n_layers in spec["layers_per_block"]:
    c += n_layers * g
    blocks.append(_transition_width(c, spec["compression"]))
    features = c
    c = blocks[-1]
  return {"stem": stem, "blocks": tuple(blocks), "features": features}


def is_match_arch(arch: str) -> bool:
  return bool(_MATCH_RE.match(arch.strip().lower()))


def resolve_arch(arch: str, teacher_arch: str | None, ratio: float = 1.0) -> str:
  """Turns a teacher-matched student name into an explicit-width architecture.

  `wrn-match-U` (Wide-ResNet basic blocks) and `prebn-match-U` (pre-activation
  bottleneck blocks) with U units per stage get (paper section 3.4, Table 5):

  * stem width = the teacher's stem width (so the stem can be shared);
  * stage widths = ratio x the teacher's dense-block outputs after the transition's
    1x1 conv, before pooling (`densenet_widths`; the last block compressed by 0.5);
  * a final pre-activated 1x1 conv to the teacher's feature width, so the student's
    classifier has the teacher's shape (and can be shared).

  Any other name is returned unchanged.

  Raises:
    ValueError: a -match- student without a DenseNet teacher or with a bad ratio.
  """
  m = _MATCH_RE.match(arch.strip().lower())
  if not m:
    return arch
  if not teacher_arch or parse_arch(teacher_arch)["family"] != "densenet":
    raise ValueError(f"{arch!r} matches a DenseNet teacher's widths: set --teacher_arch=densenet-D-K "
                     f"(got {teacher_arch!r})")
  if not 0 < ratio <= 4:
    raise ValueError(f"width ratio must be in (0, 4], got {ratio}")
  w = densenet_widths(teacher_arch)
  widths = [max(4, int(round(ratio * b))) for b in w["blocks"]]
  family = "wrnw" if m[1] == "wrn" else "prebw"
  return "-".join(str(v) for v in [family, int(m[2]), w["stem"], *widths, w["features"]])


def count_params(model: keras.Model) -> int:
  """Number of trainable parameters.

  BatchNorm moving mean/variance are excluded, matching how PyTorch/Chainer (and so the
  paper's tables) count parameters. `model.count_params()` gives the total incl. those.
  """
  return int(sum(np.prod(v.shape) for v in model.trainable_weights))


def param_count(arch: str, num_classes: int, channels: int = 3) -> int:
  """Trainable parameters of `build_model(arch, num_classes, (H, W, channels))`, in pure Python.

  Equal to `count_params` of the built model (tested on small nets of every family), so
  full-size counts (docs/presets.md, tests) need no Keras build. -match- names must be
  resolved first (`resolve_arch`).
  """
  spec = parse_arch(arch)
  family = spec["family"]
  if family == "tiny":
    c, n = 16, 9 * channels * 8 + 2 * 8 + 9 * 8 * 16  # its second BN is the final one
  elif family == "densenet":
    c, n = _densenet_params(spec, channels)
  else:
    if family == "wrn":
      k = spec["widen"]
      spec = dict(spec, family="wrn_widths", stem=16, widths=(16 * k, 32 * k, 64 * k),
                  units=spec["blocks_per_stage"], out=None)
    elif family == "preact_resnet":
      spec = dict(spec, family="wrn_widths", stem=16, widths=(16, 32, 64),
                  units=spec["blocks_per_stage"], out=None)
    c, n = _widths_resnet_params(spec, channels)
  return n + 2 * c + c * num_classes + num_classes  # final BN, then the classifier


def _densenet_params(spec, channels):
  """(feature width, parameters before the final BN) of a DenseNet-BC."""
  g = spec["growth"]
  c = 2 * g
  n = 9 * channels * c
  for b, n_layers in enumerate(spec["layers_per_block"]):
    for _ in range(n_layers):
      n += 2 * c + c * 4 * g + 2 * 4 * g + 9 * 4 * g * g  # BN, 1x1 conv, BN, 3x3 conv
      c += g
    if b < len(spec["layers_per_block"]) - 1:
      out = _transition_width(c, spec["compression"])
      n += 2 * c + c * out  # BN, 1x1 conv
      c = out
  return c, n


def _widths_resnet_params(spec, channels):
  """(feature width, parameters before the final BN) of an explicit-width pre-act ResNet."""
  c = spec["stem"]
  n = 9 * channels * c
  for s, w in enumerate(spec["widths"]):
    for b in range(spec["units"]):
      n += 2 * c  # pre-activation BN
      if (s > 0 and b == 0) or c != w:
        n += c * w  # 1x1 projection shortcut
      if spec["family"] == "preact_bottleneck":
        q = w // 4
        n += c * q + 2 * q + 9 * q * q + 2 * q + q * w
      else:
        n += 9 * c * w + 2 * w + 9 * w * w
      c = w
  if spec["out"]:
    n += 2 * c + c * spec["out"]
    c = spec["out"]
  return c, n


def _conv_init():
  # He-normal, fan_out (as torch kaiming_normal_(mode="fan_out") in the WRN/DenseNet code).
  # A fresh instance per layer so each draws its own seed from the global seed state.
  return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")


def _conv(x, filters, kernel, name, strides=1):
  return keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                             kernel_initializer=_conv_init(), name=name)(x)


@keras.saving.register_keras_serializable(package="ban_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
  """`keras.layers.BatchNormalization` computed by TensorFlow's fused kernel.

  Keras 3 normalises with ~10 separate element-wise ops (moments, then scale and shift,
  and as many again in the gradient). On 4-D channels-last inputs this layer calls
  `FusedBatchNormV3` instead: one kernel forward and one backward, which Grappler further
  fuses with the following ReLU (oneDNN on CPU, cuDNN on GPU). A pre-act ResNet-20 train
  step is ~25% faster on CPU (docs/performance.md).

  Same variables, configuration and semantics as the Keras layer: statistics in float32
  (inputs are upcast, outputs cast back to the compute dtype), moving statistics updated
  with the biased batch variance (the fused kernel returns the unbiased one, which is
  converted), inference mode when `training` is false or the layer is frozen. Other
  inputs (masks, other ranks or axes, renorm, synchronized) take the Keras path.
  """

  def _fusable(self, inputs, mask):
    return (mask is None and not self.renorm and not self.synchronized
            and len(inputs.shape) == 4 and self.axis in (-1, 3)
            and keras.backend.backend() == "tensorflow")

  def call(self, inputs, training=None, mask=None):
    if not self._fusable(inputs, mask):
      return super().call(inputs, training=training, mask=mask)
    x = tf.cast(inputs, "float32")
    channels = x.shape[-1]
    gamma = tf.cast(self.gamma, "float32") if self.scale else tf.ones([channels])
    beta = tf.cast(self.beta, "float32") if self.center else tf.zeros([channels])
    if training and self.trainable:
      y, mean, unbiased_var, _, _, _ = tf.raw_ops.FusedBatchNormV3(
          x=x, scale=gamma, offset=beta, mean=tf.constant([], "float32"),
          variance=tf.constant([], "float32"), epsilon=self.epsilon,
          exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
      count = tf.cast(tf.size(x, out_type=tf.int64) // channels, "float32")
      variance = unbiased_var * ((count - 1.0) / tf.maximum(count, 1.0))
      self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
      self.moving_variance.assign(
          self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
    else:
      y = tf.raw_ops.FusedBatchNormV3(
          x=x, scale=gamma, offset=beta, mean=tf.cast(self.moving_mean, "float32"),
          variance=tf.cast(self.moving_variance, "float32"), epsilon=self.epsilon,
          data_format="NHWC", is_training=False)[0]
    return tf.cast(y, self.compute_dtype)


def synchronize_batchnorm(model: keras.Model) -> int:
  """Switches every BatchNormalization layer of `model` to synchronized batch statistics.

  In training, each layer then normalises with the mean and variance of the global
  batch (all-reduced over tf.distribute replicas: Keras `synchronized=True`, the
  torch SyncBatchNorm behaviour), so its moving statistics are the same on every
  replica. Costs three small all-reduces per layer and step; no effect on one
  device or in inference. Saved in model.keras (the layer config). Returns the
  number of layers switched.
  """
  layers = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
  for layer in layers:
    layer.synchronized = True
  return len(layers)


def has_fused_layers(model: keras.Model) -> bool:
  """Whether `model` (or a model nested in it) holds a FusedBatchNormalization."""
  return any(isinstance(layer, FusedBatchNormalization) or
             (isinstance(layer, keras.Model) and has_fused_layers(layer)) for layer in model.layers)


def to_stock(model: keras.Model) -> keras.Model:
  """The same model with stock Keras layers only: what `model.keras` files hold.

  Every `FusedBatchNormalization` (nested models included) becomes a
  `keras.layers.BatchNormalization` with the same configuration and weights (the
  same math in inference and training: see the class), so the file loads in plain
  Keras without importing ban_tf. Other layers are cloned from their configs.
  Training keeps the fused layer; only saved files get the stock one.

  Args:
    model: a functional keras.Model (built).

  Returns:
    A new functional keras.Model with equal weights, names and outputs.
  """
  def clone(layer):
    if isinstance(layer, FusedBatchNormalization):
      return keras.layers.BatchNormalization.from_config(layer.get_config())
    return layer.__class__.from_config(layer.get_config())

  stock = keras.models.clone_model(model, clone_function=clone, recursive=True)
  stock.set_weights(model.get_weights())
  return stock


def _bn_relu(x, name):
  # Momentum 0.9 / eps 1e-5 follow the PyTorch defaults that the reference numbers used.
  x = FusedBatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
  return keras.layers.ReLU(name=f"{name}_relu")(x)


def _preact_resnet(x, blocks_per_stage, widths, dropout):
  """Pre-activation basic-block ResNet body (WRN when widths are widened). Returns pre-pool.

  `widths` = (stem, stage 1, stage 2, stage 3): the explicit-width net with basic blocks.
  """
  spec = {"family": "wrn_widths", "stem": widths[0], "widths": tuple(widths[1:]),
          "units": blocks_per_stage, "out": None}
  return _widths_resnet(x, spec, dropout)


def _widths_resnet(x, spec, dropout):
  """Explicit-width pre-activation ResNet: basic (WRN) or bottleneck blocks. Returns pre-pool."""
  x = _conv(x, spec["stem"], 3, "stem")
  bottleneck = spec["family"] == "preact_bottleneck"
  for s, width in enumerate(spec["widths"]):
    for b in range(spec["units"]):
      p = f"s{s + 1}b{b + 1}"
      strides = 2 if (s > 0 and b == 0) else 1
      pre = _bn_relu(x, f"{p}_1")
      shortcut = x
      if strides != 1 or x.shape[-1] != width:
        # Projection shortcut sees the pre-activated input, as in the WRN reference.
        shortcut = _conv(pre, width, 1, f"{p}_proj", strides)
      if bottleneck:  # 1x1 (width/4) -> 3x3 (width/4, strided) -> 1x1 (width)
        y = _conv(pre, width // 4, 1, f"{p}_conv1")
        y = _bn_relu(y, f"{p}_2")
        y = _conv(y, width // 4, 3, f"{p}_conv2", strides)
        y = _bn_relu(y, f"{p}_3")
        if dropout:
          y = keras.layers.Dropout(dropout, name=f"{p}_drop")(y)
        y = _conv(y, width, 1, f"{p}_conv3")
      else:
        y = _conv(pre, width, 3, f"{p}_conv1", strides)
        y = _bn_relu(y, f"{p}_2")
        if dropout:
          y = keras.layers.Dropout(dropout, name=f"{p}_drop")(y)
        y = _conv(y, width, 3, f"{p}_conv2")
      x = keras.layers.Add(name=f"{p}_add")([shortcut, y])
  if spec["out"]:
    x = _conv(_bn_relu(x, "out"), spec["out"], 1, "out_conv")
  return _bn_relu(x, "final")


def _densenet_bc(x, layers_per_block, growth, dropout, compression=DENSENET_COMPRESSION):
  """DenseNet-BC body: bottleneck layers, transitions to floor(compression x channels). Returns pre-pool."""
  x = _conv(x, 2 * growth, 3, "stem")
  for blk, n_layers in enumerate(layers_per_block):
    for i in range(n_layers):
      p = f"d{blk + 1}l{i + 1}"
      y = _bn_relu(x, f"{p}_1")
      y = _conv(y, 4 * growth, 1, f"{p}_conv1")
      if dropout:
        y = keras.layers.Dropout(dropout, name=f"{p}_drop1")(y)
      y = _bn_relu(y, f"{p}_2")
      y = _conv(y, growth, 3, f"{p}_conv2")
      if dropout:
        y = keras.layers.Dropout(dropout, name=f"{p}_drop2")(y)
      x = keras.layers.Concatenate(name=f"{p}_concat")([x, y])
    if blk < len(layers_per_block) - 1:
      p = f"t{blk + 1}"
      y = _bn_relu(x, p)
      y = _conv(y, _transition_width(x.shape[-1], compression), 1, f"{p}_conv")
      x = keras.layers.AveragePooling2D(2, name=f"{p}_pool")(y)
  return _bn_relu(x, "final")


def _tiny(x, dropout):
  x = _conv(x, 8, 3, "stem")
  x = _bn_relu(x, "b1")
  if dropout:
    x = keras.layers.Dropout(dropout, name="drop")(x)
  x = _conv(x, 16, 3, "conv2", strides=2)
  return _bn_relu(x, "b2")


def build_model(arch: str, num_classes: int, input_shape: tuple[int, int, int], *, mean=None,
                std=None, dropout: float = 0.0, name: str | None = None) -> keras.Model:
  """Builds a functional classifier from raw pixels to logits.

  Args:
    arch: architecture name, see `ARCH_HELP` / `parse_arch`.
    num_classes: number of output logits.
    input_shape: (H, W, C); only C is fixed in the model, H and W may vary.
    mean: per-channel mean (length C) in pixel units; default 0.
    std: per-channel std (length C) in pixel units; default 255 (plain scaling to [0, 1]).
    dropout: dropout rate inside blocks (WRN: between the two convs; DenseNet: after each
      conv of a bottleneck layer; tiny: after the first conv). 0 disables it.
    name: model name; defaults to the arch with "-" -> "_", e.g. "wrn_28_10". Give distinct
      names to models nested in one ensemble.

  Returns:
    A `keras.Model` mapping float32 [N, H, W, C] to float32 logits [N, num_classes], with
    layers "stem", "features" and "logits".

  Raises:
    ValueError: bad arch name, num_classes, input_shape, mean/std or dropout.
  """
  spec = parse_arch(arch)
  if int(num_classes) < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  if len(input_shape) != 3:
    raise ValueError(f"input_shape must be (H, W, C), got {input_shape}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout must be in [0, 1), got {dropout}")
  channels = int(input_shape[-1])
  mean = np.zeros(channels) if mean is None else np.asarray(mean, dtype=np.float64).reshape(-1)
  std = np.full(channels, 255.0) if std is None else np.asarray(std, dtype=np.float64).reshape(-1)
  if mean.shape != (channels,) or std.shape != (channels,):
    raise ValueError(f"mean and std need {channels} values (one per channel), got "
                     f"{mean.size} and {std.size}")
  if np.any(std <= 0):
    raise ValueError(f"std must be positive, got {std.tolist()}")

  inputs = keras.Input(shape=(None, None, channels), dtype="float32", name="pixels")
  # float32 even under a mixed policy: normalising 0..255 in bfloat16 would lose precision.
  x = keras.layers.Normalization(mean=mean.tolist(), variance=(std ** 2).tolist(),
                                 dtype="float32", name="normalize")(inputs)
  family = spec["family"]
  if family == "wrn":
    k = spec["widen"]
    x = _preact_resnet(x, spec["blocks_per_stage"], (16, 16 * k, 32 * k, 64 * k), dropout)
  elif family == "preact_resnet":
    x = _preact_resnet(x, spec["blocks_per_stage"], (16, 16, 32, 64), dropout)
  elif family == "densenet":
    x = _densenet_bc(x, spec["layers_per_block"], spec["growth"], dropout, spec["compression"])
  elif family in ("wrn_widths", "preact_bottleneck"):
    x = _widths_resnet(x, spec, dropout)
  else:
    x = _tiny(x, dropout)
  features = keras.layers.GlobalAveragePooling2D(name="features")(x)
  logits = keras.layers.Dense(int(num_classes), dtype="float32", name="logits")(features)
  return keras.Model(inputs, logits, name=name or spec["name"])


SHARED_LAYERS = ("stem", "logits")


def copy_and_freeze(student: keras.Model, teacher: keras.Model,
                    layers: Sequence[str] = SHARED_LAYERS) -> None:
  """Copies the teacher's named layers' weights into the student and freezes them.

  Used for the paper's Table 5 setting (the first conv "stem" and the classifier
  "logits" shared between teacher and student, frozen).

  Raises:
    ValueError: (one line) a layer whose weight shapes differ between the two.
  """
  for name in layers:
    src, dst = teacher.get_layer(name), student.get_layer(name)
    s_shapes = [tuple(w.shape) for w in src.get_weights()]
    d_shapes = [tuple(w.shape) for w in dst.get_weights()]
    if s_shapes != d_shapes:
      raise ValueError(f"cannot share layer {name!r}: teacher weights {s_shapes} vs student {d_shapes}")
  for name in layers:
    dst = student.get_layer(name)
    dst.set_weights(teacher.get_layer(name).get_weights())
    dst.trainable = False
