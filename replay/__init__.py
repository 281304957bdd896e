"""replay: a deterministic replay engine for PyTorch training.

Kernels and fingerprints: replay.optim (SGD, Adam, AdamW), replay.EMA, replay.fingerprint,
replay.fingerprints, replay.state_fingerprint. Runs: replay.Program describes a training
program; replay.RecordSession records it into a run directory; replay.ReplaySession verifies
any stretch of a run bit for bit.

Everything is imported on first use: ``import replay`` loads neither torch nor the compiled
extension (replay._C, loaded by replay._ops when a kernel or fingerprint is first needed), so
the command line, ``replay.estimands`` and the run store start without them.
"""

__version__ = "0.1.0"

import importlib

_LAZY = {
    "optim": (".optim", None),
    "NumericsUnavailable": ("._numerics", "NumericsUnavailable"),
    "EMA": (".ema", "EMA"),
    "fingerprint": (".fingerprinting", "fingerprint"),
    "fingerprints": (".fingerprinting", "fingerprints"),
    "state_fingerprint": (".fingerprinting", "state_fingerprint"),
    "Program": (".program", "Program"),
    "StepContext": (".program", "StepContext"),
    "RecordSession": (".session", "RecordSession"),
    "ReplaySession": (".session", "ReplaySession"),
}


def __getattr__(name):
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name, __name__)
        value = module if attribute is None else getattr(module, attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'replay' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["EMA", "NumericsUnavailable", "Program", "RecordSession", "ReplaySession", "StepContext",
           "fingerprint", "fingerprints", "optim", "state_fingerprint"]
