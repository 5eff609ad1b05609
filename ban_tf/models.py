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

Architecture names are parsed by archs.py (pure Python, so config validation needs no
Keras); the names below are re-exported here.

DenseNet depth reading (`archs.densenet_layers`). DenseNet-BC-D-K has (D - 4) // 6 bottleneck
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

Keras Applications (`keras:NAME`, `build_keras_application`): a fresh keras.applications
backbone behind the same contract; docs/backbones.md.
"""

from __future__ import annotations

import os
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

# The name grammar and the pure-Python parameter counts live in archs.py (no Keras:
# config validation and presets use them); re-exported here.
from ban_tf.archs import (  # noqa: F401  (re-exported)
  ARCH_HELP,
  CAFFE_MEAN_BGR,
  DENSENET_COMPRESSION,
  IMAGENET_MEAN_RGB,
  IMAGENET_STD_RGB,
  check_image_size,
  densenet_layers,
  densenet_widths,
  is_match_arch,
  param_count,
  parse_arch,
  resolve_arch,
  with_compression,
)
from ban_tf.archs import _transition_width  # pylint: disable=unused-import  (the same floor as the counts)


def count_params(model: keras.Model) -> int:
  """Number of trainable parameters.

  BatchNorm moving mean/variance are excluded, matching how PyTorch/Chainer (and so the
  paper's tables) count parameters. `model.count_params()` gives the total incl. those.
  """
  return int(sum(np.prod(v.shape) for v in model.trainable_weights))


def _conv_init():
  # He-normal, fan_out (as torch kaiming_normal_(mode="fan_out") in the WRN/DenseNet code).
  # A fresh instance per layer so each draws its own seed from the global seed state.
  return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")


def _conv(x, filters, kernel, name, strides=1):
  return keras.layers.Conv2D(
    filters,
    kernel,
    strides=strides,
    padding="same",
    use_bias=False,
    kernel_initializer=_conv_init(),
    name=name,
  )(x)


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
    return (
      mask is None
      and not self.renorm
      and not self.synchronized
      and len(inputs.shape) == 4
      and self.axis in (-1, 3)
      and keras.backend.backend() == "tensorflow"
    )

  def call(self, inputs, training=None, mask=None):
    if not self._fusable(inputs, mask):
      return super().call(inputs, training=training, mask=mask)
    x = tf.cast(inputs, "float32")
    channels = x.shape[-1]
    gamma = tf.cast(self.gamma, "float32") if self.scale else tf.ones([channels])
    beta = tf.cast(self.beta, "float32") if self.center else tf.zeros([channels])
    if training and self.trainable:
      y, mean, unbiased_var, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x,
        scale=gamma,
        offset=beta,
        mean=tf.constant([], "float32"),
        variance=tf.constant([], "float32"),
        epsilon=self.epsilon,
        exponential_avg_factor=1.0,
        data_format="NHWC",
        is_training=True,
      )
      count = tf.cast(tf.size(x, out_type=tf.int64) // channels, "float32")
      variance = unbiased_var * ((count - 1.0) / tf.maximum(count, 1.0))
      self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
      self.moving_variance.assign(
        self.moving_variance * self.momentum + variance * (1.0 - self.momentum)
      )
    else:
      y = tf.raw_ops.FusedBatchNormV3(
        x=x,
        scale=gamma,
        offset=beta,
        mean=tf.cast(self.moving_mean, "float32"),
        variance=tf.cast(self.moving_variance, "float32"),
        epsilon=self.epsilon,
        data_format="NHWC",
        is_training=False,
      )[0]
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
  layers = [l for l in _all_layers(model) if isinstance(l, keras.layers.BatchNormalization)]
  for layer in layers:
    layer.synchronized = True
  return len(layers)


def _all_layers(model):
  """The layers of `model` and of the models nested in it (a keras:NAME backbone)."""
  for layer in model.layers:
    yield layer
    if isinstance(layer, keras.Model):
      yield from _all_layers(layer)


def has_fused_layers(model: keras.Model) -> bool:
  """Whether `model` (or a model nested in it) holds a FusedBatchNormalization."""
  return any(
    isinstance(layer, FusedBatchNormalization)
    or (isinstance(layer, keras.Model) and has_fused_layers(layer))
    for layer in model.layers
  )


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
  spec = {
    "family": "wrn_widths",
    "stem": widths[0],
    "widths": tuple(widths[1:]),
    "units": blocks_per_stage,
    "out": None,
  }
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


def build_model(
  arch: str,
  num_classes: int,
  input_shape: tuple[int, int, int],
  *,
  mean=None,
  std=None,
  dropout: float = 0.0,
  name: str | None = None,
  init_weights: str | None = None,
) -> keras.Model:
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
    init_weights: keras:NAME only: the backbone's initial weights (see
      `build_keras_application`); mean and std are ignored there (each family scales
      raw pixels its own way).

  Returns:
    A `keras.Model` mapping float32 [N, H, W, C] to float32 logits [N, num_classes], with
    layers "stem", "features" and "logits".

  Raises:
    ValueError: bad arch name, num_classes, input_shape, mean/std or dropout; an input
      a keras:NAME backbone cannot take (`check_image_size`).
  """
  spec = parse_arch(arch)
  if int(num_classes) < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  if len(input_shape) != 3:
    raise ValueError(f"input_shape must be (H, W, C), got {input_shape}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout must be in [0, 1), got {dropout}")
  if spec["family"] == "keras":
    return build_keras_application(
      arch, num_classes, input_shape, dropout=dropout, name=name, init_weights=init_weights
    )
  channels = int(input_shape[-1])
  mean = np.zeros(channels) if mean is None else np.asarray(mean, dtype=np.float64).reshape(-1)
  std = np.full(channels, 255.0) if std is None else np.asarray(std, dtype=np.float64).reshape(-1)
  if mean.shape != (channels,) or std.shape != (channels,):
    raise ValueError(
      f"mean and std need {channels} values (one per channel), got {mean.size} and {std.size}"
    )
  if np.any(std <= 0):
    raise ValueError(f"std must be positive, got {std.tolist()}")

  inputs = keras.Input(shape=(None, None, channels), dtype="float32", name="pixels")
  # float32 even under a mixed policy: normalising 0..255 in bfloat16 would lose precision.
  x = keras.layers.Normalization(
    mean=mean.tolist(), variance=(std**2).tolist(), dtype="float32", name="normalize"
  )(inputs)
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


BACKBONE = "backbone"  # the nested keras.applications model of a keras:NAME arch


def _scaling_layer(scaling):
  """Raw [0, 255] RGB -> what the family expects (preprocess_input's mode), as one stock
  float32 layer (so model.keras loads in plain Keras), or None ("builtin")."""
  if scaling == "tf":  # x / 127.5 - 1
    return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, dtype="float32", name="preprocess")
  if scaling == "torch":  # (x / 255 - mean) / std, in pixel units
    mean = [255.0 * m for m in IMAGENET_MEAN_RGB]
    var = [(255.0 * s) ** 2 for s in IMAGENET_STD_RGB]
    return keras.layers.Normalization(mean=mean, variance=var, dtype="float32", name="preprocess")
  if scaling == "caffe":  # RGB -> BGR minus the BGR mean: a frozen 3x3 permutation plus bias
    return keras.layers.Dense(3, trainable=False, dtype="float32", name="preprocess")
  return None


def build_keras_application(
  arch: str,
  num_classes: int,
  input_shape: tuple[int, int, int],
  *,
  dropout: float = 0.0,
  name: str | None = None,
  init_weights: str | None = None,
) -> keras.Model:
  """A keras.applications backbone (`keras:NAME`) behind ban_tf's model contract.

  pixels float32 [N, H, W, C] in [0, 255] -> (C == 1: replicated to RGB) -> the
  family's input scaling (`archs.KERAS_SCALING`: keras.applications.<family>.
  preprocess_input's mode as a stock layer "preprocess", or the model's own
  include_preprocessing layers) -> the backbone (include_top=False, pooling="avg",
  the nested layer "backbone", BatchNormalization layers fused as in the other archs)
  -> "features" (the pooled vector; MobileNetV3: plus its classifier's 1x1 conv to
  1024 / 1280 with hard-swish, as Keras' include_top has it) -> Dropout(`dropout`,
  the classifier dropout; Keras' include_top uses 0.2 for EfficientNet / MobileNetV3)
  -> "logits" (Dense, float32). Trainable parameters equal keras.applications' own
  include_top=True model for `num_classes` (except VGG, whose two 4096-wide fully
  connected layers are replaced by global pooling) and `archs.param_count`.

  No "stem" layer: the families' first convolutions differ (Config validation
  refuses --share_stem_head for them).

  Args:
    arch: keras:NAME (archs.KERAS_APPLICATIONS).
    num_classes: number of logits.
    input_shape: (H, W, C), fixed in the model; H, W >= the family's minimum.
    dropout: classifier dropout rate in [0, 1).
    name: model name (default keras_<name>).
    init_weights: None (fresh, as in the paper), or a weights file of the backbone
      without its top (.h5 as Keras Applications ships them, or .weights.h5 saved
      from keras.applications.NAME(weights=None, include_top=False, pooling="avg")).

  Raises:
    ValueError: a bad name, an input it cannot take, or weights that do not fit.
  """
  spec = parse_arch(arch)
  if spec["family"] != "keras":
    raise ValueError(f"{arch!r} is not a keras:NAME architecture")
  check_image_size(arch, input_shape)
  h, w, channels = (int(v) for v in input_shape)
  inputs = keras.Input(shape=(h, w, channels), dtype="float32", name="pixels")
  x = inputs
  if channels == 1:
    x = keras.layers.Concatenate(dtype="float32", name="grey_to_rgb")([x, x, x])
  scale = _scaling_layer(spec["scaling"])
  if scale is not None:
    x = scale(x)
  builder = getattr(keras.applications, spec["application"])
  if init_weights == "imagenet":
    path, url = imagenet_weights_file(arch, input_shape)
    if not os.path.isfile(path):
      raise FileNotFoundError(missing_imagenet_message(arch, path, url))
  try:
    backbone = builder(
      weights=init_weights or None,
      include_top=False,
      pooling="avg",
      input_shape=(h, w, 3),
    )  # no name=: EfficientNetV2's constructors read it as their block table's key
  except (ValueError, OSError) as e:
    if not init_weights:
      raise
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise ValueError(
      f"--init_weights={init_weights} does not fit {arch}'s backbone ({first}): pass the "
      f"weights of keras.applications.{spec['application']}(include_top=False)"
    ) from None
  backbone.name = BACKBONE
  backbone = _fused(backbone)
  x = backbone(x)
  if spec["last_point"]:
    x = keras.layers.Dense(spec["last_point"], name="last_point")(x)
    x = keras.layers.Activation("hard_swish", name="features")(x)
  else:
    x = keras.layers.Identity(name="features")(x)
  if dropout:
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
  logits = keras.layers.Dense(int(num_classes), dtype="float32", name="logits")(x)
  model = keras.Model(inputs, logits, name=name or spec["name"])
  if spec["scaling"] == "caffe":
    perm = np.zeros((3, 3), np.float32)
    perm[[0, 1, 2], [2, 1, 0]] = 1.0  # output channel j = input channel 2 - j
    scale.set_weights([perm, -np.asarray(CAFFE_MEAN_BGR, np.float32)])
  return model


def missing_imagenet_message(arch, path, url):
  return (
    f"--init_weights=imagenet: {arch}'s ImageNet weights are not in {path} and are not "
    f"downloaded here: fetch them on a machine with internet access (curl -o {path} {url}), "
    "or pass --init_weights=FILE"
  )


class _Found(Exception):
  pass


def imagenet_weights_file(arch: str, input_shape) -> tuple[str, str]:
  """(local path, URL) of keras:NAME's ImageNet weights without the top, as Keras names them.

  Keras Applications fetch them with keras.utils.get_file into
  <Keras home (~/.keras)>/models/<file>, and use that file without a download when it is
  there. The file name depends on the family and its options (MobileNet: width and input
  size), so it is taken from Keras itself: the application is built with
  weights="imagenet" while get_file is intercepted (keras.src.utils.file_utils, the module
  every application calls), which records the request and stops before any download.
  Costs one build of the backbone.
  """
  from keras.src.utils import file_utils  # lazy: Keras-private; only here

  spec = parse_arch(arch)
  seen = {}

  def record(fname=None, origin=None, cache_subdir="datasets", cache_dir=None, **_):
    seen.update(fname=fname or os.path.basename(origin), origin=origin, sub=cache_subdir)
    seen["dir"] = cache_dir
    raise _Found

  real = file_utils.get_file
  file_utils.get_file = record
  try:
    getattr(keras.applications, spec["application"])(
      weights="imagenet",
      include_top=False,
      pooling="avg",
      input_shape=(int(input_shape[0]), int(input_shape[1]), 3),
    )
  except _Found:
    pass
  finally:
    file_utils.get_file = real
  if not seen:
    raise ValueError(f"{arch}: Keras Applications publish no ImageNet weights for it")
  from keras.src.backend import config as keras_config  # lazy: Keras-private; only here

  home = os.path.expanduser(seen["dir"] or keras_config.keras_home())  # KERAS_HOME or ~/.keras
  if not os.access(home, os.W_OK):  # as get_file falls back
    home = os.path.join("/tmp", ".keras")
  return os.path.join(home, seen["sub"], seen["fname"]), seen["origin"]


def _fused(backbone):
  """`backbone` with each BatchNormalization a FusedBatchNormalization (same weights)."""
  if not any(type(l) is keras.layers.BatchNormalization for l in backbone.layers):
    return backbone

  def clone(layer):
    if type(layer) is keras.layers.BatchNormalization:
      return FusedBatchNormalization.from_config(layer.get_config())
    return layer.__class__.from_config(layer.get_config())

  fused = keras.models.clone_model(backbone, clone_function=clone)
  fused.set_weights(backbone.get_weights())
  return fused


SHARED_LAYERS = ("stem", "logits")


def copy_and_freeze(
  student: keras.Model, teacher: keras.Model, layers: Sequence[str] = SHARED_LAYERS
) -> None:
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
      raise ValueError(
        f"cannot share layer {name!r}: teacher weights {s_shapes} vs student {d_shapes}"
      )
  for name in layers:
    dst = student.get_layer(name)
    dst.set_weights(teacher.get_layer(name).get_weights())
    dst.trainable = False
