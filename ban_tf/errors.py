"""Errors that the binary turns into one-line messages and exit code 2."""

import errno


class UsageError(ValueError):
  """Bad input: the message is one line and names the fix."""


class DataError(UsageError):
  """A data set that cannot be found, prepared or used."""


class TeacherError(UsageError):
  """A teacher SavedModel that is missing, corrupt or does not fit the student."""


class RunDirError(UsageError):
  """A run directory that is locked or holds a different experiment."""


class DiskFullError(UsageError):
  """The disk filled up (ENOSPC) while writing outputs or checkpoints."""


def is_disk_full(e):
  """True for ENOSPC, raised by Python (OSError) or by TF ops (message text only)."""
  if isinstance(e, OSError) and e.errno == errno.ENOSPC:
    return True
  return "No space left on device" in str(e)


class DivergedError(RuntimeError):
  """The training loss became NaN or Inf; the last good checkpoint is kept."""
