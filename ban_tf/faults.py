"""Test-only fault injection, driven by the BAN_TF_FAULT environment variable.

The reliability tests (tests/resume_test.py, tests/errors_test.py) use it to kill
or break a run at an exact point; with the variable unset every hook is a no-op.

  BAN_TF_FAULT=<fault>@<where>     e.g. kill_during_export@gen_1

<where> names the place: `gen_K` (a generation directory) or `gen_K/epoch_E`
(the end of epoch E, counted from 1); an empty <where> matches everywhere.
Faults (docs/reliability.md):
  kill_during_export        SIGKILL after a SavedModel's temporary directory is
                            complete, before it is renamed into place.
  kill_between_generations  SIGKILL right after generation K is DONE.
  kill_after_checkpoint     SIGKILL right after epoch E's checkpoint is saved
                            (where: gen_K/epoch_E): a run killed mid-generation.
  nan                       Treat the training loss of epoch E as NaN.
  sigint, sigterm           Send this process SIGINT (Ctrl-C) or SIGTERM right after
                            epoch E's checkpoint is saved and its console line printed.
  enospc                    Raise OSError(ENOSPC) where epoch E's checkpoint is saved.
  fill_disk                 Fill the file system of the run directory where epoch E's
                            checkpoint is saved (refused on file systems over 64 MiB,
                            so it only ever fills a small test tmpfs).
"""

import errno
import os
import signal

ENV = "BAN_TF_FAULT"
_FILL_LIMIT = 64 << 20


def _active(fault, where):
  spec = os.environ.get(ENV, "")
  if not spec:
    return False
  name, _, place = spec.partition("@")
  return name == fault and place in ("", where)


def kill_if(fault, where):
  """SIGKILLs this process (no cleanup, no atexit) if `fault@where` is set."""
  if _active(fault, where):
    os.kill(os.getpid(), signal.SIGKILL)


def signal_if(where):
  """Sends this process SIGINT (`sigint`) or SIGTERM (`sigterm`) if set for `where`."""
  for fault, signum in (("sigint", signal.SIGINT), ("sigterm", signal.SIGTERM)):
    if _active(fault, where):
      os.kill(os.getpid(), signum)


def nan_if(where):
  return _active("nan", where)


def disk_fault_if(where, directory):
  """Raises ENOSPC (`enospc`) or really fills `directory`'s disk (`fill_disk`)."""
  if _active("enospc", where):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), directory)
  if _active("fill_disk", where):
    st = os.statvfs(directory)
    if st.f_blocks * st.f_frsize > _FILL_LIMIT:
      raise RuntimeError(
        f"{ENV}=fill_disk refuses to fill {directory}: it is not a small test file system"
      )
    with open(os.path.join(directory, "FILLER"), "wb", buffering=0) as f:
      for chunk in (1 << 16, 1 << 12, 1):  # down to the last free byte
        try:
          while f.write(b"\0" * chunk):
            pass
        except OSError:
          pass
