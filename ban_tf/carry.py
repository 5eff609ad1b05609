"""What a task's models do with their recurrent state between batches: the task says it once.

`Task.carry(cfg)` returns `Reset()` (nothing carried: image models, --lm_state=reset) or
`Carry(stateful_model)` (language models with --lm_state=carry: the student and the
teacher carry their state from one batch to the next, and evaluation runs over streams).
Generic code (train, generations, evaluate, pretrained) calls these methods instead of
asking the task whether it carries state and branching on the answer.
"""

import tensorflow as tf

from ban_tf import distiller
from ban_tf import export
from ban_tf import teacher as teacher_lib


class MissingState(ValueError):
  """An ensemble member has no stateful form (`index`: its position in the members)."""

  def __init__(self, index):
    super().__init__(f"member {index} has no stateful form")
    self.index = index


class Reset:
  """Nothing is carried: every batch starts from zeros."""

  def load_teacher(self, path, strategy, **kwargs):
    """The next generation's teacher (teacher.Teacher.load), through `serve`."""
    return teacher_lib.Teacher.load(path, strategy, **kwargs)

  def check_generation_teacher(self, loaded, fail):
    """A ban_tf --teacher's SavedModel (`loaded`) serves what this mode needs; `fail(what)`
    makes the error to raise."""

  def check_foreign_teacher(self, fail):
    """A --teacher that is no ban_tf generation can teach in this mode."""

  def training_state(self, student, batch_size, steps_per_epoch, teacher):
    """The Distiller's `state=` (distiller.CarriedState) for `student`, or None."""
    del student, batch_size, steps_per_epoch, teacher
    return None

  def scoring_state(self, teacher):
    """The `state=` of a Distiller that scores `teacher` (a stateful Teacher), or None."""
    del teacher
    return None

  def ensemble(self, members, build):
    """The stateful form of an ensemble of `members` (`build` of their stateful forms), or
    None. Raises MissingState for a member without one."""
    del members, build
    return None

  def score(self, score, loaded, dataset, probabilities):
    """`score` (evaluate.score) of a loaded SavedModel over `dataset`."""
    return score(loaded, dataset, probabilities)

  def per_example(self, per_example, loaded, dataset, split, batch_size, probabilities):
    """`per_example` (Task.per_example) of a loaded SavedModel on one split, scored as this
    mode's evaluation scores it (window by window here)."""
    return per_example(
      loaded, dataset, split, batch_size, probabilities=probabilities, stateful=False
    )


class Carry(Reset):
  """The student and the teacher carry their state across consecutive batches.

  Args:
    stateful_model: model -> its stateful form ([x, state] -> [outputs, state], sharing
      its weights) or None (Task.stateful_model).
  """

  def __init__(self, stateful_model):
    self._stateful_model = stateful_model

  def load_teacher(self, path, strategy, **kwargs):
    """Through `serve_stateful`: teacher(x, state) hands on the next state too."""
    return teacher_lib.Teacher.load(path, strategy, stateful=True, **kwargs)

  def check_generation_teacher(self, loaded, fail):
    if not hasattr(loaded, export.STATEFUL):
      raise fail(
        f"serves no '{export.STATEFUL}' endpoint (exported by an older ban_tf), which "
        "--lm_state=carry needs: add --lm_state=reset"
      )

  def check_foreign_teacher(self, fail):
    raise fail(
      f"--lm_state=carry feeds the teacher its own recurrent state, through the "
      f"'{export.STATEFUL}' endpoint only a ban_tf generation serves: add --lm_state=reset (every window "
      "starts from zeros), or use a ban_tf generation"
    )

  def training_state(self, student, batch_size, steps_per_epoch, teacher):
    """Raises ValueError when the batch does not split evenly over the replicas."""
    stateful = self._stateful_model(student)
    return distiller.CarriedState(
      stateful, stateful.inputs[1].shape[-1], batch_size, steps_per_epoch, teacher=teacher
    )

  def scoring_state(self, teacher):
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return distiller.CarriedState(teacher.stateful_call, teacher.state_size, replicas, 1)

  def ensemble(self, members, build):
    views = [self._stateful_model(m) for m in members]
    if any(v is None for v in views):
      raise MissingState(views.index(None))
    return build(views)

  def score(self, score, loaded, dataset, probabilities):
    return score(loaded, dataset, probabilities, stateful=True)

  def per_example(self, per_example, loaded, dataset, split, batch_size, probabilities):
    return per_example(
      loaded, dataset, split, batch_size, probabilities=probabilities, stateful=True
    )
