"""The exceptions that the command line reports as ``error: MESSAGE`` (exit code 2).

Kept free of imports so that catching them costs nothing: ``omniseg evaluate`` on files never
imports torch, yet handles a :class:`CheckpointError`.
"""


class DataError(ValueError):
    """A data file is missing, unreadable or inconsistent. The message names the file."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the model it describes."""
