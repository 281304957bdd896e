"""Exact text for Python floats, bit for bit, NaN payloads included (the ledger's losses and
metrics, the non-finite floats of a checkpoint's JSON skeleton).

Kept apart from ``encode`` (which needs torch) so that reading a ledger does not import torch:
``replay --help``, ``inspect`` and ``tree`` start in a fraction of torch's import time.
"""

from __future__ import annotations

import math
import struct

__all__ = ["float_from_text", "float_to_text"]

_CANONICAL_NAN_BITS = 0x7FF8000000000000


def _float_bits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def float_to_text(x: float) -> str:
    """Exact text for a float: ``repr`` when finite (``"-0.0"``, ``"0.1"``, ``"1e+300"``),
    ``"inf"``, ``"-inf"``, ``"nan"`` for the canonical quiet NaN, ``"nan:0x<16 hex>"`` for any
    other NaN bit pattern. ``float_from_text`` inverts it bit for bit."""
    if math.isfinite(x):
        return repr(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    bits = _float_bits(x)
    return "nan" if bits == _CANONICAL_NAN_BITS else f"nan:0x{bits:016x}"


def float_from_text(text: str) -> float:
    """Inverse of ``float_to_text``. Raises ValueError for any text it would not have written."""
    if not isinstance(text, str):
        raise ValueError(f"float text must be a string, got {type(text).__name__}")
    if text.startswith("nan:0x") and len(text) == 22:
        try:
            bits = int(text[6:], 16)
        except ValueError:
            bits = -1
        if bits >= 0:
            x = struct.unpack("<d", struct.pack("<Q", bits))[0]
            if math.isnan(x) and float_to_text(x) == text:
                return x
    else:
        try:
            x = float(text)
        except ValueError:
            x = None
        if x is not None and float_to_text(x) == text:
            return x
    raise ValueError(f"not a float as the run store writes it: {text!r}")
