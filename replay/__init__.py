"""replay: a deterministic replay engine for PyTorch training.

This release holds the foundation: bit-exact fused optimizer and EMA kernels that return
fingerprints of what they wrote, and fingerprints of tensors and states.
"""

from . import optim
from ._numerics import NumericsUnavailable
from .ema import EMA
from .fingerprinting import fingerprint, fingerprints, state_fingerprint

__version__ = "0.1.0"

__all__ = ["EMA", "NumericsUnavailable", "fingerprint", "fingerprints", "optim", "state_fingerprint"]
