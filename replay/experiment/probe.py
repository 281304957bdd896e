"""Probe evaluation: what a run looks like on the probe set at the steps an experiment needs.

A `Recorder` observes a run (factual or child) after every step and keeps, at each requested
step t: the logits on the probe set (eval mode), one layer's representations if the spec names
a layer, every parameter, and the parameter update of step t (theta_t - theta_{t-1}: the
state-space lifetime compares updates of a child and its parent). Evaluations are stored as
safetensors next to a JSON file with their SHA-256; a file that fails its hash is never used.

`observable` turns two runs' evaluations into one number with replay.estimands (one
implementation of every distance).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from ..program import import_reference
from ..store.atomic import atomic_write_bytes, atomic_write_json, sha256_bytes


class ProbeError(RuntimeError):
    """The probe set or its layer cannot be used."""


def load_probe(spec: dict) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(inputs, labels, SHA-256 of both) from the probe's source, 'module:callable' or
    'path/file.py:callable' returning (inputs, labels)."""
    source, _, _ = import_reference(spec["source"])
    x, y = source()
    x, y = torch.as_tensor(x).contiguous(), torch.as_tensor(y).contiguous()
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ProbeError(f"probe {spec['source']} must return (inputs [n, ...], labels [n]) with n > 0; "
                         f"got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    h = hashlib.sha256()
    for t in (x, y):
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return x, y, h.hexdigest()


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, layer: str | None) -> dict[str, torch.Tensor]:
    """Logits on the probe (and the chosen layer's representations), in eval mode; every
    module's train/eval flag is restored afterwards, so training is not disturbed. The probe
    runs on the model's device (Program.device); the results come back to the CPU."""
    modes = [(m, m.training) for m in model.modules()]
    device = next(itertools.chain(model.parameters(), model.buffers()), x).device
    captured = {}
    handle = None
    if layer is not None:
        modules = dict(model.named_modules())
        if layer not in modules:
            raise ProbeError(f"probe layer {layer!r} is not a module of the model ({list(modules)[1:8]} ...)")
        handle = modules[layer].register_forward_hook(
            lambda m, i, o: captured.__setitem__("rep", o.detach().reshape(o.shape[0], -1)))
    try:
        model.eval()
        logits = model(x.to(device)).detach()
    finally:
        if handle is not None:
            handle.remove()
        for m, mode in modes:
            m.training = mode
    out = {"logits": logits.float().contiguous().cpu()}
    if "rep" in captured:
        out["rep"] = captured["rep"].float().contiguous().cpu()
    return out


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().to("cpu", copy=True) for name, p in model.named_parameters()}


class Recorder:
    """Collects the probe evaluations of one run at the steps it is asked for."""

    def __init__(self, x: torch.Tensor, layer: str | None, steps: set[int]):
        self.x, self.layer, self.steps = x, layer, set(steps)
        self.tensors: dict[str, torch.Tensor] = {}
        self._previous: dict[str, torch.Tensor] | None = None  # parameters one step before an evaluation

    def __call__(self, engine) -> None:
        t = engine.completed
        if t in self.steps:
            for name, value in evaluate(engine.model, self.x, self.layer).items():
                self.tensors[f"{name}@{t}"] = value
            params = _parameters(engine.model)
            for name, value in params.items():
                self.tensors[f"param:{name}@{t}"] = value
                if self._previous is not None:
                    self.tensors[f"update:{name}@{t}"] = value - self._previous[name]
        # The update of step t needs the parameters after step t - 1.
        self._previous = _parameters(engine.model) if t + 1 in self.steps else None

    def save(self, path: Path) -> None:
        from safetensors.torch import save

        data = save(self.tensors)
        atomic_write_bytes(with_suffix(path, ".safetensors"), data)
        atomic_write_json(with_suffix(path, ".json"), {"sha256": sha256_bytes(data), "steps": sorted(self.steps)})


def with_suffix(path: Path, suffix: str) -> Path:
    # Not Path.with_suffix: run names contain dots ("seed-1.forks").
    return path.parent / (path.name + suffix)


def load_evaluations(path: Path) -> dict[str, torch.Tensor] | None:
    """The evaluations of a run, or None if missing or failing their hash."""
    from safetensors.torch import load

    meta_path, data_path = with_suffix(path, ".json"), with_suffix(path, ".safetensors")
    if not (meta_path.is_file() and data_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        data = data_path.read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or sha256_bytes(data) != meta.get("sha256"):
        return None
    try:
        return load(data)
    except Exception:  # safetensors raises its own error types on malformed headers
        return None


# --------------------------------------------------------------------------- observables ----


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.int32),
                                                                     b.contiguous().view(torch.int32))


def _probabilities(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), dim=1).numpy()


def _by_prefix(evals: dict, prefix: str, step: int) -> dict[str, torch.Tensor]:
    suffix = f"@{step}"
    return {k[len(prefix):-len(suffix)]: v for k, v in evals.items() if k.startswith(prefix) and k.endswith(suffix)}


def observable(name: str, a: dict, b: dict, step: int, labels: np.ndarray) -> float:
    """The observable `name` between runs a (the factual run) and b at `step`: a distance of their
    predictive distributions on the probe, a signed metric difference metric(b) - metric(a), the
    parameter distance or 1 - linear CKA. Bitwise-equal inputs give exactly 0.0."""
    from .. import estimands as est

    if name == "param_l2":
        sa, sb = _by_prefix(a, "param:", step), _by_prefix(b, "param:", step)
        if sa.keys() == sb.keys() and all(_bitwise_equal(sa[k], sb[k]) for k in sa):
            return 0.0
        return float(est.parameter_distance(sa, sb)[0])
    if name == "cka":
        ra, rb = a.get(f"rep@{step}"), b.get(f"rep@{step}")
        if ra is None or rb is None:
            raise ProbeError(f"no layer representations at step {step}: 'cka' needs probe.layer")
        if _bitwise_equal(ra, rb):
            return 0.0
        return float(1.0 - est.linear_cka(ra.double().numpy(), rb.double().numpy()))
    la, lb = a[f"logits@{step}"], b[f"logits@{step}"]
    if _bitwise_equal(la, lb):
        return 0.0
    pa, pb = _probabilities(la), _probabilities(lb)
    if name in est.DISTANCES:
        return float(est.DISTANCES[name](pa, pb))
    if name == "accuracy_diff":
        return float(est.accuracy(pb, labels) - est.accuracy(pa, labels))
    if name == "loss_diff":
        return float(est.loss(pb, labels) - est.loss(pa, labels))
    if name == "ece":
        return float(est.expected_calibration_error(pb, labels) - est.expected_calibration_error(pa, labels))
    raise ValueError(f"unknown observable {name!r}")


def calibration_error(a: dict, step: int, labels: np.ndarray) -> float:
    """The ECE of one run's probe predictions at `step` (replay.estimands.expected_calibration_error)."""
    from .. import estimands as est

    return float(est.expected_calibration_error(_probabilities(a[f"logits@{step}"]), labels))


def displacement(a: dict, b: dict, step: int) -> np.ndarray:
    """The probe logits of run b minus run a's at `step`, float64 (the additivity measure)."""
    return (b[f"logits@{step}"].double() - a[f"logits@{step}"].double()).numpy()


def update_difference(a: dict, b: dict, step: int) -> float:
    """||update_b(step) - update_a(step)||_2 over every parameter (float64, names sorted): how
    differently two runs moved their weights in one step. NaN when an update was not recorded."""
    ua, ub = _by_prefix(a, "update:", step), _by_prefix(b, "update:", step)
    if not ua or ua.keys() != ub.keys():
        return float("nan")
    if all(_bitwise_equal(ua[k], ub[k]) for k in ua):
        return 0.0
    total = 0.0
    for k in sorted(ua):
        total += float(((ub[k].double() - ua[k].double()) ** 2).sum())
    return float(np.sqrt(total))
