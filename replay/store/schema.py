"""One validation layer for everything replay reads from disk or from a user: the run manifest,
checkpoint state, lineage and experiment specs.

Two stages, both plain Python and both free of recursion over the data (a hostile file cannot
cause a RecursionError or a MemoryError here):

* ``load_json(data, path, ...)``: bytes -> JSON value, within limits. The size is checked before
  decoding, the nesting depth is measured by a linear scan *before* ``json.loads`` runs, and
  afterwards every node is visited once (iteratively) to refuse non-finite floats (``1e400``
  parses as ``inf``), over-long strings, too many nodes and duplicate object keys.
* ``check(value, shape, path)``: a value against a *shape* (``Int(lo, hi)``, ``Str(...)``,
  ``Obj(...)``, ``List(...)`` ...): types are matched exactly (``True`` is not an int, ``"30"``
  is not an int, ``1e308`` is not an int), ranges, required keys, sizes. The shapes are data
  defined in this module, so their depth is bounded by the code, not by the input.

Every refusal is a ``SchemaError``: one line naming the file and the key path, e.g.
``RUN/manifest.json: key 'checkpoints.counts[2]': must be an int in [0, 1000000000], found '30'``.
``SchemaError`` is a ``CorruptRunError`` (so a ``RunError``) and a ``ValueError``.

Format versions. A file written by a newer replay than this one is refused with
``NewerFormatError`` ("written by a newer replay (format N); this is format M: upgrade"):
the manifest's ``version`` (the manifest layout) and ``store_version`` (the run layout), a
checkpoint's ``format`` (the checkpoint state layout) and the ledger's version.
"""

from __future__ import annotations

import json
import math
import re

from .errors import CorruptRunError, RunError

__all__ = [
    "CHECKPOINT_FORMAT",
    "LIMITS",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "MAX_STEPS",
    "NewerFormatError",
    "SchemaError",
    "check",
    "check_checkpoint_state",
    "check_json_limits",
    "check_lineage",
    "check_manifest",
    "check_version",
    "load_json",
]

MANIFEST_FORMAT = "replay.run"
MANIFEST_VERSION = 1
"""The manifest layout this replay writes and reads (replay.driver writes the same numbers)."""
CHECKPOINT_FORMAT = 1
"""The checkpoint state layout (``state.json``'s ``format``; replay.engine writes it)."""

MAX_STEPS = 10**9
"""The most steps a run may have (a step count beyond it is refused, never allocated for)."""
MAX_CHECKPOINTS = 100_000
"""The most checkpoints a schedule may name."""
MAX_SEED = 2**64 - 1
MAX_LINEAGE_DEPTH = 1000
MAX_PERTURBATIONS = 10_000


class Limits:
    """Size limits for one kind of JSON file."""

    def __init__(self, max_bytes: int, max_depth: int, max_nodes: int, max_string: int):
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.max_nodes = max_nodes
        self.max_string = max_string


LIMITS = {
    "manifest": Limits(max_bytes=64 << 20, max_depth=32, max_nodes=10_000_000, max_string=64 << 10),
    "checkpoint": Limits(max_bytes=256 << 20, max_depth=64, max_nodes=20_000_000, max_string=1 << 20),
    "spec": Limits(max_bytes=1 << 20, max_depth=32, max_nodes=200_000, max_string=64 << 10),
    "record": Limits(max_bytes=16 << 20, max_depth=32, max_nodes=2_000_000, max_string=64 << 10),
}


class SchemaError(CorruptRunError, ValueError):
    """A file (or a user's spec) is not what its schema says: one line naming the file and the
    key path. ``key`` is the key path (``"checkpoints.counts[2]"``, ``""`` for the whole)."""

    def __init__(self, path, key: str, reason: str):
        self.key = key
        self.detail = reason
        super().__init__(path, f"key '{key}': {reason}" if key else reason)


class NewerFormatError(RunError):
    """A file written by a newer replay, in a format this one does not read."""

    def __init__(self, path, what: str, found: int, supported: int):
        self.path = str(path)
        self.found = found
        self.supported = supported
        super().__init__(
            f"{self.path}: {what} written by a newer replay (format {found}); "
            f"this is format {supported}: upgrade replay to read it"
        )


def _show(value, limit: int = 60) -> str:
    try:
        text = repr(value)
    except Exception:  # pragma: no cover - every JSON value has a repr
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


# --------------------------------------------------------------------- bytes -> JSON ----

_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_KEEP_BRACKETS = bytes(range(256)).translate(None, b"[]{}")


def _nesting_depth(data: bytes) -> int:
    """The deepest bracket nesting of JSON text (strings skipped), without parsing it."""
    brackets = _STRING_RE.sub(b"", data).translate(None, _KEEP_BRACKETS)
    depth = deepest = 0
    for b in brackets:
        if b in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
        else:
            depth -= 1
    return deepest


def _no_constants(name):
    raise ValueError(f"non-standard JSON constant {name}")


def _unique_keys(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError(f"duplicate key {_show(k)}")
        obj[k] = v
    return obj


def load_json(data: bytes, path, kind: str = "manifest"):
    """Parse ``data`` (the bytes of ``path``) as strict JSON within ``LIMITS[kind]``.

    SchemaError (one line naming ``path``) when it is too large, too deep, not UTF-8, not JSON,
    has duplicate keys, non-finite numbers, over-long strings or too many values."""
    limits = LIMITS[kind]
    if len(data) > limits.max_bytes:
        raise SchemaError(path, "", f"{len(data)} bytes, more than the {limits.max_bytes} a {kind} may hold")
    depth = _nesting_depth(data)
    if depth > limits.max_depth:
        raise SchemaError(path, "", f"nested {depth} levels deep, more than the {limits.max_depth} a {kind} may be")
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_no_constants, object_pairs_hook=_unique_keys)
    except RecursionError:  # pragma: no cover - the depth scan comes first
        raise SchemaError(path, "", "nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, huge ints, duplicate keys
        raise SchemaError(path, "", f"not valid JSON: {str(e)[:200]}") from None
    check_json_limits(obj, path, kind)
    return obj


def check_json_limits(obj, path, kind: str = "manifest") -> None:
    """Visit every node of a JSON-like value once (no recursion): only dict (str keys), list,
    str, int, finite float, bool and None; strings within the limit; no more nodes than allowed;
    nesting within the limit. SchemaError naming the key path otherwise."""
    limits = LIMITS[kind]
    stack = [(obj, "", 0)]
    nodes = 0
    while stack:
        value, key, depth = stack.pop()
        nodes += 1
        if nodes > limits.max_nodes:
            raise SchemaError(path, "", f"more than {limits.max_nodes} values, more than a {kind} may hold")
        if depth > limits.max_depth:
            raise SchemaError(path, key, f"nested more than {limits.max_depth} levels deep")
        t = type(value)
        if value is None or t is bool or t is int:
            if t is int and value.bit_length() > 256:
                raise SchemaError(path, key, f"an integer of {value.bit_length()} bits is out of any range")
            continue
        if t is float:
            if not math.isfinite(value):
                raise SchemaError(path, key, f"a non-finite number ({value!r}) is not allowed")
            continue
        if t is str:
            if len(value) > limits.max_string:
                raise SchemaError(path, key, f"a string of {len(value)} characters, more than {limits.max_string}")
            continue
        if t is dict:
            for k, v in value.items():
                if type(k) is not str:
                    raise SchemaError(path, key, f"object keys must be strings, found {_show(k)}")
                if len(k) > limits.max_string:
                    raise SchemaError(path, key, f"an object key of {len(k)} characters")
                stack.append((v, f"{key}.{k}" if key else k, depth + 1))
            continue
        if t is list or t is tuple:
            for i, v in enumerate(value):
                stack.append((v, f"{key}[{i}]", depth + 1))
            continue
        raise SchemaError(path, key, f"a {t.__name__} is not a JSON value")


# ------------------------------------------------------------------------- shapes ----


class Shape:
    def check(self, value, path, key: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "a bool", int: "an int", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


class Int(Shape):
    def __init__(self, lo: int | None = None, hi: int | None = None):
        self.lo, self.hi = lo, hi

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"an int in [{self.lo}, {self.hi}]"
        if self.lo is not None:
            return f"an int >= {self.lo}"
        return "an int"

    def check(self, value, path, key):
        if type(value) is not int or (self.lo is not None and value < self.lo) or (
            self.hi is not None and value > self.hi
        ):
            raise SchemaError(path, key, f"must be {self.describe()}, found {_show(value)}")


class Num(Shape):
    def __init__(self, lo: float | None = None, hi: float | None = None):
        self.lo, self.hi = lo, hi

    def check(self, value, path, key):
        ok = type(value) in (int, float) and math.isfinite(value)
        if ok and ((self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi)):
            ok = False
        if not ok:
            raise SchemaError(path, key, f"must be a finite number in [{self.lo}, {self.hi}], found {_show(value)}")


class Bool(Shape):
    def check(self, value, path, key):
        if type(value) is not bool:
            raise SchemaError(path, key, f"must be true or false, found {_show(value)}")


class Str(Shape):
    def __init__(self, max_len: int = 4096, pattern: str | None = None, choices=None, nonempty: bool = False):
        self.max_len = max_len
        self.pattern = re.compile(pattern) if pattern else None
        self.choices = tuple(choices) if choices else None
        self.nonempty = nonempty

    def check(self, value, path, key):
        if type(value) is not str:
            raise SchemaError(path, key, f"must be a string, found {_kind(value)} {_show(value)}")
        if len(value) > self.max_len:
            raise SchemaError(path, key, f"a string of {len(value)} characters, more than {self.max_len}")
        if self.nonempty and not value:
            raise SchemaError(path, key, "must not be empty")
        if self.choices is not None and value not in self.choices:
            raise SchemaError(path, key, f"must be one of {list(self.choices)}, found {_show(value)}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise SchemaError(path, key, f"must match {self.pattern.pattern}, found {_show(value)}")


class Null(Shape):
    def check(self, value, path, key):
        if value is not None:
            raise SchemaError(path, key, f"must be null, found {_show(value)}")


class Any(Shape):
    """Anything JSON (the limits of ``check_json_limits`` still apply)."""

    def check(self, value, path, key):
        pass


class Optional(Shape):
    def __init__(self, inner: Shape):
        self.inner = inner

    def check(self, value, path, key):
        if value is not None:
            self.inner.check(value, path, key)


class List(Shape):
    def __init__(self, item: Shape, max_len: int = 10_000, min_len: int = 0, length: int | None = None):
        self.item, self.max_len, self.min_len, self.length = item, max_len, min_len, length

    def check(self, value, path, key):
        if type(value) is not list:
            raise SchemaError(path, key, f"must be a list, found {_kind(value)} {_show(value)}")
        if self.length is not None and len(value) != self.length:
            raise SchemaError(path, key, f"must hold exactly {self.length} values, found {len(value)}")
        if len(value) > self.max_len:
            raise SchemaError(path, key, f"a list of {len(value)} values, more than {self.max_len}")
        if len(value) < self.min_len:
            raise SchemaError(path, key, f"must hold at least {self.min_len} values, found {len(value)}")
        for i, v in enumerate(value):
            self.item.check(v, path, f"{key}[{i}]")


class Map(Shape):
    """An object with free keys (``Str`` shape) and values of one shape."""

    def __init__(self, value: Shape, key: Shape | None = None, max_len: int = 10_000):
        self.value, self.key, self.max_len = value, key or Str(256), max_len

    def check(self, value, path, key):
        if type(value) is not dict:
            raise SchemaError(path, key, f"must be an object, found {_kind(value)} {_show(value)}")
        if len(value) > self.max_len:
            raise SchemaError(path, key, f"an object of {len(value)} keys, more than {self.max_len}")
        for k, v in value.items():
            sub = f"{key}.{k}" if key else str(k)
            self.key.check(k, path, sub)
            self.value.check(v, path, sub)


class Obj(Shape):
    """An object with named fields: ``required`` and ``optional`` map names to shapes; other
    keys are allowed (checked by the JSON limits only) unless ``closed``."""

    def __init__(self, required: dict, optional: dict | None = None, closed: bool = False):
        self.required, self.optional, self.closed = required, optional or {}, closed

    def check(self, value, path, key):
        if type(value) is not dict:
            raise SchemaError(path, key, f"must be an object, found {_kind(value)} {_show(value)}")
        for name, shape in self.required.items():
            sub = f"{key}.{name}" if key else name
            if name not in value:
                raise SchemaError(path, sub, "missing (a required key)")
            shape.check(value[name], path, sub)
        for name, shape in self.optional.items():
            if name in value:
                shape.check(value[name], path, f"{key}.{name}" if key else name)
        if self.closed:
            unknown = sorted(set(value) - set(self.required) - set(self.optional))
            if unknown:
                raise SchemaError(path, key, f"unknown keys {unknown[:5]}")


def check(value, shape: Shape, path, key: str = "") -> None:
    """Check ``value`` against ``shape``; SchemaError naming ``path`` and the key path."""
    shape.check(value, path, key)


def check_version(found, supported: int, path, key: str, what: str) -> None:
    """``found`` must be an int in [1, supported]: a newer one is NewerFormatError."""
    Int(1, None).check(found, path, key)
    if found > supported:
        raise NewerFormatError(path, what, found, supported)


# ------------------------------------------------------------------------- manifest --

HEX64 = Str(64, pattern=r"[0-9a-f]{64}")
RUN_ID = Str(64, pattern=r"[0-9a-f]{1,64}")
STEP = Int(0, MAX_STEPS)
SEED = Int(0, MAX_SEED)
NAME = Str(256, nonempty=True)

RNG = Obj(
    required={
        "version": Int(1, 1000),
        "run_seed": SEED,
        "streams": List(NAME, max_len=1000, min_len=1),
    },
    optional={
        "derivation": Str(64 << 10),
        "reseeds": Map(List(List(Any(), max_len=2, min_len=2), max_len=MAX_PERTURBATIONS), max_len=1000),
    },
)

PERTURBATION = Obj(
    required={"name": NAME},
    optional={"start": STEP, "window": Int(0, MAX_STEPS)},
)

LINEAGE = Obj(
    required={
        "parent_id": Optional(RUN_ID),
        "parent_path": Str(4096),
        "parent_digest": Str(256),
        "fork_step": STEP,
        "window": List(STEP, length=2),
        "perturbations": List(PERTURBATION, max_len=MAX_PERTURBATIONS),
        "depth": Int(1, MAX_LINEAGE_DEPTH),
    },
)

MANIFEST = Obj(
    required={
        "format": Str(64, choices=(MANIFEST_FORMAT,)),
        "version": Int(1, None),
        "store_version": Int(1, None),
        "status": Str(32, choices=("incomplete", "complete")),
        "run_id": RUN_ID,
        "first_step": STEP,
        "steps": STEP,
        "seed": SEED,
        "program": Obj(
            required={"reference": Str(4096, nonempty=True), "sha256": HEX64},
            optional={"path": Optional(Str(4096)), "description": Optional(Str(64 << 10))},
        ),
        "batch_size": Int(1, 10**8),
        "dataset_size": Int(0, 10**12),
        "environment": Map(Any(), max_len=1000),
        "rng": RNG,
        "order": Obj(required={"name": NAME}, optional={"dataset_size": Int(0, 10**12), "batch_size": Int(1, 10**8)}),
        "checkpoints": Obj(
            required={
                "every": Int(1, MAX_STEPS),
                "log_spaced": Bool(),
                "counts": List(STEP, max_len=MAX_CHECKPOINTS),
            }
        ),
        "optimizer": Obj(required={"class": Str(1024)}, optional={"replay_kernel": Bool(), "numerics": Any()}),
    },
    optional={"rng_effective": RNG, "lineage": LINEAGE, "dropped_examples": List(Int(0, 10**12), max_len=10**6),
              "trace_steps": List(STEP, max_len=MAX_CHECKPOINTS), "accumulate": Int(2, 10**8),
              # Absent in runs recorded before devices existed: those ran on the CPU.
              "device": Obj(required={"kind": Str(16, choices=("cpu", "cuda")),
                                      "device": Str(32, pattern=r"cpu|cuda(:(0|[1-9][0-9]{0,5}))?")},
                            optional={"name": Str(256)}, closed=True),
              # A run of several processes (replay.distributed); absent for one process.
              "distributed": Obj(required={"world_size": Int(1, 1 << 16), "backend": Str(16, choices=("gloo",))},
                                 optional={"gradients": Str(256), "buffers": Str(256)}, closed=True)},
)


def check_lineage(lineage, path, key: str = "lineage") -> None:
    """A fork's lineage record (see ``replay.driver.child_manifest``)."""
    LINEAGE.check(lineage, path, key)
    lo, hi = lineage["window"]
    if lo > hi:
        raise SchemaError(path, f"{key}.window", f"must be [start, end] with start <= end, found {lineage['window']}")


def check_manifest(manifest, path, store_version: int) -> None:
    """A run manifest: versions first (a newer one is NewerFormatError, whatever else it holds),
    then every key, then the relations between keys (first_step <= steps, the checkpoint
    schedule within the run and not larger than MAX_CHECKPOINTS, a fork's step)."""
    if type(manifest) is not dict:
        raise SchemaError(path, "", f"must be a JSON object, found {_kind(manifest)}")
    for key, supported, what in (("store_version", store_version, "run layout"),
                                 ("version", MANIFEST_VERSION, "manifest")):
        if key not in manifest:
            raise SchemaError(path, key, "missing (a required key)")
        check_version(manifest[key], supported, path, key, what)
    MANIFEST.check(manifest, path, "")
    first, steps = manifest["first_step"], manifest["steps"]
    if first > steps:
        raise SchemaError(path, "first_step", f"{first} is after the last step {steps}")
    if "lineage" in manifest:
        check_lineage(manifest["lineage"], path)
        if manifest["lineage"]["fork_step"] != first:
            raise SchemaError(path, "lineage.fork_step",
                              f"{manifest['lineage']['fork_step']} is not the run's first step {first}")
    elif first != 0:
        raise SchemaError(path, "first_step", f"a run that is not a fork starts at step 0, found {first}")
    device = manifest.get("device")
    if device is not None and device["device"].partition(":")[0] != device["kind"]:
        raise SchemaError(path, "device.device", f"{device['device']!r} is not a {device['kind']} device")
    schedule = manifest["checkpoints"]
    if steps // schedule["every"] > MAX_CHECKPOINTS:
        raise SchemaError(path, "checkpoints.every",
                          f"every {schedule['every']} of {steps} steps is more than {MAX_CHECKPOINTS} checkpoints")
    counts = schedule["counts"]
    for i, c in enumerate(counts):
        if not first <= c <= steps:
            raise SchemaError(path, f"checkpoints.counts[{i}]", f"{c} lies outside the run's steps {first}..{steps}")
        if i and c <= counts[i - 1]:
            raise SchemaError(path, f"checkpoints.counts[{i}]", "counts must increase")


# ----------------------------------------------------------------------- checkpoints --

CHECKPOINT_STATE = Obj(
    required={
        "format": Int(1, None),
        "completed_steps": STEP,
        "model": Any(),
        "optimizer": Any(),
        "components": Any(),
    },
    optional={"scheduler": Any(), "ema": Any(),
              # torch.amp.GradScaler.state_dict() (Program.grad_scaler), loaded into a live scaler
              "scaler": Obj(required={"scale": Num(0, None), "growth_factor": Num(1, None),
                                      "backoff_factor": Num(0, 1), "growth_interval": Int(1, None),
                                      "_growth_tracker": Int(0, None)}, closed=True)},
)


def check_checkpoint_state(skeleton, path, step: int) -> None:
    """The JSON part of an engine checkpoint (``state.json``, before its tensors are put back):
    its format (a newer one is NewerFormatError), the keys the engine needs, and that it holds
    the state after exactly ``step`` completed steps (the step of its folder name and of its
    ledger record). A state that is not an engine checkpoint (no ``format`` and no
    ``completed_steps`` key: the store's own tests write such states) is left to the caller."""
    if type(skeleton) is not dict or not ({"format", "completed_steps"} & set(skeleton)):
        return
    if "format" not in skeleton:
        raise SchemaError(path, "format", "missing (a required key)")
    check_version(skeleton["format"], CHECKPOINT_FORMAT, path, "format", "checkpoint")
    CHECKPOINT_STATE.check(skeleton, path, "")
    if type(skeleton["components"]) is not dict:
        raise SchemaError(path, "components", f"must be an object, found {_kind(skeleton['components'])}")
    if skeleton["completed_steps"] != step:
        raise SchemaError(path, "completed_steps",
                          f"the checkpoint of step {step} (its folder and its ledger record) says "
                          f"{skeleton['completed_steps']}")
