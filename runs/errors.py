"""
How a run ends when it cannot go on: entry points print the message as one line (runs.cli)
and exit with the error's status. Every error names the setting, file or row at fault.
"""


class ConfigError(ValueError):
    """A mistake in the settings or the input (data, checkpoints, caches): exit status 2."""


class OutDirBusy(RuntimeError):
    """Another run holds this out_dir (one run per out_dir at a time)."""


class RunStopped(RuntimeError):
    """A run that ended early for a cause outside the settings; the message says what happened and
    what was kept. Entry points print it as one line and exit with `status`."""
    status = 3


class Interrupted(RunStopped):
    """SIGTERM or SIGINT: the run saved what it had and stopped (--resume=True continues it)."""
    status = 3


class Diverged(RunStopped):
    """A non-finite loss or gradient: the run stopped without saving the bad weights."""
    status = 4


class StorageError(RunStopped):
    """A write failed (disk full, read-only or missing storage, a path too long): names the path."""
    status = 5
