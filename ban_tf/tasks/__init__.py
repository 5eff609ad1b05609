"""The task seam: what differs between image classification and language modelling.

The generic modules (generations, train, distiller, export, rundir, evaluate,
report, bench) never test `cfg.task` and never guess a task from a tensor's shape
or dtype: they ask the task object, `tasks.get(cfg.task)`, which answers through
the `Task` methods (tasks/base.py) and a `DataSpec`. A third task (say, audio
classification) is one new module here that subclasses `Task`, plus its entry in
`TASKS`.

Importing this package is cheap (no TensorFlow): config validation uses it. Each
task imports its data and model modules inside the methods that need them.
"""

from ban_tf import errors
from ban_tf.tasks import image
from ban_tf.tasks import lm
from ban_tf.tasks.base import DataSpec  # pylint: disable=unused-import  # noqa: F401
from ban_tf.tasks.base import Task

TASKS = {"image": image.ImageClassification(), "lm": lm.LanguageModel()}


def get(name: str) -> Task:
  """The task called `name`; raises errors.UsageError naming the known ones."""
  if name not in TASKS:
    raise errors.UsageError(f"--task={name!r}: use one of {', '.join(TASKS)}")
  return TASKS[name]
