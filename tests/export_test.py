"""Export round trips, fingerprints, atomic writes and the BANE ensemble."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from ban_tf import errors
from ban_tf import export
from ban_tf import generations
from ban_tf import models
from ban_tf import teacher as teacher_lib

SHAPE = (12, 12, 3)


def tiny(seed, name):
  keras.utils.set_random_seed(seed)
  return models.build_model(
    "tiny", 5, SHAPE, mean=(120.0, 110.0, 100.0), std=(60.0, 50.0, 40.0), name=name
  )


def test_export_reload_identical_logits(tmp_path):
  model = tiny(0, "m")
  path = str(tmp_path / "saved_model")
  export.export_saved_model(model, path, SHAPE)
  x = np.random.RandomState(5).uniform(0, 255, (7,) + SHAPE).astype(np.float32)
  want = model(x, training=False).numpy()
  loaded = tf.saved_model.load(path)
  np.testing.assert_allclose(loaded.serve(tf.constant(x)).numpy(), want, atol=1e-5)
  layer = teacher_lib.Teacher.load(path, expected_classes=5)
  np.testing.assert_allclose(layer(tf.constant(x)).logits.numpy(), want, atol=1e-5)
  assert layer.source_path == os.path.abspath(path)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]  # no temporary left behind


def _signature(path):
  """({input name: shape}, {output name: shape}) of a SavedModel's serving_default."""
  fn = tf.saved_model.load(path).signatures["serving_default"]
  inputs = {k: v.shape.as_list() for k, v in fn.structured_input_signature[1].items()}
  outputs = {k: v.shape.as_list() for k, v in fn.structured_outputs.items()}
  return inputs, outputs


@pytest.mark.parametrize("arch", ["tiny", "wrn-10-1"])  # without and with a "features" layer use
def test_serving_signature_names_and_fixed_size(tmp_path, arch):
  keras.utils.set_random_seed(0)
  model = models.build_model(arch, 5, SHAPE)
  path = str(tmp_path / "saved_model")
  export.export_saved_model(model, path, SHAPE)
  assert _signature(path) == ({"pixels": [None, *SHAPE]}, {"logits": [None, 5]})
  loaded = tf.saved_model.load(path)
  x = np.random.RandomState(1).uniform(0, 255, (2,) + SHAPE).astype(np.float32)
  np.testing.assert_allclose(
    loaded.signatures["serving_default"](pixels=tf.constant(x))["logits"],
    model(x, training=False),
    atol=1e-5,
  )
  for name in ("serve", "features", "logits_and_features"):  # every endpoint: the same fixed input
    assert list(loaded.signatures[name].structured_input_signature[1]) == ["pixels"]
    assert loaded.signatures[name].structured_input_signature[1]["pixels"].shape.as_list() == [
      None,
      *SHAPE,
    ]
  with pytest.raises((ValueError, TypeError)):
    loaded.serve(tf.zeros((1, 16, 16, 3)))  # H and W are part of the signature


@pytest.mark.slow
def test_tflite_conversion_keeps_the_fixed_size_and_names(tmp_path):
  model = tiny(9, "lite")
  path = str(tmp_path / "saved_model")
  export.export_saved_model(model, path, SHAPE)
  interpreter = tf.lite.Interpreter(
    model_content=tf.lite.TFLiteConverter.from_saved_model(path).convert()
  )
  assert list(interpreter.get_input_details()[0]["shape"]) == [1, *SHAPE]  # not [1, 1, 1, 1]
  assert interpreter.get_signature_list()["serving_default"] == {
    "inputs": ["pixels"],
    "outputs": ["logits"],
  }
  x = np.random.RandomState(2).uniform(0, 255, (1,) + SHAPE).astype(np.float32)
  got = interpreter.get_signature_runner("serving_default")(pixels=x)["logits"]
  np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_saved_model_of_an_older_ban_tf_still_verifies_and_teaches(tmp_path):
  """Run directories written before the named signatures: `serve` only, any H and W."""
  model = tiny(7, "old")
  path = str(tmp_path / "saved_model")
  model.export(path, format="tf_saved_model", verbose=False)  # how older ban_tf wrote it
  x = export.fingerprint_inputs(SHAPE)
  np.savez(os.path.join(path, export.FINGERPRINT_FILE), inputs=x, outputs=model(x).numpy())
  np.testing.assert_allclose(export.verify_saved_model(path), model(x).numpy(), atol=1e-5)
  layer = teacher_lib.Teacher.load(path, expected_classes=5)
  np.testing.assert_allclose(layer(tf.constant(x)).logits.numpy(), model(x).numpy(), atol=1e-5)


_PLAIN_KERAS = """
import importlib.abc, json, os, sys
class NoBanTf(importlib.abc.MetaPathFinder):  # ban_tf must not be needed, even if installed
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == "ban_tf":
      raise ImportError("ban_tf is blocked in this process")
sys.meta_path.insert(0, NoBanTf())
import keras, numpy as np, tensorflow as tf
def kinds(layers):
  return {type(l).__module__ + "." + type(l).__name__ for l in layers} | set().union(
      *[kinds(l.layers) for l in layers if hasattr(l, "layers")])
out = {}
for case in sys.argv[1:]:
  model = keras.saving.load_model(os.path.join(case, "model.keras"))
  x = np.load(os.path.join(case, "x.npy"))
  serving = tf.saved_model.load(os.path.join(case, "saved_model")).signatures["serving_default"]
  (name,) = serving.structured_input_signature[1]
  out[case] = {"keras": model.predict(x, verbose=0).tolist(), "input": name,
               "saved_model": serving(**{name: tf.constant(x)})["logits"].numpy().tolist(),
               "layers": sorted(kinds(model.layers))}
out["ban_tf_imported"] = any(m.split(".")[0] == "ban_tf" for m in sys.modules)
print(json.dumps(out))
"""


def _perturbed(model, rng, low, high):
  model.set_weights(
    [
      w + rng.uniform(low, high, w.shape).astype(w.dtype) if w.dtype.kind == "f" else w
      for w in model.get_weights()
    ]
  )
  return model


@pytest.mark.slow
def test_model_keras_loads_in_plain_keras_without_ban_tf(tmp_path):
  """Every model.keras (image with BatchNorm, LSTM with its tied softmax, CNN-LSTM):
  stock layers, loadable in a fresh Python that never imports ban_tf, and equal to
  the SavedModel's outputs. Saved as train.py saves them (Task.stock_model)."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from ban_tf import lm_models  # pylint: disable=g-import-not-at-top
  from ban_tf import tasks  # pylint: disable=g-import-not-at-top
  from ban_tf.tasks import base  # pylint: disable=g-import-not-at-top

  keras.utils.set_random_seed(3)
  rng = np.random.RandomState(8)
  vocab = ("<unk>", "<eos>") + tuple(f"w{i}{'y' * (i % 4)}" for i in range(15))
  cases = {}
  image = _perturbed(
    models.build_model(
      "preact-resnet-8", 5, SHAPE, mean=(120.0, 110.0, 100.0), std=(60.0, 50.0, 40.0)
    ),
    rng,
    0.1,
    0.5,
  )  # non-trivial BN statistics
  cases["image"] = (
    tasks.get("image"),
    image,
    rng.uniform(0, 255, (4,) + SHAPE).astype(np.float32),
    None,
  )
  spec = base.DataSpec(
    name="words",
    input_shape=(6,),
    input_dtype="int32",
    input_high=len(vocab),
    input_name="tokens",
    serving_shape=(None,),
    num_outputs=len(vocab),
    output_shape=(None, len(vocab)),
  )
  for arch in ("lstm-2-8", "cnn-lstm-small"):
    lm = _perturbed(lm_models.build_model(arch, vocab), rng, -0.3, 0.3)
    cases[arch] = (tasks.get("lm"), lm, rng.randint(0, len(vocab), (3, 7)).astype(np.int32), spec)
  for case, (task, model, x, data_spec) in cases.items():
    out = tmp_path / case
    out.mkdir()
    export.export_saved_model(
      model,
      str(out / "saved_model"),
      SHAPE if data_spec is None else None,
      spec=data_spec,
      stateful=task.stateful_model(model),
    )
    export.save_keras(task.stock_model(model), str(out / "model.keras"))
    np.save(out / "x.npy", x)
  assert models.has_fused_layers(image)  # the model being trained keeps the fused kernel
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run(
    [sys.executable, "-c", _PLAIN_KERAS] + list(cases),
    cwd=tmp_path,
    env=dict(env, TF_CPP_MIN_LOG_LEVEL="3"),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert not got["ban_tf_imported"]
  for case, (_, model, x, data_spec) in cases.items():
    g = got[case]
    assert all(k.startswith("keras.") for k in g["layers"]), (case, g["layers"])
    assert g["input"] == ("pixels" if data_spec is None else "tokens")
    want = model(x, training=False).numpy()
    assert want.std() > 0.05, case  # outputs that differ between inputs
    np.testing.assert_allclose(g["keras"], want, rtol=1e-4, atol=1e-4, err_msg=case)
    np.testing.assert_allclose(g["saved_model"], want, rtol=1e-4, atol=1e-4, err_msg=case)
  assert (
    "keras.src.layers.normalization.batch_normalization.BatchNormalization"
    in got["image"]["layers"]
  )
  assert any(k.endswith(".Embedding") for k in got["lstm-2-8"]["layers"])


def test_keras_file_round_trip(tmp_path):
  model = tiny(1, "k")
  path = str(tmp_path / "model.keras")
  export.save_keras(model, path)
  x = np.random.RandomState(6).uniform(0, 255, (3,) + SHAPE).astype(np.float32)
  again = keras.saving.load_model(path)
  np.testing.assert_allclose(again(x).numpy(), model(x).numpy(), atol=1e-6)


def test_fingerprint_detects_a_changed_model(tmp_path):
  path = str(tmp_path / "saved_model")
  export.export_saved_model(tiny(2, "a"), path, SHAPE)
  export.verify_saved_model(path)
  # Swap in another model's variables: the directory still loads but is not the same teacher.
  other = str(tmp_path / "other")
  export.export_saved_model(tiny(3, "a"), other, SHAPE)
  for name in os.listdir(os.path.join(other, "variables")):
    os.replace(os.path.join(other, "variables", name), os.path.join(path, "variables", name))
  with pytest.raises(errors.TeacherError, match="fingerprint"):
    export.verify_saved_model(path)


def test_missing_and_mismatched_teacher(tmp_path):
  with pytest.raises(errors.TeacherError, match="missing"):
    teacher_lib.Teacher.load(str(tmp_path / "nope"))
  path = str(tmp_path / "saved_model")
  export.export_saved_model(tiny(4, "b"), path, SHAPE)
  with pytest.raises(errors.TeacherError, match="5 classes but the student has 10"):
    teacher_lib.Teacher.load(path, expected_classes=10)


@pytest.mark.parametrize("with_features", [False, True])
@pytest.mark.slow
def test_load_teacher_reads_the_savedmodel_once_and_checks_that_copy(
  tmp_path, monkeypatch, with_features
):
  keras.utils.set_random_seed(8)
  model = models.build_model("wrn-10-1", 5, SHAPE, name="f")  # has a "features" layer
  path = str(tmp_path / "saved_model")
  export.export_saved_model(model, path, SHAPE)
  loads = []
  real_load = tf.saved_model.load
  monkeypatch.setattr(
    tf.saved_model, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k)
  )
  layer = teacher_lib.Teacher.load(path, expected_classes=5, with_features=with_features)
  assert loads == [path]  # fingerprint, class count, feature width and the layer: one read
  assert layer.feature_dim == (
    model.get_layer("features").output.shape[-1] if with_features else None
  )
  # The copy that teaches is the one checked: a changed fingerprint is still refused.
  fp = os.path.join(path, export.FINGERPRINT_FILE)
  data = dict(np.load(fp))
  np.savez(fp, inputs=data["inputs"], outputs=data["outputs"] + 1.0)
  with pytest.raises(errors.TeacherError, match="fingerprint"):
    teacher_lib.Teacher.load(path, expected_classes=5, with_features=with_features)


def test_load_teacher_without_the_features_endpoint_says_so(tmp_path):
  path = str(tmp_path / "saved_model")
  inputs = keras.Input(SHAPE)
  plain = keras.Model(
    inputs, keras.layers.Dense(5)(keras.layers.Flatten()(inputs))
  )  # no "features" layer
  export.export_saved_model(plain, path, SHAPE)
  with pytest.raises(errors.TeacherError, match="no 'logits_and_features' endpoint"):
    teacher_lib.Teacher.load(path, with_features=True)


def test_export_replaces_atomically(tmp_path):
  path = str(tmp_path / "saved_model")
  export.export_saved_model(tiny(5, "c"), path, SHAPE)
  first = np.load(os.path.join(path, export.FINGERPRINT_FILE))["outputs"]
  export.export_saved_model(tiny(6, "c"), path, SHAPE)
  second = export.verify_saved_model(path)
  assert not np.allclose(first, second)
  assert sorted(os.listdir(tmp_path)) == ["saved_model"]


def test_write_json_is_atomic(tmp_path):
  path = str(tmp_path / "m.json")
  export.write_json({"a": 1}, path)
  export.write_json({"a": 2}, path)
  assert export.read_json(path) == {"a": 2}
  assert os.listdir(tmp_path) == ["m.json"]


@pytest.mark.slow
def test_ensemble_is_mean_of_member_probabilities(tmp_path):
  members = [tiny(10 + i, f"g{i}") for i in range(3)]
  ens = generations.build_ensemble(members)
  x = np.random.RandomState(7).uniform(0, 255, (9,) + SHAPE).astype(np.float32)
  probs = [tf.nn.softmax(m(x, training=False)).numpy() for m in members]
  want = np.mean(probs, axis=0)
  got = ens(x).numpy()
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
  # Averaging probabilities is not averaging logits.
  assert not np.allclose(
    got, tf.nn.softmax(np.mean([m(x).numpy() for m in members], 0)).numpy(), atol=1e-4
  )
  path = str(tmp_path / "ens")
  export.export_saved_model(ens, path, SHAPE, output_name=export.PROBABILITIES)
  loaded = tf.saved_model.load(path)
  np.testing.assert_allclose(loaded.serve(tf.constant(x)).numpy(), want, atol=1e-5)
  # The same input name as a generation's; the output is named for what it is.
  assert _signature(path) == ({"pixels": [None, *SHAPE]}, {"probabilities": [None, 5]})
  out = loaded.signatures["serving_default"](pixels=tf.constant(x))
  np.testing.assert_allclose(out["probabilities"].numpy(), want, atol=1e-5)


def test_ensemble_members():
  assert generations.ensemble_members(3) == [1, 2, 3]
  assert generations.ensemble_members(2, include_teacher=True) == [0, 1, 2]


@pytest.mark.slow
def test_classify_reads_what_serving_default_names_its_output(tmp_path, capsys):
  """evaluate --images: `logits` are softmaxed and `probabilities` taken as they are, by name, not
  by guessing from the values; a signature-only SavedModel works; an unnamed output says so."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from ban_tf import evaluate  # pylint: disable=g-import-not-at-top

  pixels = np.random.RandomState(1).randint(0, 256, SHAPE).astype(np.uint8)
  png = str(tmp_path / "a.png")
  Image.fromarray(pixels).save(png)
  x = pixels[None].astype(np.float32)
  model = tiny(0, "m")
  softmax = keras.Model(model.inputs, keras.layers.Softmax()(model.outputs[0]))

  def probs(path, outputs="auto"):
    ((name, top),) = evaluate.classify(path, [png], top_k=5, outputs=outputs)
    assert name == png
    return np.array([p for _, p in sorted(top, key=lambda t: int(t[0].split("_")[1]))])

  def softmax_of(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True))[0]

  p = softmax(x).numpy()
  export.export_saved_model(model, str(tmp_path / "gen"), SHAPE)
  np.testing.assert_allclose(probs(str(tmp_path / "gen")), softmax_of(model(x).numpy()), rtol=1e-5)
  export.export_saved_model(softmax, str(tmp_path / "ens"), SHAPE, output_name=export.PROBABILITIES)
  np.testing.assert_allclose(probs(str(tmp_path / "ens")), p[0], rtol=1e-5)
  # Named logits are logits even where they look like probabilities (the old guess took them as such).
  export.export_saved_model(softmax, str(tmp_path / "odd"), SHAPE, output_name=export.LOGITS)
  np.testing.assert_allclose(probs(str(tmp_path / "odd")), softmax_of(p), rtol=1e-5)
  # Only a signature (no `serve` function), uint8 pixels, two named outputs: once an AttributeError.
  module = tf.Module()
  module.m = model
  module.f = tf.function(
    lambda image: {"logits": model(tf.cast(image, tf.float32)), "embedding": tf.zeros([1, 2])},
    input_signature=[tf.TensorSpec((None,) + SHAPE, tf.uint8, name="image")],
  )
  tf.saved_model.save(module, str(tmp_path / "module"), signatures={"serving_default": module.f})
  np.testing.assert_allclose(
    probs(str(tmp_path / "module")), softmax_of(model(x).numpy()), rtol=1e-5
  )
  # An unnamed output (keras model.export: output_0): read as before, with a note; --outputs says which.
  inputs = keras.Input(SHAPE)
  keras.Model(inputs, softmax(inputs)).export(str(tmp_path / "plain"), verbose=False)  # H, W fixed
  capsys.readouterr()
  np.testing.assert_allclose(probs(str(tmp_path / "plain")), p[0], rtol=1e-5)
  assert "serves 'output_0', named neither logits nor probabilities" in capsys.readouterr().err
  np.testing.assert_allclose(probs(str(tmp_path / "plain"), "logits"), softmax_of(p), rtol=1e-5)
  assert not capsys.readouterr().err
  with pytest.raises(
    errors.UsageError, match=r"returns \['logits'\], not probabilities: drop --outputs"
  ):
    probs(str(tmp_path / "gen"), "probabilities")
  flat = keras.Input(
    (7,)
  )  # not an image model (a language model's [T] tokens alike): once a ValueError
  keras.Model(flat, keras.layers.Dense(5)(flat)).export(str(tmp_path / "flat"), verbose=False)
  with pytest.raises(errors.UsageError, match=r"inputs of shape \(7,\) per example, not images"):
    probs(str(tmp_path / "flat"))
