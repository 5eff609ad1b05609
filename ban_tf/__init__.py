"""ban_tf: Born-Again Networks (Furlanello et al., ICML 2018) in TensorFlow/Keras."""

import os as _os
import platform as _platform

# TensorFlow's oneDNN kernels are off by default on x86 CPUs without AVX-512/AMX (e.g.
# AVX2-only AMD EPYC), and there its own convolution kernels are ~1.6x slower for the
# nets here (docs/performance.md). TensorFlow reads this once, when it is first
# imported, so it has to be set before that; an explicit value from the user wins.
if _platform.machine().lower() in ("x86_64", "amd64"):
  _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def onednn_enabled():
  """Whether TensorFlow's oneDNN CPU kernels are on in this process (None: unknown)."""
  try:
    from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top

    return bool(_pywrap_util_port.IsMklEnabled())
  except (ImportError, AttributeError):
    return None
