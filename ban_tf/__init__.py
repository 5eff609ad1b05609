"""ban_tf: Born-Again Networks (Furlanello et al., ICML 2018) in TensorFlow/Keras."""

import importlib.util as _importlib_util
import os as _os
import platform as _platform
import sys as _sys

# TensorFlow's oneDNN kernels are off by default on x86 CPUs without AVX-512/AMX (e.g.
# AVX2-only AMD EPYC), and there its own convolution kernels are ~1.6x slower for the
# nets here (docs/performance.md). TensorFlow reads this once, when it is first
# imported, so it has to be set before that; an explicit value from the user wins.
if _platform.machine().lower() in ("x86_64", "amd64"):
  _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def onednn_enabled():
  """Whether TensorFlow's oneDNN CPU kernels are on in this process (None: unknown)."""
  try:
    from tensorflow.python.util import _pywrap_util_port  # lazy: `import ban_tf` loads no TF

    return bool(_pywrap_util_port.IsMklEnabled())
  except (ImportError, AttributeError):
    return None


class _QuietTensorFlowImport:
  """A sys.meta_path finder that runs TensorFlow's first import under console.quiet_import:
  its C++ start-up banner (about 9 lines on stderr) goes to console.startup_text instead,
  for library use (`from ban_tf import distiller` before TensorFlow is imported) as for the
  binaries. Removed after that import, and by console.import_tensorflow(verbose) when the
  user asked for every line."""

  def find_spec(self, name, path=None, target=None):
    del path, target
    if name != "tensorflow":
      return None
    uninstall_quiet_import()
    spec = _importlib_util.find_spec(name)
    if spec is not None and spec.loader is not None:
      spec.loader = _QuietLoader(spec.loader)
    return spec


class _QuietLoader:
  def __init__(self, loader):
    self._loader = loader

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    from ban_tf import console  # lazy: console (absl): only at TensorFlow's first import

    with console.quiet_import():
      self._loader.exec_module(module)

  def __getattr__(self, name):  # resources and the rest: the real loader's
    return getattr(self._loader, name)


_HOOK = _QuietTensorFlowImport()


def uninstall_quiet_import():
  """Lets TensorFlow's import print what it prints (--verbose)."""
  if _HOOK in _sys.meta_path:
    _sys.meta_path.remove(_HOOK)


if "tensorflow" not in _sys.modules:
  _sys.meta_path.insert(0, _HOOK)
