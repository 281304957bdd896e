"""Mixed precision as a property of the Program: autocast (bf16, fp16) and a loss scaler.

* ``Program.autocast`` ("bf16" | "fp16" | None) names the dtype torch.autocast runs the forward
  pass and the loss in; the parameters, their gradients and the optimizer stay float32.
* ``Program.grad_scaler`` (True or a dict of torch.amp.GradScaler arguments) makes the engine own
  a ``GradScaler``: its state is checkpointed and fingerprinted like any other component, and
  every step records the scale it used and whether it skipped the optimizer step.

Nothing here falls back silently: torch.autocast itself, asked for a dtype a device does not
support, only warns and runs in float32; ``autocast`` below refuses instead.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# The GradScaler arguments a program may set (``enabled`` is not one: a program without a
# scaler says grad_scaler=False).
SCALER_DEFAULTS = {"init_scale": 2.0 ** 16, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}


def check_autocast(value) -> None:
    if value is not None and (not isinstance(value, str) or value not in AUTOCAST_DTYPES):
        raise ValueError(f"Program.autocast must be None, 'bf16' or 'fp16', got {value!r}")


def scaler_arguments(value) -> dict | None:
    """The GradScaler arguments Program.grad_scaler asks for (defaults filled in), or None for
    no scaler. True means torch's defaults; a dict may set any of SCALER_DEFAULTS' keys."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(SCALER_DEFAULTS)
    if not isinstance(value, Mapping):
        raise ValueError(f"Program.grad_scaler must be True, False or a dict of GradScaler arguments, got {value!r}")
    unknown = set(value) - set(SCALER_DEFAULTS)
    if unknown:
        raise ValueError(f"Program.grad_scaler: unknown argument(s) {sorted(unknown)}; it takes {sorted(SCALER_DEFAULTS)}")
    args = {**SCALER_DEFAULTS, **value}
    for key in ("init_scale", "growth_factor", "backoff_factor"):
        x = args[key]
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
            raise ValueError(f"Program.grad_scaler: {key} must be a positive finite number, got {x!r}")
        args[key] = float(x)
    if not args["growth_factor"] > 1:
        raise ValueError(f"Program.grad_scaler: growth_factor must exceed 1, got {args['growth_factor']!r}")
    if not args["backoff_factor"] < 1:
        raise ValueError(f"Program.grad_scaler: backoff_factor must be below 1, got {args['backoff_factor']!r}")
    interval = args["growth_interval"]
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"Program.grad_scaler: growth_interval must be a positive int, got {interval!r}")
    # The scale lives in a float32 tensor: a value float32 cannot hold would be rounded on the
    # first step, and the "initial scale" a reset_scaler fork restores would not be the one used.
    if float32(args["init_scale"]) != args["init_scale"]:
        raise ValueError(f"Program.grad_scaler: init_scale {args['init_scale']!r} is not a float32 value")
    return args


def float32(x: float) -> float:
    """x rounded to float32 (round to nearest even), as a Python float."""
    return torch.tensor(x, dtype=torch.float32).item()


def device_type(model: torch.nn.Module) -> str:
    """The device type the model lives on (its first parameter's or buffer's; "cpu" for a model
    without tensors): the one autocast and the scaler act on."""
    for tensor in model.parameters():
        return tensor.device.type
    for tensor in model.buffers():
        return tensor.device.type
    return "cpu"


@contextlib.contextmanager
def autocast(device: str, name: str | None):
    """torch.autocast(device, dtype of `name`), or nothing for None; refuses (RuntimeError) if
    autocast does not run with that dtype on that device, where torch would only warn."""
    if name is None:
        yield
        return
    dtype = AUTOCAST_DTYPES[name]
    if not torch.amp.is_autocast_available(device):
        raise RuntimeError(f"Program.autocast={name!r}: torch has no autocast for device type {device!r}; "
                           "train in float32 (autocast=None) on this device")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        context = torch.autocast(device_type=device, dtype=dtype)
        context.__enter__()
    try:
        if not (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == dtype):
            said = "; ".join(str(w.message) for w in caught) or "autocast is not enabled"
            raise RuntimeError(f"Program.autocast={name!r}: torch does not autocast to {dtype} on {device} "
                               f"({said}); choose another dtype or autocast=None")
        yield
    finally:
        context.__exit__(None, None, None)


class GradScaler(torch.amp.GradScaler):
    """torch.amp.GradScaler that remembers whether a step() in the current engine step found
    inf or NaN gradients (and so did not run the optimizer), for the ledger."""

    def __init__(self, device: str, arguments: Mapping):
        super().__init__(device, **arguments)
        self.arguments = dict(arguments)
        self.skipped = False

    def step(self, optimizer, *args, **kwargs):
        result = super().step(optimizer, *args, **kwargs)
        # torch's own step() decides with this per-optimizer record (filled by unscale_, kept
        # until update()); it has no public way to say whether it skipped the optimizer.
        found = self._found_inf_per_device(optimizer)
        if any(v.item() for v in found.values()):
            self.skipped = True
        return result

    def reset(self, scale: float, growth_tracker: int = 0) -> None:
        """Set the scale (rounded to float32, as the scaler holds it) and the growth tracker."""
        state = self.state_dict()
        self.load_state_dict({**state, "scale": float32(scale), "_growth_tracker": growth_tracker})

    def fingerprints(self, json_hash) -> dict[str, int]:
        """One fingerprint per entry of state_dict() (floats hash by their exact repr)."""
        return {key: json_hash(value) for key, value in sorted(self.state_dict().items())}


def check_scaler_state(state, arguments: Mapping) -> dict:
    """A checkpoint's scaler state, checked before it is loaded into a live scaler."""
    if not isinstance(state, Mapping):
        raise ValueError("the checkpoint holds no GradScaler state, but the program has Program.grad_scaler set")
    expected = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
    if set(state) != expected:
        raise ValueError(f"checkpoint scaler state has keys {sorted(state)}, expected {sorted(expected)}")
    for key in ("growth_factor", "backoff_factor", "growth_interval"):
        if state[key] != arguments[key]:
            raise ValueError(f"checkpoint scaler {key} is {state[key]!r}, the program's is {arguments[key]!r}")
    return dict(state)
