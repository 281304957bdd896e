"""The environment fingerprint: everything outside the program that can change its bits.

A run records it; a replay under a different one is refused unless explicitly allowed (and the
run then records that it was allowed), because a different torch build, CPU dispatch level,
thread count or determinism setting can legitimately produce different bits. The device kind a
program runs on, and for CUDA the cuBLAS workspace configuration, are part of it (replay.device).
"""

from __future__ import annotations

import platform

import torch

# Keys that describe the machine but do not change a CPU run's bits on their own.
INFORMATIONAL = ("python", "hostname")


def environment(device_kind: str = "cpu") -> dict:
    """The current environment of a program running on a device of `device_kind`, as a
    JSON-serializable dict."""
    from . import __version__
    from .device import environment_entries

    env = {
        "replay": __version__,
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "torch_debug": bool(torch.version.debug),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        **environment_entries(device_kind),
    }
    return env


def differences(recorded: dict, current: dict) -> dict[str, tuple]:
    """{key: (recorded, current)} for every key that differs and can change bits. A run
    recorded before the environment named its device ran on the CPU."""
    recorded = {"device": "cpu", **recorded}
    keys = (set(recorded) | set(current)) - set(INFORMATIONAL)
    return {k: (recorded.get(k), current.get(k)) for k in sorted(keys) if recorded.get(k) != current.get(k)}
