"""Integrity of a whole run, without executing or replaying anything: every file the ledger
records is hashed and then parsed.

``check_files(run)`` returns one line per problem (empty when the run is intact):

* the manifest parses (``RunDir.open`` already refused one that does not);
* the ledger passes SQLite's quick check (on open) and every row, epoch, checkpoint record and
  event decodes;
* every recorded checkpoint folder exists, each of its files hashes to what the ledger records,
  and the verified bytes parse (safetensors, JSON, the state skeleton);
* every reference trace the ledger's events record (``record --trace-steps``) hashes to what
  they record and reads as a complete trace.
"""

from __future__ import annotations

from .checkpoint import read_checkpoint
from .errors import RunError

__all__ = ["check_files"]


def _try(problems: list[str], fn, *args):
    try:
        return fn(*args)
    except RunError as error:
        problems.append(str(error))
        return None


def check_files(run) -> list[str]:
    """Every problem with the files `run` (an open RunDir) records, one line each."""
    problems: list[str] = []
    ledger = run.ledger
    _try(problems, lambda: run.manifest)
    _try(problems, ledger.rows)
    _try(problems, ledger.epochs)
    _try(problems, ledger.events)
    checkpoints = _try(problems, ledger.checkpoints) or {}
    for step, files in sorted(checkpoints.items()):
        _try(problems, read_checkpoint, run.checkpoints_dir, step, files)
    if not problems:  # the events decode: the reference traces they name (replay.trace)
        from ..trace import check_stored_traces

        problems += check_stored_traces(run)
    return problems

