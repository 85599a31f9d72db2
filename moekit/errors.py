"""The base classes for failures the CLI prints as one line, without a traceback."""


class MoekitError(ValueError):
    """Bad input; the message says what to change (the CLI exits with code 2)."""


class RunFailure(MoekitError):
    """The run itself failed after its inputs were accepted (a NaN loss, weights that did not move, a launcher
    that exited non-zero); the message says what to do next (the CLI exits with code 1)."""


class Interrupted(RunFailure):
    """Ctrl-C during a run; the message says where it stopped and how to resume (the CLI exits with 130)."""


class TrainingError(MoekitError):
    """A training run that cannot start or continue as asked; the message says what to change."""
