"""Which arithmetic an optimizer op runs: the `numerics` argument of replay.optim.

- ``"portable"`` (default): shared/notes/numerics.md's portable recipe. FMA exactly at its sites,
  IEEE square root and division; the same bits on CPU and CUDA, on any machine.
- ``"torch"``: bit-identical to what torch.optim's default (single-tensor / foreach) path
  computes on *this* machine's CPU. That depends on torch's CPU dispatch level (FMA or not) and
  on torch's own vector square root (MKL), so it is a "same as torch here" promise, not a
  portable one, and it is refused wherever replay cannot keep it.
"""

from __future__ import annotations

import platform

import torch

# Values of the `numerics` integer in the op schemas (csrc/numerics.h holds the same table).
PORTABLE = 0
TORCH_FMA = 1
TORCH_NO_FMA = 2

NUMERICS_CHOICES = ("portable", "torch")

# torch CPU dispatch levels whose optimizer arithmetic replay reproduces (numerics.md): AVX2 and
# AVX-512 fuse at the same sites; DEFAULT fuses nowhere.
_FMA_CAPABILITIES = ("AVX2", "AVX512")
_NO_FMA_CAPABILITIES = ("DEFAULT",)


class NumericsUnavailable(RuntimeError):
    """The requested numerics cannot be delivered bit for bit here."""


def check_choice(numerics: str) -> str:
    if numerics not in NUMERICS_CHOICES:
        raise ValueError(f"numerics must be one of {NUMERICS_CHOICES}, got {numerics!r}")
    return numerics


def resolve(numerics: str, device: torch.device, *, uses_sqrt: bool) -> int:
    """The op-level numerics code for `numerics` on `device`, or NumericsUnavailable."""
    check_choice(numerics)
    if numerics == "portable":
        return PORTABLE
    if device.type != "cpu":
        raise NumericsUnavailable(
            f"numerics='torch' reproduces torch.optim's CPU arithmetic and cannot run on {device}: "
            "torch's own CUDA optimizers compute different bits. Use numerics='portable' "
            "(identical on CPU and CUDA)."
        )
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise NumericsUnavailable(
            f"numerics='torch' is only verified on x86-64 CPUs, not {platform.machine()}; "
            "use numerics='portable'."
        )
    capability = torch.backends.cpu.get_cpu_capability()
    if uses_sqrt and not torch.backends.mkl.is_available():
        raise NumericsUnavailable(
            "numerics='torch' for Adam/AdamW needs the vector square root torch uses on x86 "
            "(MKL), and this torch build has no MKL; use numerics='portable'."
        )
    if capability in _FMA_CAPABILITIES:
        return TORCH_FMA
    if capability in _NO_FMA_CAPABILITIES:
        return TORCH_NO_FMA
    raise NumericsUnavailable(
        f"numerics='torch' does not know torch's arithmetic at CPU capability {capability!r} "
        f"(known: {_FMA_CAPABILITIES + _NO_FMA_CAPABILITIES}); use numerics='portable'."
    )
