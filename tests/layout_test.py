"""The run directory has one owner: its file names are spelled in layout.py only, and its
layout is described once (rundir.py's docstring), matching those names."""

import ast
import os
import re

from ban_tf import layout
from ban_tf import rundir
from tests.conftest import REPO

PKG = os.path.join(REPO, "ban_tf")

# The file and directory names of a run directory (layout.py's constants).
NAMES = {
  v
  for k, v in vars(layout).items()
  if k.isupper() and isinstance(v, str) and k not in ("GEN", "ENSEMBLE", "SEED", "BASELINE")
}
PREFIXES = ("gen_", "ensemble_", "seed_")

# (module, literal): why it may stay there.
ALLOWED = {
  ("checks", "saved_model"): "a --teacher kind (metrics.json source.kind), not a path",
  ("evaluate", "saved_model"): "the --saved_model flag's name",
}


def _literals(path):
  """(line, text) of every string constant and f-string head in `path`, docstrings left out."""
  tree = ast.parse(open(path).read(), path)
  docstrings = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        docstrings.add(id(body[0].value))
  out = []
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ):
      out.append((node.lineno, node.value))
  return out


def _offending(module, text):
  """Why `text` spells a run directory's file name outside the layer, or None."""
  if (module, text) in ALLOWED:
    return None
  if text in NAMES:
    return f"spells {text!r}"
  if any(text.startswith(p) for p in PREFIXES) and (text.endswith("_") or text[-1:].isdigit()):
    return f"builds a numbered directory name {text!r}"
  if re.fullmatch(r"(gen|ensemble|seed)_\*", text):
    return f"globs numbered directories {text!r}"
  return None


def test_file_names_are_spelled_only_in_the_layer():
  found = []
  for root, _, files in os.walk(PKG):
    for f in sorted(files):
      if not f.endswith(".py"):
        continue
      module = os.path.relpath(os.path.join(root, f), PKG)[:-3].replace(os.sep, ".")
      if module in ("layout",):
        continue
      for line, text in _literals(os.path.join(root, f)):
        why = _offending(module, text)
        if why:
          found.append(
            f"ban_tf/{module}.py:{line}: {why}: use layout.py's name (or rundir's handle)"
          )
  assert not found, "\n".join(found)


def test_the_check_finds_what_it_looks_for(tmp_path):
  """The scanner itself: a literal path join and an f-string directory name are caught."""
  src = tmp_path / "m.py"
  src.write_text(
    '"""Doc mentions metrics.json: fine."""\n'
    "import os\n"
    'p = os.path.join("run", "metrics.json")\n'
    'q = f"gen_{3}"\n'
  )
  texts = [t for _, t in _literals(str(src))]
  assert [t for t in texts if _offending("m", t)] == ["metrics.json", "gen_"]


def test_rundir_docstring_lists_every_name():
  """The layout's one description (rundir.py) names every file layout.py defines, and no other."""
  doc = rundir.__doc__
  tree = doc[doc.index("Layout of a run directory") :]
  for name in NAMES | {layout.numbered(layout.GEN, "k"), layout.numbered(layout.ENSEMBLE, "k")}:
    if name == layout.SAVED_MODEL_PB:  # TensorFlow's file inside saved_model/
      continue
    assert re.search(rf"(^|\s){re.escape(name)}(/|\s|$)", tree, re.M), f"{name} not in the layout"
  listed = set(re.findall(r"^  ([^\s/]+)", tree, re.M))
  described = {layout.LOCK, layout.CONFIG, layout.MANIFEST, layout.RESULTS_JSON, layout.RESULTS_MD}
  described |= {"log.txt", "report.png", "gen_k", "ensemble_k", layout.BASELINE, "seed_S"}
  assert listed == described | {"tb"}, listed ^ (described | {"tb"})
