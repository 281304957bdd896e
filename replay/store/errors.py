"""The run store's exceptions.

Every error names the file (or folder) it is about, so a user looking at a damaged run knows
where to look. ``RunError`` is the base class; catch it to handle any run-store failure.
"""

from __future__ import annotations

import os

__all__ = ["CorruptRunError", "RunError", "RunExistsError", "RunLockedError"]


class RunError(Exception):
    """A run directory cannot be used as asked (missing, not a run, read-only, ...)."""


class CorruptRunError(RunError):
    """A file of a run is damaged, truncated, not what its recorded hash says, or unparseable.

    ``path`` is the file (or folder) at fault and ``reason`` says what is wrong with it; the
    message reads ``"<path>: <reason>"``.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class RunLockedError(RunError):
    """Another writer (another process, or another RunDir in this one) holds the run.

    ``pid`` is the holder's process id when the lock file says it, else None.
    """

    def __init__(self, path: str | os.PathLike, pid: int | None = None):
        self.path = os.fspath(path)
        self.pid = pid
        holder = f"process {pid}" if pid is not None else "another writer (pid unknown)"
        super().__init__(
            f"{self.path}: the run is locked for writing by {holder}; "
            "only one writer may hold a run at a time (readers need no lock)"
        )


class RunExistsError(RunError):
    """Creating a run (or a ledger) where one already exists."""
