"""Architecture names: the grammar of --arch / --teacher_arch, in pure Python.

Config validation parses names here without importing Keras or TensorFlow, so a bad
`--arch` fails at once. The model builders (models.py for images, lm_models.py for
language models) parse with the same functions.

Image classifiers (`parse_arch`, `resolve_arch`): wrn-D-K, densenet-D-K,
preact-resnet-D, tiny, explicit widths wrnw-/prebw-..., and the teacher-matched
students wrn-match-U / prebn-match-U (see models.py for what they build).
Keras Applications (`KERAS_APPLICATIONS`): keras:NAME builds keras.applications.NAME
(models.build_keras_application); the names, the input scaling each family expects,
minimum sizes and widths are listed here without importing Keras (tests/backbones_test.py
checks them against keras.applications).
Language models (`parse_lm_arch`): lstm-L-H and cnn-lstm[-small|-large] (see
lm_models.py).
"""

from __future__ import annotations

import difflib
import math
import re

ARCH_HELP = (
  "wrn-D-K (D = 6n+4, e.g. wrn-28-10), densenet-D-K (DenseNet-BC, even D >= 10, "
  "(D-4)//6 layers per block, e.g. densenet-90-60) or densenet-L1-L2-L3-K (layers per block), "
  "either with an optional -cTHETA compression (e.g. densenet-90-60-c0.25), "
  "preact-resnet-D (D = 6n+2, e.g. preact-resnet-20), tiny, "
  "and explicit widths wrnw-U-S-W1-W2-W3[-F] / prebw-U-S-W1-W2-W3[-F] (U units per stage, "
  "stem S, stage widths W, optional final 1x1 conv to F channels), or the teacher-matched "
  "students wrn-match-U / prebn-match-U (students only: widths from a DenseNet --teacher_arch), "
  "or keras:NAME, a Keras Applications backbone (e.g. keras:ResNet50; --help lists them)"
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
    "out" (width of the final 1x1 conv, or None);
    keras (keras:NAME): "application" (the keras.applications name), "scaling",
    "min_size", "pooled", "last_point", "features", "backbone_params" (see
    KERAS_APPLICATIONS).

  Raises:
    ValueError: unknown family or invalid depth/width, with a one-line fix.
  """
  if not isinstance(arch, str):
    raise _bad(str(arch), "expected a string")
  a = arch.strip().lower()
  if a.startswith(KERAS_PREFIX):
    return _parse_keras(arch)
  if a == "tiny":
    return {"family": "tiny", "name": "tiny"}
  if m := _WRN_RE.match(a):
    depth, widen = int(m[1]), int(m[2])
    if depth < 10 or (depth - 4) % 6:
      raise _bad(arch, f"wrn depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    if widen < 1:
      raise _bad(arch, f"wrn widen factor must be >= 1, got {widen}")
    return {
      "family": "wrn",
      "name": a.replace("-", "_"),
      "depth": depth,
      "widen": widen,
      "blocks_per_stage": (depth - 4) // 6,
    }
  if m := _DENSENET_RE.match(a):
    return _parse_densenet(arch, a, m)
  if m := _PREACT_RE.match(a):
    depth = int(m[1])
    if depth < 8 or (depth - 2) % 6:
      raise _bad(
        arch, f"preact-resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, ...), got {depth}"
      )
    return {
      "family": "preact_resnet",
      "name": a.replace("-", "_"),
      "depth": depth,
      "blocks_per_stage": (depth - 2) // 6,
    }
  if m := _WIDTHS_RE.match(a):
    units, stem = int(m[2]), int(m[3])
    widths = (int(m[4]), int(m[5]), int(m[6]))
    out = int(m[7]) if m[7] else None
    if units < 1 or stem < 1 or min(widths) < 1 or (out is not None and out < 1):
      raise _bad(arch, "units, stem and widths must be >= 1")
    if m[1] == "prebw" and min(widths) < 4:
      raise _bad(arch, "bottleneck stage widths must be >= 4 (the bottleneck is width / 4)")
    return {
      "family": "wrn_widths" if m[1] == "wrnw" else "preact_bottleneck",
      "name": a.replace("-", "_"),
      "units": units,
      "stem": stem,
      "widths": widths,
      "out": out,
    }
  if _MATCH_RE.match(a):
    raise _bad(
      arch,
      "a -match- student needs a DenseNet teacher: resolve it with "
      "models.resolve_arch(arch, teacher_arch, ratio) (--arch with --teacher_arch)",
    )
  keras_like = difflib.get_close_matches(a, list(_KERAS_LOWER), n=1, cutoff=0.8)
  if keras_like:
    raise _bad(
      arch,
      f"unknown architecture name (a Keras application? --arch={KERAS_PREFIX}"
      f"{_KERAS_LOWER[keras_like[0]]})",
    )
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
      raise _bad(
        arch,
        f"densenet depth must be even and >= 10 ((depth - 4) // 6 layers per block), got {depth}",
      )
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
  return {
    "family": "densenet",
    "name": a.replace("-", "_").replace(".", "p"),
    "depth": depth,
    "growth": growth,
    "layers_per_block": layers,
    "compression": compression,
  }


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


def widths(arch: str) -> dict:
  """{"stem": channels of the first conv, "features": width of the pooled features}
  of an image architecture name, in pure Python (what --share_stem_head and
  --feature_weight need to match; tested equal to the built models').

  Raises:
    ValueError: a bad name (parse_arch's message); -match- names must be resolved.
  """
  spec = parse_arch(arch)
  family = spec["family"]
  if family == "keras":  # no "stem" layer: its first conv differs by family (see models.py)
    return {"stem": None, "features": spec["features"]}
  if family == "tiny":
    return {"stem": 8, "features": 16}
  if family == "densenet":
    w = densenet_widths(arch)
    return {"stem": w["stem"], "features": _densenet_params(spec, 3)[0]}
  if family == "wrn":
    return {"stem": 16, "features": 64 * spec["widen"]}
  if family == "preact_resnet":
    return {"stem": 16, "features": 64}
  return {"stem": spec["stem"], "features": spec["out"] or spec["widths"][-1]}


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
    raise ValueError(
      f"{arch!r} matches a DenseNet teacher's widths: set --teacher_arch=densenet-D-K "
      f"(got {teacher_arch!r})"
    )
  if not 0 < ratio <= 4:
    raise ValueError(f"width ratio must be in (0, 4], got {ratio}")
  w = densenet_widths(teacher_arch)
  widths = [max(4, int(round(ratio * b))) for b in w["blocks"]]
  family = "wrnw" if m[1] == "wrn" else "prebw"
  return "-".join(str(v) for v in [family, int(m[2]), w["stem"], *widths, w["features"]])


def param_count(arch: str, num_classes: int, channels: int = 3) -> int:
  """Trainable parameters of `build_model(arch, num_classes, (H, W, channels))`, in pure Python.

  Equal to `count_params` of the built model (tested on small nets of every family), so
  full-size counts (docs/presets.md, tests) need no Keras build. -match- names must be
  resolved first (`resolve_arch`).
  """
  spec = parse_arch(arch)
  family = spec["family"]
  if family == "keras":  # channels: grey images are replicated to RGB inside the model
    n, c = spec["backbone_params"], spec["pooled"]
    if spec["last_point"]:
      n, c = n + c * spec["last_point"] + spec["last_point"], spec["last_point"]
    return n + c * num_classes + num_classes
  if family == "tiny":
    c, n = 16, 9 * channels * 8 + 2 * 8 + 9 * 8 * 16  # its second BN is the final one
  elif family == "densenet":
    c, n = _densenet_params(spec, channels)
  else:
    if family == "wrn":
      k = spec["widen"]
      spec = dict(
        spec,
        family="wrn_widths",
        stem=16,
        widths=(16 * k, 32 * k, 64 * k),
        units=spec["blocks_per_stage"],
        out=None,
      )
    elif family == "preact_resnet":
      spec = dict(
        spec,
        family="wrn_widths",
        stem=16,
        widths=(16, 32, 64),
        units=spec["blocks_per_stage"],
        out=None,
      )
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


# ---- Keras Applications (keras:NAME) ------------------------------------------
KERAS_PREFIX = "keras:"
# How raw pixels in [0, 255] become what each family was designed (and its ImageNet weights
# trained) for, i.e. keras.applications.<family>.preprocess_input:
#   "builtin": the model rescales itself (include_preprocessing=True: MobileNetV3, EfficientNetV2,
#     ConvNeXt; EfficientNet B0-B7 always);
#   "tf": x / 127.5 - 1;  "torch": (x / 255 - ImageNet mean) / ImageNet std;
#   "caffe": RGB -> BGR, minus the ImageNet BGR mean (no scaling).
KERAS_SCALING = ("builtin", "tf", "torch", "caffe")
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)  # "torch" mode, fractions of 255
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # "caffe" mode, pixel units
# MobileNetV3's classifier has a 1x1 conv to this width (with hard-swish) after pooling,
# which include_top=False leaves out: ban_tf adds it back as the "features" layer.
MOBILENET_V3_LAST_POINT = {"MobileNetV3Small": 1024, "MobileNetV3Large": 1280}
# name: (input scaling, minimum H and W (imagenet_utils.obtain_input_shape's min_size),
#        pooled width of the backbone without its top, its trainable parameters).
# Widths and counts measured from keras.applications 3.15 (weights=None, include_top=False,
# pooling="avg"); tests/backbones_test.py checks every entry against a build.
KERAS_APPLICATIONS = {
  "ConvNeXtBase": ("builtin", 32, 1024, 87_566_464),
  "ConvNeXtLarge": ("builtin", 32, 1536, 196_230_336),
  "ConvNeXtSmall": ("builtin", 32, 768, 49_454_688),
  "ConvNeXtTiny": ("builtin", 32, 768, 27_820_128),
  "ConvNeXtXLarge": ("builtin", 32, 2048, 348_147_968),
  "DenseNet121": ("torch", 32, 1024, 6_953_856),
  "DenseNet169": ("torch", 32, 1664, 12_484_480),
  "DenseNet201": ("torch", 32, 1920, 18_092_928),
  "EfficientNetB0": ("builtin", 32, 1280, 4_007_548),
  "EfficientNetB1": ("builtin", 32, 1280, 6_513_184),
  "EfficientNetB2": ("builtin", 32, 1408, 7_700_994),
  "EfficientNetB3": ("builtin", 32, 1536, 10_696_232),
  "EfficientNetB4": ("builtin", 32, 1792, 17_548_616),
  "EfficientNetB5": ("builtin", 32, 2048, 28_340_784),
  "EfficientNetB6": ("builtin", 32, 2304, 40_735_704),
  "EfficientNetB7": ("builtin", 32, 2560, 63_786_960),
  "EfficientNetV2B0": ("builtin", 32, 1280, 5_858_704),
  "EfficientNetV2B1": ("builtin", 32, 1280, 6_860_052),
  "EfficientNetV2B2": ("builtin", 32, 1408, 8_687_086),
  "EfficientNetV2B3": ("builtin", 32, 1536, 12_821_406),
  "EfficientNetV2L": ("builtin", 32, 1280, 117_234_272),
  "EfficientNetV2M": ("builtin", 32, 1280, 52_858_356),
  "EfficientNetV2S": ("builtin", 32, 1280, 20_177_488),
  "InceptionResNetV2": ("tf", 75, 1536, 54_276_192),
  "InceptionV3": ("tf", 75, 2048, 21_768_352),
  "MobileNet": ("tf", 32, 1024, 3_206_976),
  "MobileNetV2": ("tf", 32, 1280, 2_223_872),
  "MobileNetV3Large": ("builtin", 32, 960, 2_971_952),
  "MobileNetV3Small": ("builtin", 32, 576, 927_008),
  "NASNetLarge": ("tf", 32, 4032, 84_720_150),
  "NASNetMobile": ("tf", 32, 1056, 4_232_978),
  "ResNet101": ("caffe", 32, 2048, 42_552_832),
  "ResNet101V2": ("tf", 32, 2048, 42_528_896),
  "ResNet152": ("caffe", 32, 2048, 58_219_520),
  "ResNet152V2": ("tf", 32, 2048, 58_187_904),
  "ResNet50": ("caffe", 32, 2048, 23_534_592),
  "ResNet50V2": ("tf", 32, 2048, 23_519_360),
  "VGG16": ("caffe", 32, 512, 14_714_688),
  "VGG19": ("caffe", 32, 512, 20_024_384),
  "Xception": ("tf", 71, 2048, 20_806_952),
}
_KERAS_LOWER = {k.lower(): k for k in KERAS_APPLICATIONS}
KERAS_HELP = ", ".join(KERAS_APPLICATIONS)


def _parse_keras(arch: str) -> dict:
  """`keras:NAME` (NAME case-insensitive) -> its KERAS_APPLICATIONS entry as a dict."""
  given = arch.strip()[len(KERAS_PREFIX) :].strip()
  app = _KERAS_LOWER.get(given.lower())
  if app is None:
    close = difflib.get_close_matches(given.lower(), list(_KERAS_LOWER), n=4, cutoff=0.5)
    hint = (
      "close matches: " + ", ".join(KERAS_PREFIX + _KERAS_LOWER[c] for c in close)
      if close
      else f"the names are {KERAS_HELP}"
    )
    raise ValueError(f"Bad arch {arch!r}: {given!r} is not a Keras application; {hint}")
  scaling, min_size, pooled, params = KERAS_APPLICATIONS[app]
  last_point = MOBILENET_V3_LAST_POINT.get(app)
  return {
    "family": "keras",
    "application": app,
    "name": "keras_" + app.lower(),
    "scaling": scaling,
    "min_size": min_size,
    "pooled": pooled,
    "last_point": last_point,
    "features": last_point or pooled,
    "backbone_params": params,
  }


def is_keras_arch(arch) -> bool:
  """Whether `arch` names a Keras Applications backbone (keras:NAME)."""
  return isinstance(arch, str) and arch.strip().lower().startswith(KERAS_PREFIX)


def check_image_size(arch: str, image_shape) -> None:
  """Raises ValueError (one line) if a keras:NAME backbone cannot take `image_shape`.

  Args:
    arch: any image architecture name (the built-in ones take any size and channels).
    image_shape: (H, W) or (H, W, C) of the data set's images.

  Raises:
    ValueError: H or W below the family's minimum (32, or 71 / 75 for Xception /
      Inception), or C not 1 (grey, replicated to RGB inside the model) or 3.
  """
  if not is_keras_arch(arch):
    return
  spec = parse_arch(arch)
  h, w = int(image_shape[0]), int(image_shape[1])
  m = spec["min_size"]
  if min(h, w) < m:
    raise ValueError(
      f"{arch} needs images of at least {m}x{m} pixels, got {h}x{w}: "
      f"pass --image_size={max(h, m)},{max(w, m)} (or larger)"
    )
  if len(image_shape) > 2 and int(image_shape[2]) not in (1, 3):
    raise ValueError(f"{arch} takes RGB (or grey) images, got {image_shape[2]} channels")


# ---- language models ------------------------------------------------------------
LM_ARCH_HELP = "lstm-L-H (e.g. lstm-1-1500), cnn-lstm, cnn-lstm-small, cnn-lstm-large"
_LSTM_RE = re.compile(r"^lstm-(\d+)-(\d+)$")
CNN_LSTM = {
  "small": dict(
    char_dim=15,
    widths=(1, 2, 3, 4, 5, 6),
    filters=tuple(25 * w for w in range(1, 7)),
    highway=1,
    layers=2,
    units=300,
  ),
  "large": dict(
    char_dim=15,
    widths=(1, 2, 3, 4, 5, 6, 7),
    filters=tuple(min(200, 50 * w) for w in range(1, 8)),
    highway=2,
    layers=2,
    units=650,
  ),
}


def parse_lm_arch(arch: str) -> dict:
  """Validates an LM architecture name; returns its hyperparameters (raises ValueError)."""
  a = str(arch).strip().lower()
  if m := _LSTM_RE.match(a):
    layers, units = int(m[1]), int(m[2])
    if layers < 1 or units < 1:
      raise ValueError(
        f"Bad arch {arch!r}: lstm needs >= 1 layer of >= 1 unit. Accepted forms: {LM_ARCH_HELP}."
      )
    return {"family": "lstm", "layers": layers, "units": units, "name": a.replace("-", "_")}
  if a in ("cnn-lstm", "cnn-lstm-small", "cnn-lstm-large"):
    size = "small" if a.endswith("small") else "large"
    return dict(CNN_LSTM[size], family="cnn_lstm", size=size, name=f"cnn_lstm_{size}")
  raise ValueError(f"Bad arch {arch!r}: unknown language model. Accepted forms: {LM_ARCH_HELP}.")
