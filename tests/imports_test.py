"""The module graph of ban_tf/: no import cycles, and the seams stay light.

Every import counts, including those inside functions: BUILD's deps mirror them
and Bazel refuses cycles, and a lazy import that closes a cycle is still one.
"""

import ast
import os
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
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
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
        return stack[stack.index(dep):] + [dep]
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
  code = ("import sys\nfrom ban_tf import config\n"
          "for task, arch in (('image', 'wrn-27-1'), ('lm', 'lstm-x')):\n"
          "  try:\n    config.Config(task=task, arch=arch, dataset='tiny_shakespeare').validate()\n"
          "  except Exception as e:\n    assert type(e).__name__ == 'UsageError', e\n"
          "heavy = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]\n"
          "assert not heavy, heavy[:5]\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr[-2000:]
