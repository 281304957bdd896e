"""The run store: a run directory of JSON, SQLite and safetensors files, never pickle.

::

    RUN/manifest.json | ledger.sqlite | checkpoints/step-XXXXXXXX/ | .lock

* ``errors``     RunError, CorruptRunError, RunLockedError, RunExistsError
* ``atomic``     crash-safe writes (temp file, fsync, rename, fsync folder) and SHA-256
* ``encode``     nested training state <-> JSON skeleton + flat tensors (imports torch: loaded on
                 first use)
* ``floats``     exact text for floats, NaN payloads included
* ``checkpoint`` atomic checkpoint folders, verified against recorded hashes before parsing
* ``ledger``     the per-step SQLite ledger (WAL, synchronous=FULL)
* ``run``        RunDir: the directory, its manifest and the single-writer lock
* ``schema``     the validation layer: manifest, checkpoint state, lineage, experiment specs
                 (SchemaError, NewerFormatError)
* ``paths``      nothing inside a run is followed through a symbolic link (SymlinkError)
"""

from .atomic import atomic_write_bytes, atomic_write_json, fsync_dir, sha256_bytes, sha256_file
from .checkpoint import checkpoint_steps, read_checkpoint, remove_stale_temporaries, write_checkpoint
from .floats import float_from_text, float_to_text
from .errors import CorruptRunError, RunError, RunExistsError, RunLockedError
from .ledger import Ledger, StepRow
from .paths import SymlinkError
from .run import CHECKPOINTS, LEDGER, LOCK, MANIFEST, RunDir
from .schema import NewerFormatError, SchemaError



def __getattr__(name: str):
    # flatten_state / unflatten_state need torch; importing the store (to list, inspect or
    # verify the files of a run) does not, so they load on first use.
    if name in ("flatten_state", "unflatten_state"):
        from . import encode

        return getattr(encode, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CHECKPOINTS",
    "LEDGER",
    "LOCK",
    "MANIFEST",
    "CorruptRunError",
    "Ledger",
    "NewerFormatError",
    "RunDir",
    "RunError",
    "RunExistsError",
    "RunLockedError",
    "SchemaError",
    "StepRow",
    "SymlinkError",
    "atomic_write_bytes",
    "atomic_write_json",
    "checkpoint_steps",
    "flatten_state",
    "float_from_text",
    "float_to_text",
    "fsync_dir",
    "read_checkpoint",
    "remove_stale_temporaries",
    "sha256_bytes",
    "sha256_file",
    "unflatten_state",
    "write_checkpoint",
]
