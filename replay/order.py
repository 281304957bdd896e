"""Data-order policies and order hashes.

A policy turns (RNG contract, step) into the batch ids of that step. Nothing is stored: the ids
of any step are recomputed from the contract's "order" stream alone, in any order, in any
process. Policies cache the permutation of the epochs they were last asked about (a small LRU);
the cache is only a speed-up and never changes a result.

Epochs. Without-replacement policies (reshuffle, shuffle_once, sequential, curriculum) need
batch_size <= dataset_size and drop the last incomplete batch of each epoch:

    steps_per_epoch = n // b,   epoch = step // steps_per_epoch,
    batch_ids(step) = order[i * b : (i + 1) * b]  with i = step % steps_per_epoch

where `order` is the epoch's full permutation of range(n); its last n % b ids are not visited
that epoch. With replacement, an "epoch" is the same number of steps, max(1, n // b), so epoch
numbers line up with the other policies (b > n is allowed there).

Randomness ("order" stream of the RngContract, counter = a step):
- reshuffle: the permutation of epoch e is torch.randperm(n, generator=contract.generator("order",
  e * steps_per_epoch)) -- drawn at the epoch's first step. Using the step (not the epoch number)
  as the counter keeps the contract's meaning of "from_step": re-seeding "order" from step T
  changes the permutation of every epoch that starts at or after T, and nothing before T (an
  epoch already under way at T keeps its order).
- with_replacement: step t draws torch.randint(0, n, (b,), generator=contract.generator("order", t)).
- shuffle_once: the reshuffle permutation of epoch 0 (drawn at step 0), for every epoch.
- sequential: range(n) every epoch; curriculum: ids sorted by (score, id) every epoch.
Generators are always CPU generators, so the order does not depend on the training device.

Hashes: order_hash(ids) (also named batch_hash) is the SHA-256 hex digest of the ids as
little-endian int64 bytes. epoch_order_hash(e) hashes the epoch's full permutation (length n,
dropped tail included); a step's batch hash is batch_hash(batch_ids(step)).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .rng import RngContract

__all__ = [
    "CurriculumPolicy",
    "OrderPolicy",
    "POLICIES",
    "ReshufflePolicy",
    "SequentialPolicy",
    "ShuffleOncePolicy",
    "WithReplacementPolicy",
    "batch_hash",
    "make_policy",
    "order_hash",
    "policy_from_json",
]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


# ---------------------------------------------------------------------------------- hashes ----


def _ids_bytes(ids) -> bytes:
    """The ids as little-endian int64 bytes; integers only, 1-D, each within int64."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"ids must be a 1-D tensor, got shape {tuple(ids.shape)}")
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        return ids.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8", copy=False).tobytes()
    if isinstance(ids, np.ndarray):
        array = ids
    else:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, range)):
            ids = list(ids)
        if len(ids) == 0:
            return b""
        # The common case (a step's batch: Python ints) is checked without an ABC check per id.
        if not all(type(x) is int for x in ids):
            for x in ids:
                if isinstance(x, bool) or not isinstance(x, numbers.Integral):
                    raise TypeError(f"ids must be integers, got {type(x).__name__} {x!r}")
        try:
            array = np.asarray(ids, dtype=np.int64)
        except OverflowError:
            raise ValueError("ids must fit in int64") from None
    if array.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {array.shape}")
    if array.size == 0:
        return b""
    if array.dtype.kind not in "iu":
        raise TypeError(f"ids must be integers, got dtype {array.dtype}")
    if array.dtype.kind == "u" and array.dtype.itemsize == 8 and int(array.max()) > _INT64_MAX:
        raise ValueError("ids must fit in int64")
    return array.astype("<i8", copy=False).tobytes()


def order_hash(ids) -> str:
    """SHA-256 hex digest of `ids` (a sequence of ints or a 1-D integer tensor / array) encoded
    as little-endian int64. An empty sequence hashes the empty string."""
    return hashlib.sha256(_ids_bytes(ids)).hexdigest()


batch_hash = order_hash
"""A step's batch hash: the same function as order_hash, applied to that step's batch ids."""


# ------------------------------------------------------------------------------ validation ----


def _check_int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


# ---------------------------------------------------------------------------------- policies ----


class OrderPolicy:
    """Base class: which dataset ids each step trains on.

    OrderPolicy(dataset_size, batch_size, contract). Subclasses set `name`, `replacement`,
    `uses_rng` and implement _epoch_order_tensor(epoch) (or override batch_tensor).
    """

    name: str = ""
    replacement: bool = False  # True: ids drawn with replacement, no epoch permutation
    uses_rng: bool = True  # False: the contract is not used and may be None
    cache_size: int = 4  # epoch permutations kept

    def __init__(self, dataset_size: int, batch_size: int, contract: RngContract | None):
        self.dataset_size = _check_int(dataset_size, "dataset_size", 1)
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        if not self.replacement and self.batch_size > self.dataset_size:
            raise ValueError(
                f"order policy {self.name!r} samples without replacement, so batch_size "
                f"({self.batch_size}) must be <= dataset_size ({self.dataset_size})"
            )
        if contract is None and self.uses_rng:
            raise TypeError(f"order policy {self.name!r} needs an RngContract, got None")
        if contract is not None and not isinstance(contract, RngContract):
            raise TypeError(f"contract must be an RngContract, got {type(contract).__name__}")
        self.contract = contract
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    # -- positions --

    @property
    def steps_per_epoch(self) -> int:
        """dataset_size // batch_size (the last incomplete batch of an epoch is dropped); at least
        1 for with-replacement sampling, where batch_size may exceed dataset_size."""
        return max(1, self.dataset_size // self.batch_size)

    def epoch_of(self, step: int) -> int:
        return _check_int(step, "step", 0) // self.steps_per_epoch

    def epoch_start(self, epoch: int) -> int:
        """The first step of `epoch`."""
        return _check_int(epoch, "epoch", 0) * self.steps_per_epoch

    # -- orders --

    def _epoch_order_tensor(self, epoch: int) -> torch.Tensor:
        raise NotImplementedError

    def _cached_order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation (an int64 CPU tensor, not to be mutated), through the LRU."""
        order = self._cache.get(epoch)
        if order is None:
            order = self._epoch_order_tensor(epoch)
            self._cache[epoch] = order
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(epoch)
        return order

    def epoch_order(self, epoch: int) -> list[int] | None:
        """The full permutation of range(dataset_size) for `epoch` (dropped tail included), or
        None for with-replacement sampling."""
        epoch = _check_int(epoch, "epoch", 0)
        if self.replacement:
            return None
        return self._cached_order(epoch).tolist()

    def epoch_order_hash(self, epoch: int) -> str | None:
        """order_hash(epoch_order(epoch)), or None for with-replacement sampling."""
        epoch = _check_int(epoch, "epoch", 0)
        if self.replacement:
            return None
        return order_hash(self._cached_order(epoch))

    def batch_tensor(self, step: int) -> torch.Tensor:
        """The batch ids of `step` as a fresh int64 CPU tensor of length batch_size."""
        step = _check_int(step, "step", 0)
        epoch, index = divmod(step, self.steps_per_epoch)
        b = self.batch_size
        return self._cached_order(epoch)[index * b : (index + 1) * b].clone()

    def batch_ids(self, step: int) -> list[int]:
        """The batch ids of `step`: batch_size ints in [0, dataset_size)."""
        return self.batch_tensor(step).tolist()

    def batch_hash(self, step: int) -> str:
        """batch_hash(batch_ids(step))."""
        return order_hash(self.batch_tensor(step))

    # -- description --

    def params(self) -> dict:
        """The policy's own parameters (JSON-serializable), beyond name and sizes."""
        return {}

    def to_json(self) -> dict:
        """{"name", "dataset_size", "batch_size", **params}: JSON-serializable; not the contract."""
        return {
            "name": self.name,
            "dataset_size": self.dataset_size,
            "batch_size": self.batch_size,
            **self.params(),
        }

    def with_contract(self, contract: RngContract | None) -> "OrderPolicy":
        """The same policy drawing from another contract (for instance a fork's re-seeded one)."""
        return policy_from_json(self.to_json(), self.dataset_size, self.batch_size, contract)

    def __eq__(self, other):
        if not isinstance(other, OrderPolicy):
            return NotImplemented
        return (
            type(self) is type(other)
            and self.to_json() == other.to_json()
            and (self.contract == other.contract or not self.uses_rng)
        )

    def __hash__(self):
        return hash((type(self), self.dataset_size, self.batch_size))

    def __repr__(self):
        params = "".join(f", {k}={v!r}" for k, v in self.params().items() if k != "scores")
        return (
            f"{type(self).__name__}(dataset_size={self.dataset_size}, "
            f"batch_size={self.batch_size}{params})"
        )


class ReshufflePolicy(OrderPolicy):
    """Random reshuffling: a fresh permutation each epoch, drawn from the "order" stream at the
    epoch's first step (the default policy)."""

    name = "reshuffle"

    def _epoch_order_tensor(self, epoch: int) -> torch.Tensor:
        generator = self.contract.generator("order", epoch * self.steps_per_epoch)
        return torch.randperm(self.dataset_size, generator=generator, dtype=torch.int64)


class ShuffleOncePolicy(OrderPolicy):
    """One permutation (the reshuffle permutation of epoch 0, drawn at step 0) for every epoch."""

    name = "shuffle_once"
    cache_size = 1

    def _cached_order(self, epoch: int) -> torch.Tensor:
        return super()._cached_order(0)

    def _epoch_order_tensor(self, epoch: int) -> torch.Tensor:
        generator = self.contract.generator("order", 0)
        return torch.randperm(self.dataset_size, generator=generator, dtype=torch.int64)


class SequentialPolicy(OrderPolicy):
    """0, 1, ..., n - 1 every epoch. Uses no randomness."""

    name = "sequential"
    uses_rng = False
    cache_size = 1

    def _cached_order(self, epoch: int) -> torch.Tensor:
        return super()._cached_order(0)

    def _epoch_order_tensor(self, epoch: int) -> torch.Tensor:
        return torch.arange(self.dataset_size, dtype=torch.int64)


class CurriculumPolicy(OrderPolicy):
    """Ids in ascending order of a per-example score, ties broken by id, the same every epoch.

    CurriculumPolicy(dataset_size, batch_size, contract, scores): `scores` is a sequence or 1-D
    tensor/array of dataset_size finite real numbers. They are kept as Python ints/floats (exact:
    float32 and float64 values convert exactly, ints are not rounded) and go into to_json, so the
    policy is reproducible from the run's record alone. Uses no randomness.
    """

    name = "curriculum"
    uses_rng = False
    cache_size = 1

    def __init__(self, dataset_size: int, batch_size: int, contract: RngContract | None, scores):
        super().__init__(dataset_size, batch_size, contract)
        self.scores = self._checked_scores(scores, self.dataset_size)

    @staticmethod
    def _checked_scores(scores, n: int) -> list:
        if scores is None:
            raise TypeError("the curriculum policy needs per-example scores (a list or 1-D tensor of length n)")
        if isinstance(scores, (torch.Tensor, np.ndarray)):
            if scores.ndim != 1:
                raise ValueError(f"curriculum scores must be 1-D, got shape {tuple(scores.shape)}")
            if isinstance(scores, torch.Tensor):
                if scores.is_complex() or scores.dtype == torch.bool:
                    raise TypeError(f"curriculum scores must be real numbers, got {scores.dtype}")
                scores = scores.detach().cpu()
            elif scores.dtype.kind not in "iuf":
                raise TypeError(f"curriculum scores must be real numbers, got dtype {scores.dtype}")
            values = scores.tolist()
        elif isinstance(scores, (str, bytes, Mapping)):
            raise TypeError(f"curriculum scores must be a sequence of numbers, got {type(scores).__name__}")
        else:
            values = list(scores)
        if len(values) != n:
            raise ValueError(f"curriculum scores must have one score per example: got {len(values)}, dataset_size is {n}")
        checked = []
        for i, x in enumerate(values):
            if isinstance(x, bool) or not isinstance(x, numbers.Real):
                raise TypeError(f"curriculum score {i} must be a real number, got {type(x).__name__} {x!r}")
            x = int(x) if isinstance(x, numbers.Integral) else float(x)
            if isinstance(x, float) and not math.isfinite(x):
                raise ValueError(f"curriculum score {i} is not finite: {x!r}")
            checked.append(x)
        return checked

    def _cached_order(self, epoch: int) -> torch.Tensor:
        return super()._cached_order(0)

    def _epoch_order_tensor(self, epoch: int) -> torch.Tensor:
        scores = self.scores
        if all(type(x) is float for x in scores):  # fast exact path: a stable sort on float64
            order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
        else:  # exact comparison of mixed ints and floats
            order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
        return torch.as_tensor(np.asarray(order, dtype=np.int64))

    def params(self) -> dict:
        return {"scores": list(self.scores)}


class WithReplacementPolicy(OrderPolicy):
    """Each step draws batch_size ids uniformly with replacement from the "order" stream at that
    step. An epoch is max(1, n // b) steps (for epoch_of only); there is no epoch permutation."""

    name = "with_replacement"
    replacement = True

    def batch_tensor(self, step: int) -> torch.Tensor:
        step = _check_int(step, "step", 0)
        generator = self.contract.generator("order", step)
        return torch.randint(0, self.dataset_size, (self.batch_size,), generator=generator, dtype=torch.int64)


POLICIES: dict[str, type[OrderPolicy]] = {
    cls.name: cls
    for cls in (ReshufflePolicy, WithReplacementPolicy, ShuffleOncePolicy, SequentialPolicy, CurriculumPolicy)
}

_ALIASES = {
    "random_reshuffle": "reshuffle",
    "rr": "reshuffle",
    "shuffle": "reshuffle",
    "replacement": "with_replacement",
    "with-replacement": "with_replacement",
    "wr": "with_replacement",
    "shuffle-once": "shuffle_once",
    "so": "shuffle_once",
    "seq": "sequential",
}


def _canonical_name(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"order policy name must be a str, got {type(name).__name__} {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in POLICIES:
        raise ValueError(
            f"unknown order policy {name!r}; known: {sorted(POLICIES)} "
            f"(aliases: {sorted(_ALIASES)})"
        )
    return key


def policy_from_json(d: Mapping, n: int, b: int, contract: RngContract | None) -> OrderPolicy:
    """The policy `to_json` described, for a dataset of n examples, batches of b, and `contract`.

    If `d` records dataset_size / batch_size they must equal n / b."""
    if not isinstance(d, Mapping):
        raise TypeError(f"an order policy description must be a JSON object, got {type(d).__name__}")
    if "name" not in d:
        raise ValueError(f"order policy description has no 'name': {dict(d)!r}")
    name = _canonical_name(d["name"])
    cls = POLICIES[name]
    for key, value in (("dataset_size", n), ("batch_size", b)):
        if key in d and d[key] != value:
            raise ValueError(f"order policy {name!r} was described with {key}={d[key]!r}, but {key} is {value!r}")
    params = {k: v for k, v in d.items() if k not in ("name", "dataset_size", "batch_size")}
    allowed = {"scores"} if cls is CurriculumPolicy else set()
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"unknown parameters for order policy {name!r}: {sorted(unknown)}")
    if cls is CurriculumPolicy:
        if "scores" not in params:
            raise ValueError("the curriculum policy needs 'scores' (one per example)")
        return CurriculumPolicy(n, b, contract, params["scores"])
    return cls(n, b, contract)


def make_policy(spec, n: int, b: int, contract: RngContract | None) -> OrderPolicy:
    """An order policy from a short name ("reshuffle", "with_replacement", "shuffle_once",
    "sequential", or an alias), a JSON description ({"name": "curriculum", "scores": [...]}),
    an OrderPolicy (returned as is if it matches n, b and contract, else rebound to `contract`),
    or None (the default, reshuffle)."""
    if spec is None:
        spec = "reshuffle"
    if isinstance(spec, OrderPolicy):
        if (spec.dataset_size, spec.batch_size) != (n, b):
            raise ValueError(
                f"order policy {spec!r} was made for dataset_size={spec.dataset_size}, "
                f"batch_size={spec.batch_size}, but the program has dataset_size={n}, batch_size={b}"
            )
        if spec.contract == contract:
            return spec
        return spec.with_contract(contract)
    if isinstance(spec, str):
        name = _canonical_name(spec)
        if name == "curriculum":
            raise ValueError(
                "the curriculum policy needs scores: pass {'name': 'curriculum', 'scores': [...]} "
                "or a CurriculumPolicy"
            )
        return POLICIES[name](n, b, contract)
    if isinstance(spec, Mapping):
        return policy_from_json(spec, n, b, contract)
    raise TypeError(
        f"an order policy spec must be a name, a dict, an OrderPolicy or None, got {type(spec).__name__}"
    )
