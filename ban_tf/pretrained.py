"""A pretrained teacher as generation 0 (--teacher=PATH): recognised, checked, imported, measured.

`--teacher=PATH` makes PATH generation 0 instead of training one. PATH is one of:

* a ban_tf generation directory (`RUN/gen_k/`, or its `saved_model/`): its SavedModel
  is re-verified against its own fingerprint and copied as it is (every endpoint,
  so `--feature_weight` works), with `model.keras` (so `--share_stem_head` works);
* any other SavedModel directory (a ban_tf BANE ensemble's too, with
  `--teacher_outputs=probabilities`): its `serving_default` signature, called by its
  input name, must take one image batch (float32 raw pixels [N, H, W, C] in [0, 255]
  are fed, cast to the signature's dtype) and return one tensor of logits, or
  probabilities with `--teacher_outputs=probabilities` (a dict of several outputs is
  read at the key `logits` / `probabilities`); outputs that are non-negative and sum
  to 1 without that flag are refused (probabilities read as logits);
* a `.keras` file (a model from those raw pixels to logits, or probabilities).

Probabilities are used as log-probabilities: softmax(log p / T) is proportional to
p^(1/T), which is softmax(z / T) for any logits z with softmax(z) = p, so every
objective sees the teacher it would see through its logits.

The model is checked against the data set (input shape and the number of classes,
one-line errors naming the mismatch), then written to gen_0/ as a ban_tf generation:
`saved_model/` with the standard endpoints and a fingerprint (what `rundir` re-verifies
on every resume), `model.keras` where there is one, and `metrics.json` with its test
(and val) accuracy measured here: the Teacher row. `metrics.json`'s `source` records
the path and the sha256 of its bytes, so that a rerun whose --teacher file was
replaced since is refused (`check_source`) instead of mixing two teachers in one run.

What needs no TensorFlow (which form PATH is, whether a run already imported it, the
source digest) is in checks.py, which `Config.validate` calls before TensorFlow loads.
"""

import contextlib
import functools
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from ban_tf import cluster
from ban_tf import distiller as distiller_lib
from ban_tf import errors
from ban_tf import export
from ban_tf import layout
from ban_tf import manifest
from ban_tf import models
from ban_tf import tasks
from ban_tf import teacher as teacher_lib
from ban_tf.checks import GENERATION, KERAS, SAVED_MODEL, SOURCE_KEY, check_path, source_sha256


def check_source(cfg, gen_dir):
  """Refuses a rerun whose --teacher was replaced since it was imported into `gen_dir`.

  A teacher that is gone is fine (gen_0/ holds the copy this run used); one whose
  bytes changed, or another path, is not: the students trained so far learned from
  the old one. Raises errors.TeacherError (one line, naming the fix).
  """
  metrics_path = os.path.join(gen_dir, layout.METRICS)
  recorded = (
    export.read_json(metrics_path).get(SOURCE_KEY) if os.path.exists(metrics_path) else None
  )
  fix = "restore it, or start over with --overwrite (or another --run_dir) to use the new one"
  if not recorded:
    raise errors.TeacherError(
      f"{gen_dir} was trained by this run, not imported from --teacher={cfg.resolved_teacher}: "
      "drop --teacher to resume it, or start over with --overwrite"
    )
  if not os.path.exists(cfg.resolved_teacher):
    return
  _, src = check_path(cfg.resolved_teacher)
  digest = source_sha256(src)
  if digest != recorded["sha256"]:
    raise errors.TeacherError(
      f"--teacher={cfg.resolved_teacher} changed since this run imported it into {gen_dir} (sha256 {digest[:12]} "
      f"!= {recorded['sha256'][:12]}): {fix}"
    )


def _fail(path, what):
  return errors.TeacherError(f"--teacher={path}: {what}")


def _signature_io(loaded, path, outputs):
  """(input name, input TensorSpec, output key) of the SavedModel's serving_default."""
  sigs = getattr(loaded, "signatures", {})
  if "serving_default" not in sigs:
    raise _fail(
      path,
      f"has no serving_default signature (it has {sorted(sigs) or 'none'}): export it with "
      "model.export(PATH) or tf.saved_model.save(..., signatures=...)",
    )
  fn = sigs["serving_default"]
  args, kwargs = fn.structured_input_signature
  inputs = dict(kwargs)
  if args or len(inputs) != 1:
    raise _fail(path, f"serving_default takes {sorted(inputs)}: it must take one image batch")
  name, spec = next(iter(inputs.items()))
  if not (spec.dtype.is_floating or spec.dtype.is_integer):
    raise _fail(
      path,
      f"serving_default takes {spec.dtype.name} input '{name}': it must take a numeric image batch "
      "(float32 raw pixels [N, H, W, C] in [0, 255] are fed, cast to its dtype), e.g. "
      "model.export(PATH) of a model on pixels",
    )
  outs = fn.structured_outputs
  if not isinstance(outs, dict):
    outs = {"output_0": outs}
  if len(outs) == 1:
    key = next(iter(outs))
  elif outputs in outs:
    key = outputs
  else:
    raise _fail(
      path,
      f"serving_default returns {sorted(outs)}: return one tensor, or name it '{outputs}' "
      "(--teacher_outputs)",
    )
  other = "probabilities" if outputs == "logits" else "logits"
  if key == other:
    raise _fail(
      path,
      f"serving_default returns '{key}' but --teacher_outputs={outputs}: pass "
      f"--teacher_outputs={other}",
    )
  return name, spec, key


def _check_input(path, shape, spec):
  """The model's input shape [N, ...] (None = any) against the data set's serving shape."""
  want = tuple(spec.serving_shape)
  got = tuple(shape[1:])
  fits = len(got) == len(want) and all(g is None or w is None or g == w for g, w in zip(got, want))
  if not fits:
    shown = tuple("any" if d is None else d for d in got)
    raise _fail(
      path,
      f"takes inputs of shape {shown} but {spec.name}'s are {want}: use a teacher for "
      f"{spec.name}'s {spec.input_name}"
      + (" (or --image_size=H,W)" if spec.input_name == "pixels" else ""),
    )


def _check_outputs(path, out, spec, outputs):
  if not spec.matches_outputs(out.shape):
    raise _fail(
      path,
      f"outputs shape {tuple(out.shape[1:])} per example but {spec.name} has {spec.num_outputs} "
      f"{spec.output_unit}: use a teacher trained on {spec.name}'s {spec.output_unit}",
    )
  if not np.all(np.isfinite(out)):
    raise _fail(path, "outputs NaN or Inf on a pixel batch in [0, 255]")
  if (
    outputs == "logits"
    and out.shape[-1] > 1
    and np.all(out >= 0)
    and np.allclose(out.sum(-1), 1.0, atol=1e-4)
  ):
    # Logits that happen to be non-negative and sum to 1 on every example are implausible;
    # softmax outputs read as logits would give students near-uniform targets, silently.
    raise _fail(
      path,
      "outputs are non-negative and sum to 1 per example (probabilities, e.g. a softmax "
      "output), read as logits: pass --teacher_outputs=probabilities",
    )
  if outputs == "probabilities":
    p = np.exp(out)  # the adapter's log-probabilities
    if not np.allclose(p.sum(axis=-1), 1.0, atol=1e-3):
      raise _fail(
        path,
        "outputs do not sum to 1 per example: they are not probabilities; use "
        "--teacher_outputs=logits",
      )


def _adapter(path, kind, src, spec, outputs):
  """(keras.Model from the data set's inputs to float32 logits, its .keras model or None, facts)."""

  def log_probs(p):
    return teacher_lib.log_probabilities(keras.ops.cast(p, "float32"))

  inputs = keras.Input(shape=spec.input_shape, dtype=spec.input_dtype, name=spec.input_name)
  if kind == KERAS:
    try:
      model = keras.saving.load_model(src, compile=False)
    except Exception as e:  # pylint: disable=broad-except
      msg = (str(e).splitlines() or [""])[0]
      msg = msg if len(msg) <= 160 else msg[:160] + "..."
      raise _fail(
        path,
        f"cannot be loaded by keras.saving.load_model ({type(e).__name__}: {msg}): if it has "
        "custom layers or functions, export it as a SavedModel where they are defined (model.export(DIR)) "
        "and pass --teacher=DIR",
      ) from None
    if len(model.inputs) != 1 or len(model.outputs) != 1:
      raise _fail(
        path,
        f"has {len(model.inputs)} inputs and {len(model.outputs)} outputs: it must map one image "
        "batch to one tensor",
      )
    _check_input(path, tuple(model.inputs[0].shape), spec)
    out = model(inputs, training=False)
    out = (
      keras.layers.Activation(log_probs, dtype="float32", name="log_probs")(out)
      if outputs == "probabilities"
      else keras.layers.Activation("linear", dtype="float32", name="logits_f32")(out)
    )
    facts = {"arch": f"{os.path.basename(src)} ({model.name})", "params": int(model.count_params())}
    return keras.Model(inputs, out, name="teacher"), (model if outputs == "logits" else None), facts

  try:
    loaded = tf.saved_model.load(src)
  except Exception as e:  # pylint: disable=broad-except  (truncated proto, missing or scrambled variables)
    raise _fail(
      path,
      f"cannot be loaded by tf.saved_model.load ({type(e).__name__}): it is damaged or "
      "incomplete (saved_model.pb and variables/ are both needed); export it again",
    ) from None
  name, sig_spec, key = _signature_io(loaded, path, outputs)
  _check_input(path, tuple(sig_spec.shape), spec)

  # What it outputs is decided here, once: serving_default by its input name, output `key`.
  feed = teacher_lib.Teacher.signature(loaded, name, sig_spec.dtype, key, outputs)
  layer = teacher_lib.TeacherLayer(feed, spec.output_shape, name="teacher_signature")
  facts = {
    "arch": os.path.basename(os.path.normpath(src if kind != GENERATION else os.path.dirname(src))),
    "params": _param_count(loaded.signatures["serving_default"]),
  }
  return keras.Model(inputs, layer(inputs), name="teacher"), None, facts


def _param_count(fn):
  """Trainable parameters a SavedModel signature reads (all its variables if none is trainable).

  The signature's own variables: a tf.Module saved with tf.saved_model.save has no
  `variables` attribute, and a Keras export's also lists BatchNorm moving statistics.
  """
  variables = fn.trainable_variables or fn.variables
  return int(sum(int(tf.size(v)) for v in variables))


def _check_generation(cfg, src, spec):
  """A ban_tf generation's SavedModel: its own fingerprint, input and outputs; its metrics' facts."""
  try:
    out = export.verify_saved_model(src)
    loaded = tf.saved_model.load(src)
  except (
    errors.TeacherError
  ) as e:  # its advice (retrain that generation) is for the run that made it
    reason = str(e).split(":")[0].replace(f"teacher SavedModel {src} ", "")
    raise _fail(
      cfg.resolved_teacher,
      f"the ban_tf SavedModel {src} {reason}: it is damaged; restore it from its "
      "run, or pass another teacher",
    ) from None
  sig = loaded.signatures.get("serving_default")
  if sig is not None:
    ((_, sig_spec),) = dict(sig.structured_input_signature[1]).items()
    _check_input(cfg.resolved_teacher, tuple(sig_spec.shape), spec)
    if set(sig.structured_outputs) == {export.PROBABILITIES}:
      raise _fail(
        cfg.resolved_teacher,
        "is a BANE ensemble (it serves probabilities, not a generation's logits): add "
        "--teacher_outputs=probabilities",
      )
  _check_outputs(cfg.resolved_teacher, out, spec, "logits")
  if cfg.feature_weight and not hasattr(loaded, export.BOTH):
    raise _fail(
      cfg.resolved_teacher,
      f"serves no '{export.BOTH}' endpoint (a model without a features layer, or exported "
      "by an older ban_tf), which --feature_weight reads: drop --feature_weight",
    )
  tasks.get(cfg.task).carry(cfg).check_generation_teacher(
    loaded, lambda what: _fail(cfg.resolved_teacher, what)
  )
  if cfg.share_stem_head and not os.path.exists(layout.beside(src, layout.KERAS)):
    raise _fail(
      cfg.resolved_teacher,
      "has no model.keras beside its saved_model/, which --share_stem_head copies layers "
      "from: drop --share_stem_head",
    )
  metrics = layout.beside(src, layout.METRICS)
  if not os.path.exists(metrics):
    return {}
  m = export.read_json(metrics)
  return {
    k: m[k]
    for k in ("arch", "params", "seed", "epochs", "seconds", "objective", "weights_sha256")
    if k in m
  }


def _check_teacher_arch(cfg, facts):
  """A --teacher_arch given with a ban_tf generation must be the architecture it was trained as."""
  if cfg.teacher_arch and facts.get("arch") and facts["arch"] != cfg.arch_for(0):
    raise _fail(
      cfg.resolved_teacher,
      f"was trained as {facts['arch']} but --teacher_arch={cfg.teacher_arch}: "
      f"pass --teacher_arch={facts['arch']} (or drop it)",
    )


class Checked:
  """A --teacher that fits the data set: kind, source path, facts (arch, params, ...), and,
  unless it is a ban_tf generation (copied as it is), the adapter model to export."""

  def __init__(self, kind, src, facts, model=None, keras_model=None):
    self.kind, self.src, self.facts, self.model, self.keras_model = (
      kind,
      src,
      facts,
      model,
      keras_model,
    )


def check_teacher(cfg, spec):
  """Loads --teacher and checks it against the data set (a tasks.DataSpec); writes nothing.

  main.run calls it before the run directory is opened, so a teacher that does not fit
  is refused before config.json records it.

  Raises:
    errors.TeacherError: a model that cannot be read or does not fit the data set.
  """
  kind, src = check_path(cfg.resolved_teacher)
  # A ban_tf SavedModel has its fingerprint (or, damaged, still its generation's metrics.json);
  # a plain SavedModel that merely sits in a saved_model/ folder is read like any other.
  fingerprinted = os.path.exists(os.path.join(src, export.FINGERPRINT_FILE))
  is_ban_tf = (fingerprinted and os.path.basename(os.path.normpath(src)) == layout.SAVED_MODEL) or (
    kind == GENERATION and os.path.exists(layout.beside(src, layout.METRICS))
  )
  if is_ban_tf and cfg.teacher_outputs == "logits":
    facts = _check_generation(cfg, src, spec)
    _check_teacher_arch(cfg, facts)
    return Checked(GENERATION, src, facts)
  # A model from elsewhere has no serve_stateful endpoint: refused where state is carried.
  tasks.get(cfg.task).carry(cfg).check_foreign_teacher(
    lambda what: _fail(cfg.resolved_teacher, what)
  )
  if cfg.feature_weight:  # before loading: what only a ban_tf generation serves
    raise _fail(
      cfg.resolved_teacher,
      f"--feature_weight matches the teacher's pooled features, which only a ban_tf "
      f"generation's SavedModel serves ('{export.BOTH}'): use one (RUN/gen_k), or drop --feature_weight",
    )
  model, keras_model, facts = _adapter(cfg.resolved_teacher, kind, src, spec, cfg.teacher_outputs)
  if cfg.share_stem_head:
    names = {layer.name for layer in keras_model.layers} if keras_model is not None else set()
    if not set(models.SHARED_LAYERS) <= names:
      what = (
        "a .keras model whose layers are named " + ", ".join(repr(n) for n in models.SHARED_LAYERS)
        if keras_model is not None
        else "a logits .keras model with those layers (or a ban_tf generation)"
      )
      raise _fail(
        cfg.resolved_teacher,
        f"--share_stem_head copies the teacher's layers {', '.join(models.SHARED_LAYERS)}, "
        f"which this teacher does not have: pass {what}, or drop --share_stem_head",
      )
  _check_outputs(
    cfg.resolved_teacher, model.predict(spec.example_inputs(), verbose=0), spec, cfg.teacher_outputs
  )
  # A ban_tf SavedModel read as probabilities (a BANE ensemble) is imported through the
  # adapter (log-probabilities), never copied as it is: its outputs are not logits.
  return Checked(SAVED_MODEL if kind == GENERATION else kind, src, facts, model, keras_model)


# One-sided z of a binomial count above chance; 3.09 ~ p = 0.001 (normal approximation).
_CHANCE_Z = 3.09


def near_chance(accuracy, num_classes, count):
  """Whether a top-1 `accuracy` over `count` examples is not clearly above chance (1/classes).

  A one-sided test of the correct count k = accuracy x count against Binomial(count,
  1/classes) by its normal approximation: near chance when z = (k - count p) /
  sqrt(count p (1 - p)) < 3.09 (p ~ 0.001). So a weak but working teacher passes
  (30% on 4 classes: z = 3.7 on 1000 examples, 11.5 on 10000), while a teacher that
  reads the pixels wrongly (near-constant outputs: accuracy ~ 1/classes) is flagged;
  on a very small test set nothing is clearly above chance, and it says so.
  """
  p = 1.0 / max(num_classes, 1)
  if count <= 0 or p >= 1:
    return False
  z = (accuracy - p) * count / math.sqrt(count * p * (1 - p))
  return z < _CHANCE_Z


def import_teacher(cfg, strategy, dataset, out):
  """Makes --teacher generation 0 in `out` (the run's gen_0/, a rundir.ModelDir); returns its metrics dict.

  Checks the model against the data set, then seals it (rundir.ModelDir.seal):
  gen_0/saved_model (fingerprinted; a ban_tf generation's copied as it is) and
  model.keras where there is one, its val and test accuracy (and the task's derived
  metrics, e.g. perplexity) measured through that copy with the same Distiller
  evaluation as every generation, then metrics.json, the manifest entry and DONE.

  Raises:
    errors.TeacherError: a model that cannot be read or does not fit the data set.
  """
  t0 = time.time()
  task = tasks.get(cfg.task)
  spec = task.spec(dataset)
  checked = check_teacher(cfg, spec)
  kind, src, facts = checked.kind, checked.src, dict(checked.facts)
  if kind != GENERATION and checked.keras_model is not None:
    facts["weights_sha256"] = manifest.weights_digest(checked.keras_model)

  def measure(sm_out):
    """Evaluated through its gen_0 copy, as the next generation will be taught by it."""
    multi_worker = cluster.is_multi_worker(strategy)
    carry = task.carry(cfg)  # scored like every generation (a stream, carrying its state, or not)
    feed = carry.load_teacher(sm_out, None if multi_worker else strategy)
    scope = contextlib.nullcontext() if multi_worker else strategy.scope()
    with scope:
      inputs = keras.Input(shape=spec.input_shape, dtype=spec.input_dtype)
      scored = teacher_lib.TeacherLayer(feed, spec.output_shape, name="teacher")(inputs)
      scorer = distiller_lib.Distiller(
        keras.Model(inputs, scored, name="teacher"),
        perplexity=task.perplexity,
        state=carry.scoring_state(feed),
      )
      scorer.compile()
    out = distiller_lib.evaluate_splits(scorer, dataset, cfg.batch_size)
    out["seconds"] = facts.get("seconds", time.time() - t0)
    return out

  result = {
    "gen": 0,
    "role": "teacher",
    "arch": facts.get("arch", "?"),
    "params": int(facts.get("params", 0)),
    "seed": facts.get("seed"),
    "epochs": facts.get("epochs", 0),
    "objective": facts.get("objective"),
    "teacher": None,
    "pretrained": True,
    SOURCE_KEY: {
      "path": os.path.abspath(cfg.resolved_teacher),
      "given": cfg.resolved_teacher,
      "kind": kind,
      "outputs": cfg.teacher_outputs,
      "sha256": source_sha256(src),
    },
  }
  if facts.get("weights_sha256"):
    result["weights_sha256"] = facts["weights_sha256"]
  copied = kind == GENERATION  # a ban_tf generation: every endpoint as it is, with model.keras
  out.seal(
    task,
    spec,
    result,
    model=None if copied else checked.model,
    copy_from=src if copied else None,
    keras_model=None if copied else checked.keras_model,
    stateful=None,
    measure=measure,
    summary_step=0,  # run_dir/tb/Teacher
    record={SOURCE_KEY: result[SOURCE_KEY]},  # where it came from
    outputs=functools.partial(task.store_predictions, cfg, dataset),
  )
  logging.info(
    "gen 0 (teacher) from --teacher=%s (%s): test accuracy %.4f, %s %.4f",
    cfg.resolved_teacher,
    kind,
    result["test_accuracy"],
    task.headline.key,
    result[task.headline.key],
  )
  chance = 1.0 / max(spec.num_outputs, 1)
  if spec.output_unit == "classes" and near_chance(
    result["test_accuracy"], spec.num_outputs, spec.num_test
  ):
    logging.warning(
      "--teacher=%s scores %.4f test accuracy on %d examples, not clearly above chance (%.4f for "
      "%d classes): does it take raw pixels in [0, 255], as the data set gives them? "
      "(docs/teacher.md)",
      cfg.resolved_teacher,
      result["test_accuracy"],
      spec.num_test,
      chance,
      spec.num_outputs,
    )
  return result
