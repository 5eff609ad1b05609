"""Issue 23's bad inputs: one `error:` line (exit 2) before any work, never a traceback.

Image files are generated here with Pillow (damaged, greyscale BMPs, a decompression
bomb's header, EXIF-rotated JPEGs); seeds, non-finite numbers and flags of the other
task through Config.validate; a PTB file that is not UTF-8; ban_tf.report's writes on
fabricated run directories; the binaries' --help into a closed pipe. No training.
"""

import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from ban_tf import config
from ban_tf import data
from ban_tf import errors
from ban_tf import evaluate
from ban_tf import report
from ban_tf import text_data
from tests.conftest import REPO
from tests.data_sources_test import _all
from tests.data_sources_test import write_folder
from tests.report_test import _fake_run

# ---- image folders ---------------------------------------------------------------


def _folder(tmp_path, **kw):
  root = str(tmp_path / "pets")
  write_folder(root, counts=(("train", 4), ("test", 2)), **kw)
  return root


def _truncate(path, keep=0.5):
  with open(path, "rb") as f:
    raw = f.read()
  with open(path, "wb") as f:
    f.write(raw[: int(len(raw) * keep)])


@pytest.mark.parametrize("split", ["train", "test"])
def test_truncated_png_is_named_before_any_pipeline_runs(tmp_path, split):
  """Was: the headers passed, then InvalidArgumentError 'Invalid PNG data' from the channel
  statistics (train/) or after a whole generation trained (test/)."""
  root = _folder(tmp_path)
  bad = os.path.join(root, split, "dog", "001.png")
  _truncate(bad)
  with pytest.raises(errors.DataError, match=r"001\.png: a damaged PNG .*remove or replace it"):
    data.Dataset(None, image_folder=root)


def test_truncated_jpeg_is_named(tmp_path):
  root = _folder(tmp_path, ext=".jpg", size=(48, 64))
  _truncate(os.path.join(root, "test", "emu", "000.jpg"), keep=0.8)
  with pytest.raises(errors.DataError, match=r"000\.jpg: a truncated JPEG"):
    data.Dataset(None, image_folder=root)


def test_jpeg_with_data_after_its_end_is_accepted(tmp_path):
  """A phone's motion photo: a video appended after the JPEG's end-of-image marker; TensorFlow
  decodes the JPEG (the check must not take it for a truncated one)."""
  root = _folder(tmp_path, ext=".jpg", size=(48, 64))
  with open(os.path.join(root, "test", "emu", "000.jpg"), "ab") as f:
    f.write(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
  ds = data.Dataset(None, image_folder=root)
  x, _ = _all(ds.test(6))
  assert x.shape == (6, 48, 64, 3)


@pytest.mark.parametrize("mode", ["L", "1", "P"])
def test_greyscale_and_palette_bmps_decode_as_pillow_reads_them(tmp_path, mode):
  """TensorFlow's decode_bmp refuses 8- and 1-bit BMPs ('channels must be 0, 3 or 4 for
  BMP'); Pillow decodes every BMP of the folder, to the pixels Pillow reads."""
  root = str(tmp_path / "bmp")
  rng = np.random.RandomState(0)
  want = {}
  for split, n in (("train", 3), ("test", 2)):
    for c in ("a", "b"):
      os.makedirs(os.path.join(root, split, c))
      for i in range(n):
        if mode == "P":  # an 8-bit colour palette
          im = Image.fromarray(rng.randint(0, 256, (6, 5, 3)).astype(np.uint8)).quantize(16)
        else:
          im = Image.fromarray(rng.randint(0, 256, (6, 5)).astype(np.uint8), "L").convert(mode)
        path = os.path.join(root, split, c, f"{i}.bmp")
        im.save(path)
        want[(split, c, i)] = np.asarray(Image.open(path).convert("L" if mode != "P" else "RGB"))
  ds = data.Dataset(None, image_folder=root)
  x, y = _all(ds.test(4))
  expect = np.stack([want[("test", c, i)] for c in ("a", "b") for i in range(2)])
  if mode != "P":  # grey folder: one channel
    assert ds.info.image_shape == (6, 5, 1)
    expect = expect[..., None]
  np.testing.assert_array_equal(x, expect.astype(np.float32))
  np.testing.assert_array_equal(y, [0, 0, 1, 1])


def _bomb_png(path, side=30000):
  """A small valid PNG whose IHDR declares side x side pixels (CRC fixed up)."""
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
  with open(path, "rb") as f:
    raw = bytearray(f.read())
  ihdr = 8 + 8  # signature, then length + type of the first chunk
  raw[ihdr : ihdr + 8] = struct.pack(">II", side, side)
  raw[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr - 4 : ihdr + 13])))
  with open(path, "wb") as f:
    f.write(raw)


def test_decompression_bomb_is_one_line_in_folders_and_evaluate(tmp_path):
  root = _folder(tmp_path)
  bomb = os.path.join(root, "train", "cat", "002.png")
  _bomb_png(bomb)
  with pytest.raises(errors.DataError, match=r"002\.png: too large to decode safely"):
    data.Dataset(None, image_folder=root)
  with pytest.raises(errors.UsageError, match=r"002\.png: too large to decode safely"):
    evaluate.load_image(bomb, (8, 8, 3))


def _rotated_jpeg(path, pixels, orientation):
  im = Image.fromarray(pixels)
  exif = Image.Exif()
  exif[0x0112] = orientation
  im.save(path, quality=100, exif=exif.tobytes())


def test_exif_rotated_jpeg_is_read_upright_with_a_warning(tmp_path, caplog):
  """A phone stores the sensor's pixels and an EXIF orientation; TensorFlow's decoder
  ignores the tag (the image was trained sideways). Read upright, as Pillow's
  exif_transpose (a viewer) shows it; sizes are the upright ones."""
  root = str(tmp_path / "phone")
  rng = np.random.RandomState(1)
  for split in ("train", "test"):
    for c in ("a", "b"):
      os.makedirs(os.path.join(root, split, c))
      for i in range(2):  # upright 8 x 16 (H x W) photos
        Image.fromarray(rng.randint(0, 256, (8, 16, 3)).astype(np.uint8)).save(
          os.path.join(root, split, c, f"{i}.jpg"), quality=100
        )
  sensor = rng.randint(0, 256, (16, 8, 3)).astype(np.uint8)  # stored 16 x 8, orientation 6
  _rotated_jpeg(os.path.join(root, "test", "a", "0.jpg"), sensor, 6)
  with caplog.at_level("WARNING"):
    ds = data.Dataset(None, image_folder=root)
  assert ds.info.image_shape == (8, 16, 3)  # one size: the rotated file counts as 8 x 16
  assert "1 JPEG file(s) carry an EXIF orientation" in caplog.text
  x, _ = _all(ds.test(4))
  with Image.open(os.path.join(root, "test", "a", "0.jpg")) as im:
    stored = np.asarray(im)
  np.testing.assert_array_equal(x[0], np.rot90(stored, k=-1).astype(np.float32))  # 6: 90° CW


def test_image_size_that_squashes_says_so(tmp_path, caplog):
  root = _folder(tmp_path, size=(10, 12))
  with caplog.at_level("WARNING"):
    data.Dataset(None, image_folder=root, image_size=(8, 8))
  assert "without keeping its proportions: 18 of 18 images" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):
    data.Dataset(None, image_folder=root, image_size=(5, 6))  # same 5:6 ratio
  assert "proportions" not in caplog.text


def test_one_class_folder_is_refused(tmp_path):
  """Was: trained to 0% test error without a word (every prediction is the one class)."""
  root = str(tmp_path / "solo")
  for split in ("train", "test"):
    os.makedirs(os.path.join(root, split, "cat"))
    for i in range(2):
      Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
        os.path.join(root, split, "cat", f"{i}.png")
      )
  with pytest.raises(errors.DataError, match=r"train/ has one class \(cat\)"):
    data.Dataset(None, image_folder=root)


# ---- Config.validate: seeds, numbers, flags of the other task -------------------------


@pytest.mark.parametrize(
  "kw,message",
  [
    (dict(seed=-1), "--seed=-1: must be in [0, 4294967295]"),
    (dict(seed=99999999999), "--seed=99999999999: must be in [0, 4294967295]"),
    (dict(student_seed=-5, gens=1), "--student_seed=-5: must be in"),
    (dict(seed=2**32 - 2, gens=2), "gives generation 2 the seed 4294967296"),
    (dict(seed=2**32 - 150, seeds=3, gens=0), "generation 0 of base seed 4294967346"),
    (dict(student_seed=2**32 - 1, gens=2), "gives generation 2 the seed 4294967296"),
    (dict(seed=2**32 - 2, gens=0, baseline=True), None),  # needs students: its own error
    (dict(temperature=float("inf")), "--temperature=inf: must be a finite number"),
    (dict(temperature=float("nan")), "--temperature=nan: must be a finite number"),
    (dict(lr=float("inf")), "--lr=inf: must be a finite number"),
    (dict(lr_milestones=(0.5, float("nan"))), "--lr_milestones=nan"),
    (dict(lr_milestones=(0.5, 0.5)), "strictly increasing fractions of the epochs in (0, 1)"),
    (dict(lr_milestones=(0.5, 1.0)), "strictly increasing"),
    (dict(bptt=10), "--bptt applies to language models only: add --task=lm"),
    (dict(vocab_size=100, lm_state="reset"), "--vocab_size, --lm_state apply to language"),
    (dict(gens=0, ensemble_include_teacher=True), "--ensemble_include_teacher"),
  ],
)
def test_meaningless_values_are_refused_by_validate(kw, message):
  cfg = config.Config(arch="tiny", **kw)
  with pytest.raises(errors.UsageError) as e:
    cfg.validate()
  assert "\n" not in str(e.value)
  if message:
    assert message in str(e.value)


def test_the_largest_valid_seeds_pass_and_lm_flags_pass_on_lm():
  config.Config(arch="tiny", seed=2**32 - 4, gens=3).validate()
  config.Config(arch="tiny", seed=2**32 - 4, student_seed=0, gens=3, baseline=True).validate()
  config.Config(task="lm", arch="lstm-1-8", dataset="tiny_shakespeare", bptt=10).validate()
  assert set(config.Config(seed=5, gens=2, seeds=2, student_seed=50).all_seeds()) == {
    5,
    50,
    51,
    105,
    150,
    151,
  }


def test_refused_seed_writes_nothing(monkeypatch, capsys, tmp_path):
  from tests.conftest import run_main  # pylint: disable=g-import-not-at-top

  run_dir = tmp_path / "run"
  code, _, err = run_main(
    monkeypatch,
    capsys,
    ["--arch=tiny", "--gens=1", "--student_seed=-5", f"--run_dir={run_dir}", "--verbose=0"],
  )
  assert code == 2 and err.strip().splitlines()[-1].startswith("error: --student_seed=-5")
  assert not run_dir.exists()


def test_lm_reset_shuffle_takes_large_seeds():
  """RandomState takes seeds < 2**32; seed * 1000003 + epoch passed it from seed 4295 on."""
  ds = text_data.TextDataset.__new__(text_data.TextDataset)
  ds.state = "reset"
  ds.ids = {"train": np.arange(200, dtype=np.int32)}
  ds.info = text_data.TextInfo("x", 200, (5,), (), 5, 200, 0, 0)
  small, _ = ds.train(4, seed=3, epochs=1)
  big, steps = ds.train(4, seed=2**32 - 1, epochs=2)
  assert steps == 9 and len(list(big)) == 18 and len(list(small)) == 9


# ---- language-model text -------------------------------------------------------------


def _ptb(tmp_path, train_bytes):
  d = tmp_path / "ptb"
  d.mkdir()
  (d / "ptb.train.txt").write_bytes(train_bytes)
  (d / "ptb.valid.txt").write_bytes(b"a b\n")
  (d / "ptb.test.txt").write_bytes(b"b a\n")
  return str(d)


def test_latin1_byte_in_ptb_is_named_with_its_offset(tmp_path):
  d = _ptb(tmp_path, b"the cat\nna\xefve dog\n")
  with pytest.raises(errors.DataError) as e:
    text_data.TextDataset("ptb", ptb_dir=d)
  assert "ptb.train.txt: byte 10 (0xef) is not UTF-8" in str(e.value)


def test_utf8_bom_is_not_a_word(tmp_path):
  d = _ptb(tmp_path, "\ufeffthe cat\r\nthe dog\rna\u00efve\n".encode("utf-8"))
  ds = text_data.TextDataset("ptb", ptb_dir=d)
  assert "\ufeffthe" not in ds.info.vocab and "\ufeff" not in ds.info.vocab
  assert text_data.read_lines_ptb(os.path.join(d, "ptb.train.txt")) == [
    ["the", "cat", "<eos>"],
    ["the", "dog", "<eos>"],
    ["na\u00efve", "<eos>"],
  ]


# ---- ban_tf.report's own writes ------------------------------------------------------


def _no_tmp(path):
  return [n for n in os.listdir(path) if n.startswith(".tmp-")]


def test_report_results_md_replaced_by_a_directory(tmp_path):
  run = _fake_run(str(tmp_path / "run"), 0, [0.1, 0.09, 0.08, 0.07])
  os.makedirs(os.path.join(run, "results.md"))
  with pytest.raises(errors.UsageError, match=r"cannot write .*results\.md \(IsADirectoryError"):
    report.write_report(run, hparams=False)
  assert not _no_tmp(run)


def test_report_non_number_in_results_json(tmp_path):
  run = _fake_run(str(tmp_path / "run"), 0, [0.1, 0.09, 0.08, 0.07])
  with open(os.path.join(run, "results.json")) as f:
    res = json.load(f)
  res["generations"][1]["test_error"] = "abc"
  with open(os.path.join(run, "results.json"), "w") as f:
    json.dump(res, f)
  with pytest.raises(errors.UsageError, match="BAN-1's test_error is 'abc', not a number"):
    report.write_report(run, hparams=False)


@pytest.fixture
def read_only_run(tmp_path):
  run = _fake_run(str(tmp_path / "run"), 0, [0.1, 0.09, 0.08, 0.07])
  mounted = (
    subprocess.run(
      f"mount --bind {run} {run} && mount -o remount,ro,bind {run}",
      shell=True,
      capture_output=True,
    ).returncode
    == 0
  )
  if not mounted:
    pytest.skip("cannot bind-mount a directory read-only (needs root)")
  yield run
  subprocess.run(["umount", run], check=True)


def test_report_on_a_read_only_run_directory(read_only_run, tmp_path):
  with pytest.raises(errors.UsageError, match=r"cannot write .*run \(OSError: Read-only"):
    report.write_report(read_only_run)
  with pytest.raises(errors.UsageError, match=r"tb/Teacher \(OSError: Read-only"):
    report.write_report([read_only_run], out_dir=str(tmp_path / "out"))  # hparams go to the run
  out = report.write_report([read_only_run], out_dir=str(tmp_path / "out"), hparams=False)
  assert os.path.exists(out["png"])


@pytest.mark.slow
def test_report_cli_prints_one_error_line(tmp_path):
  run = _fake_run(str(tmp_path / "run"), 0, [0.1, 0.09, 0.08, 0.07])
  os.makedirs(os.path.join(run, "results.md"))
  proc = subprocess.run(
    [sys.executable, "-m", "ban_tf.report", f"--run_dir={run}", "--nohparams"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert [l for l in proc.stderr.splitlines() if l.startswith("error: ")] == [
    l for l in proc.stderr.splitlines() if "results.md" in l
  ]


# ---- --help into a closed pipe -------------------------------------------------------


@pytest.mark.parametrize("module", ["main", "evaluate", "report"])
@pytest.mark.slow
def test_help_into_a_closed_pipe_ends_quietly(module):
  """`python -m ban_tf.main --help | head`: the reader has gone before the help is written."""
  read, write = os.pipe()
  os.close(read)  # no reader: the first write fails with EPIPE
  proc = subprocess.run(
    [sys.executable, "-m", f"ban_tf.{module}", "--help"],
    cwd=REPO,
    stdout=write,
    stderr=subprocess.PIPE,
    text=True,
    timeout=300,
  )
  os.close(write)
  assert "BrokenPipeError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
  assert proc.returncode == 141


def test_one_epoch_report_has_whole_epoch_ticks(tmp_path):
  """Was: ticks 0.945 ... 1.065 under a 1-epoch run's single point."""
  run = report.load_run(_fake_run(str(tmp_path / "run"), 0, [0.3, 0.2, 0.1, 0.05], epochs=1))
  shown = {}
  report.plot([run], str(tmp_path / "r.png"), legends=shown)
  assert shown["epoch_ticks"] == [1.0]
  run = report.load_run(_fake_run(str(tmp_path / "run3"), 0, [0.3, 0.2, 0.1, 0.05], epochs=3))
  report.plot([run], str(tmp_path / "r3.png"), legends=shown)
  assert shown["epoch_ticks"] == [1.0, 2.0, 3.0]


# ---- papercuts: console, log.txt, the weak-teacher warning, wording ----------------------


def test_near_chance_spares_a_weak_teacher_and_flags_a_broken_one():
  from ban_tf import pretrained  # pylint: disable=g-import-not-at-top

  # Was: accuracy < 1.5 x chance, which flagged 30% on 4 classes (a correct, weak teacher).
  assert not pretrained.near_chance(0.30, 4, 1000)
  assert not pretrained.near_chance(0.30, 4, 10000)
  assert pretrained.near_chance(0.26, 4, 1000)  # what wrong pixel scaling gives
  assert pretrained.near_chance(0.105, 10, 10000)
  assert pretrained.near_chance(0.30, 4, 50)  # too few examples to tell: said so
  assert not pretrained.near_chance(0.9, 2, 100)


def test_console_warnings_read_like_its_errors():
  """Was absl's `W1207 04:12:00.123 pretrained.py:622] ...` beside the console's own lines."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top

  from absl import logging  # pylint: disable=g-import-not-at-top

  from ban_tf import console  # pylint: disable=g-import-not-at-top

  handler = logging.get_absl_handler().python_handler
  record = std_logging.LogRecord("absl", std_logging.WARNING, "x.py", 1, "a %s", ("b",), None)
  before = handler.format(record)
  with console.quiet_logs("auto"):
    assert handler.format(record) == "warning: a b"
  assert handler.format(record) == before != "warning: a b"  # restored
  with console.quiet_logs("1"):  # --verbose: absl's full format, every line
    assert handler.format(record) == before


def test_log_file_header_is_the_start_and_import_banner_is_kept_once(tmp_path, monkeypatch):
  from ban_tf import console  # pylint: disable=g-import-not-at-top

  banner = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1796615963.303525   24624 port.cc:153] oneDNN custom operations are on.\n"
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1796615978.307690   24624 port.cc:153] oneDNN custom operations are on.\n"
  )
  assert console.startup_lines(banner).splitlines() == banner.splitlines()[:2]
  monkeypatch.setattr(console, "_STARTED", 1796615900.0)  # earlier than any record below
  with console.log_file(str(tmp_path)):
    pass
  head = open(tmp_path / console.LOG_FILE).readline()
  import datetime  # pylint: disable=g-import-not-at-top

  assert head.startswith(f"==== {datetime.datetime.fromtimestamp(1796615900).isoformat()} pid ")


def test_counts_have_their_grammar():
  from ban_tf import results  # pylint: disable=g-import-not-at-top
  from ban_tf.tasks import lm  # pylint: disable=g-import-not-at-top

  assert (results.plural(1, "epoch"), results.plural(3, "epoch")) == ("1 epoch", "3 epochs")
  cfg = config.Config(epochs=1)
  assert "1 epoch per generation" in results.title(cfg, lm.TEST_PERPLEXITY)
  assert lm.TEST_PERPLEXITY.text.startswith("test perplexity")  # the split is named
  assert lm.VAL_PERPLEXITY.text.startswith("val perplexity")


def test_vocab_and_labels_are_read_from_inside_or_beside_the_saved_model(tmp_path):
  """New runs write vocab.txt inside saved_model/ (as labels.txt); runs before wrote it beside."""
  from ban_tf.tasks import lm  # pylint: disable=g-import-not-at-top

  new, old = tmp_path / "new" / "gen_0", tmp_path / "old" / "gen_0"
  (new / "saved_model").mkdir(parents=True)
  (old / "saved_model").mkdir(parents=True)
  (new / "saved_model" / "vocab.txt").write_text("<unk>\n<eos>\nthe\n")
  (old / "vocab.txt").write_text("<unk>\n<eos>\na\n")
  assert lm.read_vocab(str(new)) == ("<unk>", "<eos>", "the")
  assert lm.read_vocab(str(new / "saved_model")) == ("<unk>", "<eos>", "the")
  assert lm.read_vocab(str(old)) == ("<unk>", "<eos>", "a")
  (old / "labels.txt").write_text("cat\ndog\n")
  assert evaluate.class_names(str(old / "saved_model"), 2) == ["cat", "dog"]


@pytest.mark.slow
def test_tensorflow_start_up_noise_stays_off_the_console_unless_verbose(tmp_path):
  """Was ~9 lines of TensorFlow's C++ banner on stderr for the Python API and ban_tf.evaluate
  (the training binary already kept it for log.txt); --verbose still shows it."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  banner = "All log messages before absl::InitializeLog()"

  def stderr(args):
    proc = subprocess.run(
      [sys.executable] + args,
      cwd=str(tmp_path),
      env=dict(env, PYTHONPATH=REPO),
      capture_output=True,
      text=True,
      timeout=300,
    )
    return proc.stderr

  api = stderr(["-c", "from ban_tf import distiller; import keras; print(keras.__version__)"])
  assert banner not in api and "I0000" not in api, api
  bad_data = [
    "-m",
    "ban_tf.main",
    "--arch=tiny",
    "--data_dir=/no/such/dir",
    f"--run_dir={tmp_path}/r",
  ]
  quiet = stderr(bad_data)
  assert quiet.strip().splitlines() == [
    "error: --data_dir=/no/such/dir does not exist: point it at a prepared TFDS directory, "
    "or create it to let tfds download into it"
  ], quiet
  assert banner in stderr(bad_data + ["--verbose=1"])
