"""replay: a deterministic replay engine for PyTorch training.

Kernels and fingerprints: replay.optim (SGD, Adam, AdamW), replay.EMA, replay.fingerprint,
replay.fingerprints, replay.state_fingerprint. Runs: replay.Program describes a training
program; replay.RecordSession records it into a run directory; replay.ReplaySession verifies
any stretch of a run bit for bit.
"""

__version__ = "0.1.0"

from . import optim
from ._numerics import NumericsUnavailable
from .ema import EMA
from .fingerprinting import fingerprint, fingerprints, state_fingerprint
from .program import Program, StepContext

_SESSIONS = ("RecordSession", "ReplaySession")


def __getattr__(name):
    # Sessions pull in the run store (SQLite, safetensors): imported on first use.
    if name in _SESSIONS:
        from . import session

        return getattr(session, name)
    raise AttributeError(f"module 'replay' has no attribute {name!r}")


__all__ = ["EMA", "NumericsUnavailable", "Program", "RecordSession", "ReplaySession", "StepContext",
           "fingerprint", "fingerprints", "optim", "state_fingerprint"]
