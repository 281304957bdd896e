"""The RNG contract: named random streams whose seeds are counter-derived, never stateful.

Every random draw in a recorded run comes from a named stream ("init", "order", "augment",
"dropout", plus the streams a program declares). A stream's seed at a step is a pure function of
(run seed, stream name, step)::

    key  = stream                        (no re-seed in effect at this step)
         | f"{stream}#{salt}"            (the latest re-seed of this stream with from_step <= step)
    seed = int.from_bytes(sha256(f"replay-rng-v1|{run_seed}|{key}|{step}".encode("utf-8"))
                          .digest()[:8], "little") & (2**63 - 1)

so replaying step t needs no stored generator state: a torch.Generator for any (stream, step) is
rebuilt from the contract alone, in any order, in any process. Seeds are masked to 63 bits so
they are accepted by torch.Generator.manual_seed / torch.manual_seed (which take up to 2**64 - 1)
and also fit a signed 64-bit integer (SQLite, int64 tensors, numpy's default int).

Re-seeding (a fork's "re-seed one named stream from step T") changes only that stream's key, and
only from T on; every other stream, and this stream before T, keeps its seeds and so its draws.
A stream may be re-seeded again later (a fork of a fork): each re-seed is a (from_step, salt)
segment, and the segment with the largest from_step <= step is in effect.

Stream names must be non-empty and contain neither "|" (the field separator) nor "#" (reserved
for re-seed keys, so no declared stream can collide with another stream's re-seeded key).
"""

from __future__ import annotations

import hashlib
import numbers
import random
from collections.abc import Iterable, Mapping

import numpy as np
import torch

__all__ = [
    "BUILTIN_STREAMS",
    "CONTRACT_VERSION",
    "DERIVATION",
    "RngContract",
    "stream_seed",
]

CONTRACT_VERSION = 1
BUILTIN_STREAMS: tuple[str, ...] = ("init", "order", "augment", "dropout")
SEED_BITS = 63
_SEED_MASK = (1 << SEED_BITS) - 1

DERIVATION = (
    "seed(stream, step) = int.from_bytes(sha256(f'replay-rng-v1|{run_seed}|{key}|{step}'"
    ".encode('utf-8')).digest()[:8], 'little') & (2**63 - 1); key = stream, or "
    "f'{stream}#{salt}' where the re-seed segment (from_step, salt) of that stream with the "
    "largest from_step <= step is in effect. seed_global(step) = torch.manual_seed(seed('dropout', "
    "step)); the other streams are handed to the step as torch.Generators seeded with their seed."
)


# ----------------------------------------------------------------------------- validation ----


def _check_int(value, what: str) -> int:
    """A non-negative Python int from an integral value (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be a non-negative int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value}")
    return value


def _check_key(stream, what: str = "stream") -> str:
    if not isinstance(stream, str):
        raise TypeError(f"{what} name must be a str, got {type(stream).__name__} {stream!r}")
    if not stream:
        raise ValueError(f"{what} name must be non-empty")
    if "|" in stream:
        raise ValueError(f"{what} name must not contain '|' (the derivation's separator): {stream!r}")
    return stream


def _check_stream_name(stream) -> str:
    _check_key(stream)
    if "#" in stream:
        raise ValueError(f"stream name must not contain '#' (reserved for re-seed keys): {stream!r}")
    return stream


# ----------------------------------------------------------------------------- derivation ----


def stream_seed(run_seed: int, stream: str, step: int) -> int:
    """The seed of `stream` at `step` of the run seeded `run_seed` (see the module docstring).

    A pure function: the first 8 bytes (little endian) of SHA-256 of
    f"replay-rng-v1|{run_seed}|{stream}|{step}" (UTF-8), masked to 63 bits. `stream` is the key,
    so the seeds of a re-seeded stream are stream_seed(run_seed, f"{stream}#{salt}", step).
    """
    run_seed = _check_int(run_seed, "run_seed")
    _check_key(stream)
    step = _check_int(step, "step")
    message = f"replay-rng-v1|{run_seed}|{stream}|{step}".encode("utf-8")
    return int.from_bytes(hashlib.sha256(message).digest()[:8], "little") & _SEED_MASK


def _normalize_segments(stream: str, value) -> tuple[tuple[int, int], ...]:
    """(from_step, salt) or a sequence of them -> sorted, validated segments."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"reseeds[{stream!r}] must be (from_step, salt) or a sequence of such pairs, got {value!r}"
        )
    items = list(value)
    if len(items) == 2 and all(isinstance(x, numbers.Integral) for x in items):
        items = [items]  # a single (from_step, salt) pair
    if not items:
        raise ValueError(f"reseeds[{stream!r}] is empty")
    segments = []
    for item in items:
        if isinstance(item, (str, bytes)) or not isinstance(item, Iterable):
            raise TypeError(f"reseeds[{stream!r}] entries must be (from_step, salt) pairs, got {item!r}")
        item = tuple(item)
        if len(item) != 2:
            raise TypeError(f"reseeds[{stream!r}] entries must be (from_step, salt) pairs, got {item!r}")
        from_step, salt = item
        segments.append((_check_int(from_step, f"reseeds[{stream!r}] from_step"),
                         _check_int(salt, f"reseeds[{stream!r}] salt")))
    segments.sort()
    steps = [s for s, _ in segments]
    if len(set(steps)) != len(steps):
        raise ValueError(f"reseeds[{stream!r}] has two re-seeds at the same from_step: {segments}")
    salts = [salt for _, salt in segments]
    if len(set(salts)) != len(salts):
        raise ValueError(
            f"reseeds[{stream!r}] reuses a salt: {segments}; each re-seed of a stream needs its own salt"
        )
    return tuple(segments)


# ------------------------------------------------------------------------------- contract ----


def seed_all_globals(seed: int) -> None:
    """Seed torch's global generators (seed_torch_globals), Python's `random` and numpy's global
    generator (with seed mod 2**32, the most it takes) from one seed."""
    seed_torch_globals(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def seed_torch_globals(seed: int) -> None:
    """What torch.manual_seed(seed) does, without its per-call cost where a device is absent.

    torch.manual_seed also seeds CUDA, XPU and MTIA; for a device type that is not initialized
    it queues the seed for later with a formatted stack trace, about 0.2 ms a call even where no
    such device exists (most of a small model's per-step recording cost). A device type that is
    not available can never be initialized in this process, so it is skipped; an available one
    is seeded as torch.manual_seed would (queued if not yet initialized)."""
    seed = int(seed)
    custom = getattr(torch, torch._C._get_privateuse1_backend_name(), None)
    if custom is not None and hasattr(custom, "manual_seed_all"):
        torch.manual_seed(seed)  # an out-of-tree device: torch's own path, whatever it costs
        return
    for device in (torch.cuda, torch.xpu, torch.mtia):
        if device.is_available() and not device._is_in_bad_fork():
            device.manual_seed_all(seed)
    if torch.backends.mps.is_available() and not torch.mps._is_in_bad_fork():
        torch.mps.manual_seed(seed)
    torch.default_generator.manual_seed(seed)


class RngContract:
    """The named streams of one run and how their seeds derive from the run seed.

    RngContract(run_seed, streams=BUILTIN_STREAMS, reseeds=None)

    `streams` are the program's streams; the built-in ones (init, order, augment, dropout) are
    always declared and come first, user streams follow in the order given (a built-in name in
    `streams` is accepted and not repeated; a duplicate user name is an error). `reseeds` maps a
    declared stream to (from_step, salt), or to a sequence of such segments (see the module
    docstring); `contract.reseeds` always holds the segment tuples.

    Immutable: with_reseed returns a new contract. Equal contracts give equal seeds everywhere.
    """

    __slots__ = ("_run_seed", "_streams", "_reseeds")

    def __init__(
        self,
        run_seed: int,
        streams: Iterable[str] = BUILTIN_STREAMS,
        reseeds: Mapping[str, object] | None = None,
    ):
        self._run_seed = _check_int(run_seed, "run_seed")
        if isinstance(streams, str):
            raise TypeError(f"streams must be a sequence of names, got the string {streams!r}")
        user: list[str] = []
        for name in streams:
            _check_stream_name(name)
            if name in BUILTIN_STREAMS:
                continue
            if name in user:
                raise ValueError(f"stream {name!r} is declared twice")
            user.append(name)
        self._streams = BUILTIN_STREAMS + tuple(user)
        normalized: dict[str, tuple[tuple[int, int], ...]] = {}
        if reseeds is None:
            reseeds = {}
        if not isinstance(reseeds, Mapping):
            raise TypeError(f"reseeds must be a mapping stream -> (from_step, salt), got {reseeds!r}")
        for stream in sorted(reseeds, key=str):
            self._check_declared(stream)
            normalized[stream] = _normalize_segments(stream, reseeds[stream])
        self._reseeds = normalized

    # -- read-only state --

    @property
    def run_seed(self) -> int:
        return self._run_seed

    @property
    def streams(self) -> tuple[str, ...]:
        return self._streams

    @property
    def reseeds(self) -> dict[str, tuple[tuple[int, int], ...]]:
        """stream -> ((from_step, salt), ...) sorted by from_step (a copy)."""
        return dict(self._reseeds)

    def _check_declared(self, stream) -> str:
        if not isinstance(stream, str):
            raise TypeError(f"stream name must be a str, got {type(stream).__name__} {stream!r}")
        if stream not in self._streams:
            raise KeyError(
                f"unknown random stream {stream!r}; this contract declares {list(self._streams)}"
            )
        return stream

    # -- seeds and generators --

    def key(self, stream: str, step: int) -> str:
        """The derivation key of `stream` at `step`: the name, or f"{name}#{salt}" if re-seeded."""
        self._check_declared(stream)
        step = _check_int(step, "step")
        key = stream
        for from_step, salt in self._reseeds.get(stream, ()):
            if from_step <= step:
                key = f"{stream}#{salt}"
        return key

    def seed(self, stream: str, step: int, rank: int = 0) -> int:
        """The seed of a declared stream at a step (an int in [0, 2**63)). In a run of several
        processes (replay.distributed) rank r > 0 draws from the key f"{key}#rank{r}" ("#" never
        appears in a declared name, and a re-seed's suffix is a number), rank 0 from the key
        itself: a one-process run is rank 0 of a world of one."""
        key = self.key(stream, step)
        if rank:
            key = f"{key}#rank{_check_int(rank, 'rank')}"
        return stream_seed(self._run_seed, key, step)

    def generator(self, stream: str, step: int, device="cpu", rank: int = 0) -> torch.Generator:
        """A fresh torch.Generator on `device` seeded with seed(stream, step, rank)."""
        seed = self.seed(stream, step, rank)
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return generator

    def generators(self, step: int, device="cpu", rank: int = 0) -> "StepGenerators":
        """Fresh generators at `step` for every declared stream except "dropout" (which seeds
        torch's global generators through seed_global): a read-only mapping that makes each
        generator when it is first looked up (most steps use one stream or none)."""
        return StepGenerators(self, step, device, rank)

    def example_seed(self, step: int, example) -> int:
        """The seed for building example `example` (its id, or "collate") of the batch of `step`:
        stream_seed(run_seed, f"{key('augment', step)}@{example}", step), so it follows the
        "augment" stream's re-seeds. The engine seeds torch's, Python's and numpy's global
        generators with it before the dataset's __getitem__ for that example (and before the
        collate function), so random augmentation inside a dataset is a pure function of (run
        seed, step, example id), whichever process or order builds the batch."""
        return stream_seed(self._run_seed, f"{self.key('augment', step)}@{example}", step)

    def seed_global(self, step: int) -> None:
        """seed_torch_globals(seed("dropout", step)): seeds the global CPU generator and every
        available device's default generators. The engine calls this before each step so that
        draws from the global generators (dropout, ...) are a pure function of (run seed, step)."""
        seed_torch_globals(self.seed("dropout", step))

    # -- forks --

    def with_reseed(self, stream: str, from_step: int, salt: int) -> "RngContract":
        """A new contract in which `stream` derives from f"{stream}#{salt}" from `from_step` on.

        Earlier re-seeds of the same stream that start before from_step are kept (their steps
        are unchanged); those at or after from_step are superseded. Reusing a salt that is still
        in effect for this stream is an error (it would reproduce draws already used)."""
        self._check_declared(stream)
        from_step = _check_int(from_step, "from_step")
        salt = _check_int(salt, "salt")
        kept = [seg for seg in self._reseeds.get(stream, ()) if seg[0] < from_step]
        reseeds = dict(self._reseeds)
        reseeds[stream] = tuple(kept) + ((from_step, salt),)
        return RngContract(self._run_seed, self._streams, reseeds)

    # -- serialization --

    def to_json(self) -> dict:
        """A JSON-serializable description of the contract (what a run records)."""
        return {
            "version": CONTRACT_VERSION,
            "derivation": DERIVATION,
            "run_seed": self._run_seed,
            "streams": list(self._streams),
            "reseeds": {s: [list(seg) for seg in segs] for s, segs in self._reseeds.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping) -> "RngContract":
        """The contract `to_json` described. Refuses other versions and unknown fields."""
        if not isinstance(d, Mapping):
            raise TypeError(f"an RNG contract must be a JSON object, got {type(d).__name__}")
        version = d.get("version")
        if version != CONTRACT_VERSION:
            raise ValueError(
                f"unsupported RNG contract version {version!r}: this replay reads version "
                f"{CONTRACT_VERSION} only (the run was recorded with a different derivation)"
            )
        known = {"version", "derivation", "run_seed", "streams", "reseeds"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown fields in RNG contract version {version}: {sorted(unknown)}")
        missing = {"run_seed", "streams"} - set(d)
        if missing:
            raise ValueError(f"RNG contract is missing {sorted(missing)}")
        streams = d["streams"]
        if not isinstance(streams, (list, tuple)):
            raise TypeError(f"RNG contract 'streams' must be a list, got {streams!r}")
        if tuple(streams[: len(BUILTIN_STREAMS)]) != BUILTIN_STREAMS:
            raise ValueError(
                f"RNG contract 'streams' must start with the built-in streams {list(BUILTIN_STREAMS)}, "
                f"got {streams}"
            )
        return cls(d["run_seed"], streams, d.get("reseeds") or {})

    # -- value semantics --

    def _identity(self):
        return (self._run_seed, self._streams, tuple(sorted(self._reseeds.items())))

    def __eq__(self, other):
        if not isinstance(other, RngContract):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self):
        return hash(self._identity())

    def __repr__(self):
        extra = "" if not self._reseeds else f", reseeds={self._reseeds!r}"
        return f"RngContract(run_seed={self._run_seed}, streams={self._streams!r}{extra})"


class StepGenerators(Mapping):
    """{stream: torch.Generator} of one step, made on first lookup. A generator is a pure
    function of (contract, stream, step), so when it is made changes nothing."""

    __slots__ = ("_contract", "_step", "_device", "_rank", "_made", "_names")

    def __init__(self, contract: RngContract, step: int, device="cpu", rank: int = 0):
        self._contract, self._step, self._device, self._rank = contract, step, device, rank
        self._names = tuple(s for s in contract.streams if s != "dropout")
        self._made: dict[str, torch.Generator] = {}

    def __getitem__(self, stream: str) -> torch.Generator:
        generator = self._made.get(stream)
        if generator is None:
            if stream not in self._names:
                raise KeyError(f"no generator for stream {stream!r} in a step; the streams are {list(self._names)} "
                               "(\"dropout\" seeds torch's global generators)")
            generator = self._made[stream] = self._contract.generator(stream, self._step, self._device, self._rank)
        return generator

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"StepGenerators(step={self._step}, streams={list(self._names)})"
