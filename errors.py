"""The trainer's own exceptions: each stops a run with one line for the user (train_coss.main prints it)."""


class TrainingError(RuntimeError):
    """Stops a run with one line for the user (bad input, NaN loss)."""

class CheckpointWriteError(TrainingError):
    """The disk refused a checkpoint (full, quota, file size limit): the previous checkpoint stays, and the last
    line says how to resume once there is room."""

class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`): unwinds like Ctrl-C, so the same clean-up runs."""
