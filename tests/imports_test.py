"""The module graph of ban_tf/: no import cycles, and the seams stay light.

Every import counts, including those inside functions: BUILD's deps mirror them
and Bazel refuses cycles, and a lazy import that closes a cycle is still one.
"""

import ast
import os
import re
import subprocess
import sys

from tests.conftest import REPO

PKG = os.path.join(REPO, "ban_tf")


def _modules():
  out = {}
  for root, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].replace(os.sep, ".")
        out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
  return out


def import_graph():
  """{module: set of ban_tf modules it imports} (ban_tf itself, the package root, left out)."""
  mods = _modules()
  graph = {}
  for name, path in mods.items():
    deps = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
      if isinstance(node, ast.Import):
        deps.update(a.name for a in node.names if a.name in mods)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        for a in node.names:
          full = f"{node.module}.{a.name}"
          deps.add(full if full in mods else node.module)
    graph[name] = {d for d in deps if d in mods and d not in ("ban_tf", name)}
  return graph


def find_cycle(graph):
  """One cycle [a, b, ..., a] of `graph`, or None."""
  state = {}

  def visit(node, stack):
    state[node] = "open"
    stack.append(node)
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == "open":
        return stack[stack.index(dep) :] + [dep]
      if dep not in state:
        found = visit(dep, stack)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node, [])
      if found:
        return found
  return None


def test_find_cycle_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_ban_tf():
  graph = import_graph()
  assert {"ban_tf.results", "ban_tf.archs", "ban_tf.tasks", "ban_tf.generations"} <= set(graph)
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_leaf_modules():
  graph = import_graph()
  assert graph["ban_tf.results"] == set()  # tables and aggregation: standard library only
  assert graph["ban_tf.archs"] == set()  # the arch grammar: pure Python


def test_validation_imports_no_tensorflow():
  """Config validation (and the task seam) must not load TensorFlow or Keras: a bad flag fails at once."""
  code = (
    "import sys\nfrom ban_tf import config\n"
    "for task, arch in (('image', 'wrn-27-1'), ('lm', 'lstm-x')):\n"
    "  try:\n    config.Config(task=task, arch=arch, dataset='tiny_shakespeare').validate()\n"
    "  except Exception as e:\n    assert type(e).__name__ == 'UsageError', e\n"
    "heavy = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]\n"
    "assert not heavy, heavy[:5]\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
  )
  assert proc.returncode == 0, proc.stderr[-2000:]


LAZY = re.compile(r"#\s*lazy:\s*\S.{7,}")  # `# lazy: <why this import is not at the top>`


def unexplained_lazy_imports(source, name="<source>"):
  """["name:line: import ..."] of the imports inside a function whose lines carry no
  `# lazy: <reason>` comment (a function-local import must buy something: say what)."""
  lines = source.splitlines()
  found = []
  for fn in ast.walk(ast.parse(source, name)):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for node in ast.walk(fn):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          text = lines[node.lineno - 1 : node.end_lineno]
          if not any(LAZY.search(line) for line in text):
            found.append(f"{name}:{node.lineno}: {text[0].strip()}")
  return sorted(set(found))


def test_unexplained_lazy_imports_finds_one():
  src = (
    "import os\n"
    "def f():\n"
    "  import json\n"
    "  import numpy as np  # lazy: NumPy off the flag path\n"
    "  def g():\n"
    "    from a import b  # pylint: disable=g-import-not-at-top\n"
    "  return os, json, np\n"
  )
  assert unexplained_lazy_imports(src, "m.py") == [
    "m.py:3: import json",
    "m.py:6: from a import b  # pylint: disable=g-import-not-at-top",
  ]


def test_every_function_local_import_says_why():
  """Imports belong at the top; one inside a function must give its reason on its line.

  The reasons that hold: TensorFlow, tfds or SciPy kept off a path that must stay light
  (flag errors in main and bench, Config validation and the tasks it imports, `import
  ban_tf`), and Keras-private paths kept to the one function that needs them.
  """
  found = []
  for path in sorted(_modules().values()):
    found += unexplained_lazy_imports(open(path).read(), os.path.relpath(path, REPO))
  assert not found, "add '# lazy: <reason>' or move to the top:\n" + "\n".join(found)


def test_checks_module_is_light():
  """checks.py (what runs before TensorFlow loads) imports only the standard library and leaves."""
  assert import_graph()["ban_tf.checks"] <= {"ban_tf.errors", "ban_tf.layout"}
  heavy = {"tensorflow", "keras", "numpy", "tensorflow_datasets", "matplotlib", "scipy"}
  assert not _imported_modules(os.path.join(PKG, "checks.py")) & heavy


def test_bad_paths_and_flags_fail_without_tensorflow(tmp_path):
  """main.run's and bench's usage errors (a --teacher path, a bad flag) come before
  TensorFlow, tfds, matplotlib or SciPy load: one `error:` line in well under a second."""
  code = f"""
import sys
from absl import flags
from ban_tf import bench, errors, main
fv = flags.FlagValues()
main.define_flags(fv)
for argv in (["--teacher={tmp_path}/none"], ["--teacher={tmp_path}"], ["--epochs=0"]):
  fv.unparse_flags()
  fv(["main", "--run_dir={tmp_path}/run"] + argv)
  try:
    main.run(main.config_from_flags(fv))
    raise AssertionError(argv)
  except errors.UsageError as e:
    print(e)
bench.define_flags()
bench.FLAGS(["bench", "--steps=0"])
try:
  bench.main(["bench"])
except SystemExit as e:
  assert e.code == 2, e.code
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in ("tensorflow", "keras", "tensorflow_datasets", "matplotlib", "scipy"))
assert not heavy, heavy[:5]
"""
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout.splitlines()
  assert out[0] == f"--teacher={tmp_path}/none: no such file or directory", out
  assert out[1].startswith(f"--teacher={tmp_path}: holds neither saved_model.pb"), out
  assert out[2].startswith("--epochs=0: must be >= 1"), out
  assert "error: --steps and --reps must be >= 1" in proc.stderr, proc.stderr


def _build_libraries():
  """{target: (srcs, deps)} of BUILD's py_library rules (deps: local ":name" labels only)."""
  text = open(os.path.join(REPO, "BUILD")).read()
  out = {}
  for block in re.findall(r"py_library\((.*?)\n\)", text, re.S):
    name = re.search(r'name = "(\w+)"', block).group(1)
    srcs = re.search(r"srcs = \[(.*?)\]", block, re.S)
    deps = re.search(r"deps = \[(.*?)\]", block, re.S)
    out[name] = (
      re.findall(r'"([\w/]+\.py)"', srcs.group(1)) if srcs else [],
      set(re.findall(r'":(\w+)"', deps.group(1))) if deps else set(),
    )
  return out


def _target_of(libs):
  """{module: BUILD target whose srcs hold it} for `_build_libraries()`."""
  out = {}
  for target, (srcs, _) in libs.items():
    for src in srcs:
      module = src[:-3].replace("/", ".")
      out[module[: -len(".__init__")] if module.endswith(".__init__") else module] = target
  return out


def test_build_deps_mirror_imports():
  """Each ban_tf module's BUILD library lists the library of every ban_tf module it imports."""
  libs = _build_libraries()
  target_of = _target_of(libs)
  missing = []
  for module, deps in import_graph().items():
    if module not in target_of:
      if module.startswith("ban_tf.") and module not in (
        "ban_tf.main",
        "ban_tf.evaluate",
        "ban_tf.bench",
      ):
        missing.append(f"{module}: no py_library")
      continue
    target = target_of[module]
    for dep in deps:
      if dep in target_of and target_of[dep] != target and target_of[dep] not in libs[target][1]:
        missing.append(f"{target} ({module}) imports {dep}: add :{target_of[dep]} to its deps")
  assert not missing, "\n".join(missing)


GENERIC = (
  "generations",
  "train",
  "distiller",
  "teacher",
  "export",
  "rundir",
  "evaluate",
  "report",
  "bench",
  "results",
)


def test_generic_modules_do_not_branch_on_the_task():
  """No `== "lm"` / `== "image"` and no guessing from a tensor's rank or dtype string in generic code."""
  found = []
  for name in GENERIC:
    path = os.path.join(PKG, f"{name}.py")
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Compare):
        for const in [node.left] + list(node.comparators):
          if isinstance(const, ast.Constant) and const.value in ("lm", "image"):
            found.append(f"{name}.py:{node.lineno}: compares with {const.value!r}")
        src = ast.unparse(node)
        if "len(" in src and ".shape)" in src:
          found.append(f"{name}.py:{node.lineno}: branches on a tensor's rank: {src}")
        if "dtype" in src and "str(" in src:
          found.append(f"{name}.py:{node.lineno}: branches on a dtype: {src}")
  assert not found, "\n".join(found)


def _imported_modules(path):
  """Every module a file imports (absolute imports; `from a import b` counts a.b and a)."""
  names = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def test_build_test_targets_reach_every_module_they_import():
  """Each BUILD test's deps (transitively) hold every ban_tf and tests module its file imports.

  Bazel runs a test with only its deps' files: a missing dep fails there (after ~10
  minutes of CI) while pytest passes. This finds it in a second.
  """
  text = open(os.path.join(REPO, "BUILD")).read()
  libs = _build_libraries()
  target_of = _target_of(libs)
  missing, checked = [], 0
  for block in re.findall(r"pytest_test\((.*?)\n\)", text, re.S):
    name = re.search(r'name = "(\w+)"', block).group(1)
    srcs = re.findall(r'"([\w/]+\.py)"', re.search(r"srcs = \[(.*?)\]", block, re.S).group(1))
    deps = re.search(r"deps = \[(.*?)\]", block, re.S)
    reach, todo = set(), list(re.findall(r'":(\w+)"', deps.group(1)) if deps else [])
    while todo:
      dep = todo.pop()
      if dep not in reach:
        reach.add(dep)
        todo.extend(libs.get(dep, ((), set()))[1])
    for src in srcs:
      checked += 1
      for module in sorted(_imported_modules(os.path.join(REPO, src))):
        target = target_of.get(module)
        if target and module.split(".")[0] in ("ban_tf", "tests") and target not in reach:
          missing.append(f"{name} ({src}) imports {module}: add :{target} to its deps")
  assert checked > 20, "no pytest_test rules parsed from BUILD"
  assert not missing, "\n".join(missing)
