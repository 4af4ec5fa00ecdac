"""Errors a user can fix. The command line prints them as one line (exit code 2); the Slicer
module shows them in a dialog. Messages say what is wrong and what to do."""


class InputError(ValueError):
    """Bad input: wrong geometry, units, echo count, file, option value..."""


class CancelledError(RuntimeError):
    """The user cancelled a long-running job; nothing was produced."""
