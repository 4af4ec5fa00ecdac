"""Errors a user can fix (one line, exit code 2 on the command line) and cancellation."""


class RNSTInputError(ValueError):
    """Bad input: missing file, mismatched geometry, empty slice range, bad option value."""


class RNSTCancelled(RuntimeError):
    """The user cancelled the run; nothing was written."""
