"""Devices: where a program's training state lives, and what a run promises across devices.

A Program names its device ("cpu", "cuda" or "cuda:N"). The engine builds the model on the CPU
under the "init" stream (so the initial weights are the same bits on every device), moves it to
the device before the optimizer, EMA and components are made, and moves every batch there.
Checkpoints are written from a host copy and restored onto the device.

What holds across devices (the portable contract): replay's own ops (optimizer steps in
numerics="portable", EMA updates, fingerprints) give the same bits on CPU and CUDA for the same
inputs. torch's GEMMs and convolutions do not, so a run is replayed on the kind of device it was
recorded on; another kind is refused unless explicitly allowed (and the allowance is recorded).

A CUDA run needs torch's deterministic mode: ``apply_deterministic_settings`` turns it on with
the cuBLAS workspace configuration it requires, turns TF32 and cudnn's autotuner off, and
``environment`` records all of it, so a replay under other settings is caught.
"""

from __future__ import annotations

import os
import re

import torch

from .store.errors import RunError

CPU, CUDA = "cpu", "cuda"
KINDS = (CPU, CUDA)

# The two values cuBLAS documents as deterministic (torch's check accepts exactly these).
CUBLAS_VARIABLE = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")

# Environment keys the engine sets from the device kind: on a device change they differ because
# the device does, and are answered by the device check, not the environment one.
DEVICE_ENVIRONMENT_KEYS = ("device", "cublas_workspace_config", "deterministic_algorithms",
                           "cudnn_deterministic", "cudnn_benchmark", "matmul_tf32", "cudnn_tf32")

_SPEC = re.compile(r"(cpu|cuda)(?::(0|[1-9][0-9]*))?")


class DeviceUnavailable(RunError):
    """The device a program or replay asks for does not exist on this machine."""


class DeterminismUnavailable(RunError):
    """torch's deterministic mode cannot be promised in this process (cuBLAS's workspace
    configuration is wrong or may have been fixed before replay could set it)."""


class NondeterministicOp(RunError):
    """An op of the step has no deterministic implementation under torch's deterministic mode."""


# ---------------------------------------------------------------------------- names ----


def check_spec(spec) -> str:
    """A valid device name ("cpu", "cuda" or "cuda:N", N a non-negative int), or ValueError."""
    match = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if match is None or (match.group(1) == CPU and match.group(2) is not None):
        raise ValueError(f"Program.device must be 'cpu', 'cuda' or 'cuda:N' (N a non-negative int), got {spec!r}")
    return spec


def kind_of(spec: str) -> str:
    return check_spec(spec).partition(":")[0]


def recorded_device(manifest: dict) -> dict:
    """The device entry of a run's manifest; a run recorded before devices existed ran on the CPU."""
    return manifest.get("device") or {"kind": CPU, "device": CPU}


def label(entry: dict) -> str:
    """A manifest device entry for a message: "cpu", or "cuda (NVIDIA H200)"."""
    return entry["kind"] + (f" ({entry['name']})" if entry.get("name") else "")


def describe(device: torch.device) -> dict:
    """The manifest's device entry: the kind, the device as torch names it and, for CUDA, the
    device's name (the GPU model)."""
    if device.type == CPU:
        return {"kind": CPU, "device": CPU}
    return {"kind": CUDA, "device": str(device), "name": torch.cuda.get_device_name(device)}


# ------------------------------------------------------------------------ resolving ----


def check_available(spec: str) -> None:
    """DeviceUnavailable if `spec` names a CUDA device this machine lacks (initializes nothing)."""
    if kind_of(spec) == CPU:
        return
    if not torch.cuda.is_available():
        build = (f"this torch ({torch.__version__}) is not a CUDA build" if torch.version.cuda is None
                 else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)")
        raise DeviceUnavailable(
            f"device {spec!r} was asked for, but {build}. Run on a machine with a GPU and a CUDA build of "
            "torch, or use device='cpu'.")
    index = spec.partition(":")[2]
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise DeviceUnavailable(f"device {spec!r} was asked for, but this machine has {count} CUDA "
                                f"device(s) (cuda:0..cuda:{count - 1})")


def prepare(spec: str) -> torch.device:
    """The torch.device a program's `spec` runs on, checked and, for CUDA, under the
    deterministic settings (applied before anything initializes cuBLAS)."""
    check_available(spec)
    if kind_of(spec) == CPU:
        return torch.device(CPU)
    apply_deterministic_settings()
    device = torch.device(spec)
    return device if device.index is not None else torch.device(CUDA, torch.cuda.current_device())


def apply_deterministic_settings() -> None:
    """What a CUDA run needs for the same bits on every replay, process-wide (like a seed):
    torch's deterministic algorithms (an op without one raises), cuBLAS's deterministic
    workspace, no TF32 in matmuls or convolutions (a hidden precision change), no cudnn
    autotuning (it picks algorithms by timing) and cudnn's deterministic algorithms."""
    value = os.environ.get(CUBLAS_VARIABLE)
    if value is None:
        # cuBLAS (and torch's workspace pool) read the variable once, when first used: set now,
        # it is only known to take effect if CUDA has not been initialized yet.
        if torch.cuda.is_initialized():
            raise DeterminismUnavailable(
                f"CUDA was initialized in this process before replay could set {CUBLAS_VARIABLE}, so cuBLAS "
                "may already use a workspace configuration that is not deterministic. Start the process with "
                f"{CUBLAS_VARIABLE}={CUBLAS_DETERMINISTIC[0]} in its environment, or create the session "
                "before any CUDA call.")
        os.environ[CUBLAS_VARIABLE] = CUBLAS_DETERMINISTIC[0]
    elif value not in CUBLAS_DETERMINISTIC:
        raise DeterminismUnavailable(
            f"{CUBLAS_VARIABLE}={value!r} is not one of cuBLAS's deterministic configurations "
            f"{CUBLAS_DETERMINISTIC}; unset it (replay then sets {CUBLAS_DETERMINISTIC[0]}) or set it to one of them.")
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def environment_entries(kind: str) -> dict:
    """The device's part of the environment fingerprint: the kind and, for CUDA, the cuBLAS
    workspace configuration (the variable means nothing to a CPU run)."""
    entries = {"device": kind}
    if kind == CUDA:
        entries["cublas_workspace_config"] = os.environ.get(CUBLAS_VARIABLE)
    return entries


# ------------------------------------------------------------------- moving state ----


def to_device(batch, device: torch.device):
    """A batch (a tensor, or tuples, lists and dicts of them; other leaves kept as they are) on
    `device`. To CUDA through pinned host memory without blocking the host: the copy is queued
    on the current stream, so the step's kernels see it complete. On the CPU, the batch itself."""
    if device.type == CPU:
        return batch
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        pin = device.type == CUDA and batch.device.type == CPU
        return (batch.pin_memory() if pin else batch).to(device, non_blocking=pin)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(x, device) for x in batch)
    if isinstance(batch, dict):
        return type(batch)((k, to_device(v, device)) for k, v in batch.items())
    return batch


def host_copy(state):
    """A deep copy of a nested state with every tensor on the CPU: a checkpoint's snapshot, made
    when it is due (later steps cannot change it) without holding a second copy on the device.
    copy.deepcopy keeps the structure and any sharing; its memo is primed with the host copies."""
    import copy

    memo: dict = {}
    keep = []

    def prime(obj) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.device.type != CPU and id(obj) not in memo:
                memo[id(obj)] = obj.detach().to(CPU)  # synchronous: the values as of now
                keep.append(obj)  # ids stay unique while the copy is made
        elif isinstance(obj, (tuple, list)):
            for x in obj:
                prime(x)
        elif isinstance(obj, dict):
            for x in obj.values():
                prime(x)

    prime(state)
    return copy.deepcopy(state, memo)


def like(state, reference):
    """`state` (loaded from a checkpoint, on the CPU) with each tensor moved to the device of the
    tensor at the same place in `reference` (the live object's own state_dict()): a component
    whose load_state_dict keeps the tensors it is given then holds them where it made them."""
    if isinstance(state, torch.Tensor):
        if isinstance(reference, torch.Tensor) and reference.device != state.device:
            return state.to(reference.device)
        return state
    if isinstance(state, (tuple, list)) and isinstance(reference, (tuple, list)) and len(state) == len(reference):
        return type(state)(like(s, r) for s, r in zip(state, reference))
    if isinstance(state, dict) and isinstance(reference, dict):
        return type(state)((k, like(v, reference.get(k))) for k, v in state.items())
    return state


# ------------------------------------------------------------------------- errors ----


def nondeterministic_op(error: RuntimeError) -> NondeterministicOp | None:
    """The NondeterministicOp a torch RuntimeError stands for (torch's alert under
    use_deterministic_algorithms names the op), or None for any other error."""
    message = str(error)
    if "use_deterministic_algorithms" not in message and "deterministic implementation" not in message:
        return None
    import traceback

    torch_root = os.path.dirname(torch.__file__) + os.sep
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith((torch_root, here))]
    where = f" (at {frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    first = message.strip().splitlines()[0] if message.strip() else message
    return NondeterministicOp(
        f"the step ran an op with no deterministic implementation{where}, and a run must replay bit for "
        f"bit. torch says: {first} Replace the op (or compute it on the CPU); replay does not turn "
        "determinism off.")
