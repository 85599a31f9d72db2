"""The one base class for user mistakes: the CLI prints these as one line, without a traceback."""


class MoekitError(ValueError):
    """Bad input; the message says what to change."""
