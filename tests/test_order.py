"""Data-order policies: batch ids are a pure function of (RNG contract, step); epochs cover the
dataset; order hashes are SHA-256 of little-endian int64 ids."""

import hashlib
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from replay.order import (
    POLICIES,
    CurriculumPolicy,
    OrderPolicy,
    ReshufflePolicy,
    SequentialPolicy,
    ShuffleOncePolicy,
    WithReplacementPolicy,
    batch_hash,
    make_policy,
    order_hash,
    policy_from_json,
)
from replay.rng import RngContract

N, B = 23, 5  # 4 steps per epoch, 3 examples dropped each epoch
SCORES = [((i * 7) % 5) * 0.5 for i in range(N)]  # many ties
SPECS = ["reshuffle", "with_replacement", "shuffle_once", "sequential", {"name": "curriculum", "scores": SCORES}]
WITHOUT_REPLACEMENT = ["reshuffle", "shuffle_once", "sequential", "curriculum"]


def policy(spec, seed=0, n=N, b=B, contract=None):
    return make_policy(spec, n, b, contract or RngContract(seed))


def name_of(spec):
    return spec if isinstance(spec, str) else spec["name"]


def le_int64_sha256(ids):
    """The documented order hash, written out with struct and hashlib."""
    return hashlib.sha256(struct.pack(f"<{len(ids)}q", *ids)).hexdigest()


# ------------------------------------------------------------------------- hashes ----


def test_order_hash_is_sha256_of_little_endian_int64():
    ids = [0, 1, 2, 255, 256, -1, 2**63 - 1, -(2**63)]
    expected = le_int64_sha256(ids)
    assert order_hash(ids) == expected
    assert order_hash(torch.tensor(ids, dtype=torch.int64)) == expected
    assert order_hash(np.array(ids, dtype=np.int64)) == expected
    assert order_hash(tuple(ids)) == expected
    # pinned: sha256 of the 24 bytes 01 00.. 02 00.. 03 00..
    assert order_hash([1, 2, 3]) == hashlib.sha256(
        bytes([1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0])
    ).hexdigest()
    assert order_hash([]) == hashlib.sha256(b"").hexdigest()
    assert batch_hash is order_hash


def test_order_hash_is_dtype_and_layout_independent():
    ids = [5, 3, 9, 0]
    expected = le_int64_sha256(ids)
    for dtype in (torch.int32, torch.int16, torch.uint8, torch.int64):
        assert order_hash(torch.tensor(ids, dtype=dtype)) == expected
    assert order_hash(torch.tensor([9, 5, 7, 3, 1, 0])[1::2]) == le_int64_sha256([5, 3, 0])
    assert order_hash(range(4)) == le_int64_sha256([0, 1, 2, 3])
    assert order_hash(np.array(ids, dtype=np.uint32)) == expected


@pytest.mark.parametrize(
    "ids",
    [[1.0, 2.0], [True, False], torch.tensor([1.0]), torch.tensor([True]), torch.zeros(2, 2, dtype=torch.int64),
     np.zeros((2, 2), dtype=np.int64), np.array([1.5]), [2**63], "abc", np.array([2**64 - 1], dtype=np.uint64)],
)
def test_order_hash_refuses_non_integer_ids(ids):
    with pytest.raises((TypeError, ValueError)):
        order_hash(ids)


# ------------------------------------------------------------------------- every policy ----


@pytest.mark.parametrize("spec", SPECS, ids=name_of)
def test_ids_in_range_and_of_batch_size(spec):
    p = policy(spec, seed=3)
    for step in list(range(3 * p.steps_per_epoch)) + [10**6, 10**9 + 7]:
        ids = p.batch_ids(step)
        assert len(ids) == B and all(type(i) is int and 0 <= i < N for i in ids)
        assert p.batch_hash(step) == le_int64_sha256(ids) == batch_hash(ids)
        t = p.batch_tensor(step)
        assert t.dtype == torch.int64 and t.tolist() == ids


@pytest.mark.parametrize("spec", [s for s in SPECS if name_of(s) != "with_replacement"], ids=name_of)
def test_without_replacement_covers_each_example_once_per_epoch(spec):
    p = policy(spec, seed=4)
    assert p.steps_per_epoch == N // B == 4
    for epoch in range(4):
        order = p.epoch_order(epoch)
        assert sorted(order) == list(range(N))
        steps = range(epoch * 4, epoch * 4 + 4)
        assert [p.epoch_of(s) for s in steps] == [epoch] * 4
        assert p.epoch_start(epoch) == epoch * 4
        seen = [i for s in steps for i in p.batch_ids(s)]
        assert seen == order[: 4 * B]  # the dropped remainder is the permutation's tail
        assert len(set(seen)) == len(seen) == N - N % B
        assert p.epoch_order_hash(epoch) == le_int64_sha256(order)


def test_exact_division_visits_everything():
    p = policy("reshuffle", n=12, b=4)
    assert sorted(i for s in range(3) for i in p.batch_ids(s)) == list(range(12))


def test_with_replacement():
    p = policy("with_replacement", seed=1)
    assert p.epoch_order(0) is None and p.epoch_order_hash(0) is None
    assert p.steps_per_epoch == N // B and p.epoch_of(9) == 2
    ids = [i for s in range(200) for i in p.batch_ids(s)]
    assert set(ids) == set(range(N))  # uniform over the dataset
    assert any(len(set(p.batch_ids(s))) < B for s in range(200))  # repeats happen
    # drawn from the order stream at the step itself
    c = RngContract(1)
    assert p.batch_ids(7) == torch.randint(0, N, (B,), generator=c.generator("order", 7)).tolist()
    # batches larger than the dataset are allowed with replacement
    big = policy("with_replacement", n=3, b=10)
    assert big.steps_per_epoch == 1 and len(big.batch_ids(2)) == 10 and big.epoch_of(2) == 2


# ------------------------------------------------------------------------- specific orders ----


def test_reshuffle_differs_across_epochs_and_seeds():
    p, q = policy("reshuffle", seed=0), policy("reshuffle", seed=1)
    orders = [tuple(p.epoch_order(e)) for e in range(6)]
    assert len(set(orders)) == 6
    assert all(p.epoch_order(e) != q.epoch_order(e) for e in range(6))
    # the permutation of epoch e is drawn from the order stream at the epoch's first step
    c = RngContract(0)
    assert p.epoch_order(2) == torch.randperm(N, generator=c.generator("order", 2 * (N // B))).tolist()


def test_reshuffle_is_the_default():
    p = make_policy(None, N, B, RngContract(0))
    assert isinstance(p, ReshufflePolicy) and p == policy("reshuffle")


def test_reseeding_the_order_stream_changes_epochs_from_that_step():
    c = RngContract(5)
    p = policy("reshuffle", contract=c)
    forked = p.with_contract(c.with_reseed("order", 6, 1))  # mid-epoch 1 (steps 4..7)
    for epoch in range(5):
        assert (forked.epoch_order(epoch) == p.epoch_order(epoch)) is (epoch < 2)
    # other streams re-seeded: the data order is untouched
    aug = p.with_contract(c.with_reseed("augment", 0, 1))
    assert all(aug.batch_ids(s) == p.batch_ids(s) for s in range(40))
    wr = policy("with_replacement", contract=c)
    wr_forked = wr.with_contract(c.with_reseed("order", 6, 1))
    assert [wr.batch_ids(s) == wr_forked.batch_ids(s) for s in range(4, 9)] == [True, True, False, False, False]


def test_shuffle_once_is_identical_across_epochs():
    p = policy("shuffle_once", seed=2)
    first = p.epoch_order(0)
    assert first != list(range(N))
    assert all(p.epoch_order(e) == first for e in (1, 5, 10**6))
    assert p.batch_ids(1) == p.batch_ids(1 + 4 * 1000)
    assert first == policy("reshuffle", seed=2).epoch_order(0)
    assert first != policy("shuffle_once", seed=3).epoch_order(0)


def test_sequential():
    p = make_policy("sequential", N, B, None)  # needs no contract
    assert all(p.epoch_order(e) == list(range(N)) for e in (0, 3))
    assert p.batch_ids(5) == [5, 6, 7, 8, 9]
    assert p == policy("sequential", seed=9)


def test_curriculum_orders_by_score_then_id():
    scores = [3.0, 1, 2.5, 1, 0.5, -0.0, 0.0, 7, 7, 1.0]
    p = make_policy({"name": "curriculum", "scores": scores}, 10, 3, None)
    assert p.epoch_order(0) == [5, 6, 4, 1, 3, 9, 2, 0, 7, 8]
    assert p.epoch_order(4) == p.epoch_order(0)
    assert p.batch_ids(0) == [5, 6, 4] and p.batch_ids(3) == [5, 6, 4]
    # floats only (the numpy path) with ties, and from a tensor
    expected = sorted(range(N), key=lambda i: (SCORES[i], i))
    assert policy({"name": "curriculum", "scores": SCORES}).epoch_order(0) == expected
    t = CurriculumPolicy(N, B, None, torch.tensor(SCORES, dtype=torch.float32))
    assert t.epoch_order(0) == expected
    # ints are compared exactly: as floats 2**53 + 1 would round to 2**53 and tie with it
    big = CurriculumPolicy(3, 1, None, [2**53 + 1, 2**53, 2.0**53])
    assert big.epoch_order(0) == [1, 2, 0]


@pytest.mark.parametrize(
    "scores, error",
    [
        ([1.0] * (N - 1), ValueError),
        ([1.0] * N + [2.0], ValueError),
        ([float("nan")] + [1.0] * (N - 1), ValueError),
        ([float("inf")] + [1.0] * (N - 1), ValueError),
        (torch.tensor([1.0] * (N - 1) + [float("-inf")]), ValueError),
        (["a"] * N, TypeError),
        ([True] * N, TypeError),
        (torch.zeros(N, 2), ValueError),
        (None, TypeError),
        ("scores", TypeError),
    ],
)
def test_curriculum_validates_scores(scores, error):
    with pytest.raises(error):
        CurriculumPolicy(N, B, None, scores)


# ------------------------------------------------------------------------- statelessness ----


@pytest.mark.parametrize("spec", SPECS, ids=name_of)
def test_batch_ids_do_not_depend_on_query_order_or_cache(spec):
    steps = [0, 1, 5, 4, 27, 3, 10**6, 2, 26, 8, 13]
    p = policy(spec, seed=6)
    forward = {s: p.batch_ids(s) for s in steps}
    q = policy(spec, seed=6)
    backward = {s: q.batch_ids(s) for s in reversed(steps)}
    assert forward == backward
    fresh = {s: policy(spec, seed=6).batch_ids(s) for s in steps}  # nothing cached
    assert fresh == forward
    q.cache_size = 1  # evictions change nothing either
    assert {s: q.batch_ids(s) for s in steps * 2} == forward


def test_a_far_step_builds_only_its_epoch():
    p = policy("reshuffle", n=1_000_000, b=1000)
    start = time.perf_counter()
    p.batch_ids(10**6)
    p.batch_ids(10**6 + 1)
    assert time.perf_counter() - start < 2.0
    assert list(p._cache) == [10**6 // 1000]


def test_cache_is_bounded():
    p = policy("reshuffle")
    for e in range(20):
        p.epoch_order(e)
    assert len(p._cache) <= p.cache_size


CHILD = r"""
import json, sys
from replay.order import make_policy
from replay.rng import RngContract
args = json.loads(sys.argv[1])
out = {}
for spec in args["specs"]:
    p = make_policy(spec, args["n"], args["b"], RngContract.from_json(args["contract"]))
    out[p.name] = [[p.batch_ids(s), p.batch_hash(s)] for s in args["steps"]]
print(json.dumps(out))
"""


def test_batch_ids_are_the_same_in_a_fresh_process():
    contract = RngContract(31).with_reseed("order", 9, 2)
    steps = [0, 3, 9, 17, 4000, 3]
    args = {"specs": SPECS, "n": N, "b": B, "steps": steps, "contract": contract.to_json()}
    env = dict(os.environ, PYTHONHASHSEED="4321")
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                            env=env, check=True)
    child = json.loads(result.stdout)
    for spec in SPECS:
        p = make_policy(spec, N, B, contract)
        assert child[p.name] == [[p.batch_ids(s), p.batch_hash(s)] for s in steps]


# ------------------------------------------------------------------------- JSON and specs ----


@pytest.mark.parametrize("spec", SPECS, ids=name_of)
def test_json_round_trip(spec):
    c = RngContract(8)
    p = policy(spec, contract=c)
    d = json.loads(json.dumps(p.to_json()))
    assert d["name"] == name_of(spec) and d["dataset_size"] == N and d["batch_size"] == B
    assert "run_seed" not in d and "streams" not in d  # not the contract
    back = policy_from_json(d, N, B, c)
    assert back == p and type(back) is type(p)
    assert [back.batch_ids(s) for s in range(12)] == [p.batch_ids(s) for s in range(12)]
    assert make_policy(d, N, B, c) == p


def test_curriculum_scores_round_trip_exactly():
    scores = torch.rand(N, generator=torch.Generator().manual_seed(0)).tolist()
    scores[3] = scores[4]
    scores[0] = 10**20  # an int stays an int
    p = CurriculumPolicy(N, B, None, scores)
    d = json.loads(json.dumps(p.to_json()))
    assert d["scores"] == scores and type(d["scores"][0]) is int
    assert policy_from_json(d, N, B, None).epoch_order(0) == p.epoch_order(0)


def test_short_names_and_aliases():
    c = RngContract(0)
    for alias, cls in [("rr", ReshufflePolicy), ("random_reshuffle", ReshufflePolicy), ("Reshuffle", ReshufflePolicy),
                       ("wr", WithReplacementPolicy), ("replacement", WithReplacementPolicy),
                       ("shuffle-once", ShuffleOncePolicy), ("seq", SequentialPolicy)]:
        assert type(make_policy(alias, N, B, c)) is cls
    assert set(POLICIES) == {"reshuffle", "with_replacement", "shuffle_once", "sequential", "curriculum"}


def test_make_policy_from_an_instance():
    c = RngContract(0)
    p = ReshufflePolicy(N, B, c)
    assert make_policy(p, N, B, c) is p
    rebound = make_policy(p, N, B, RngContract(1))  # a fork's contract: same policy, new draws
    assert isinstance(rebound, ReshufflePolicy) and rebound.contract == RngContract(1)
    assert rebound.epoch_order(0) == ReshufflePolicy(N, B, RngContract(1)).epoch_order(0)
    with pytest.raises(ValueError, match="dataset_size"):
        make_policy(p, N + 1, B, c)


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("random", ValueError, "unknown order policy"),
        ("curriculum", ValueError, "scores"),
        ({"name": "curriculum"}, ValueError, "scores"),
        ({"scores": [1.0] * N}, ValueError, "name"),
        ({"name": "reshuffle", "seed": 3}, ValueError, "unknown parameters"),
        ({"name": "reshuffle", "dataset_size": N + 1}, ValueError, "dataset_size"),
        ({"name": "reshuffle", "batch_size": B + 1}, ValueError, "batch_size"),
        ({"name": 3}, TypeError, "name"),
        (3, TypeError, "spec"),
        (["reshuffle"], TypeError, "spec"),
    ],
)
def test_bad_specs(spec, error, match):
    with pytest.raises(error, match=match):
        make_policy(spec, N, B, RngContract(0))


@pytest.mark.parametrize(
    "n, b, spec, error",
    [
        (0, 1, "reshuffle", ValueError),
        (5, 0, "reshuffle", ValueError),
        (5, 6, "reshuffle", ValueError),
        (5, 6, "sequential", ValueError),
        (5, 6, "shuffle_once", ValueError),
        (5, 0, "with_replacement", ValueError),
        (5.0, 1, "reshuffle", TypeError),
        (5, True, "reshuffle", TypeError),
    ],
)
def test_bad_sizes(n, b, spec, error):
    with pytest.raises(error):
        make_policy(spec, n, b, RngContract(0))


def test_bad_contract_and_steps():
    with pytest.raises(TypeError, match="RngContract"):
        make_policy("reshuffle", N, B, None)
    with pytest.raises(TypeError, match="RngContract"):
        make_policy("with_replacement", N, B, {"run_seed": 1})
    p = policy("reshuffle")
    for bad, error in [(-1, ValueError), (1.5, TypeError), (True, TypeError)]:
        with pytest.raises(error):
            p.batch_ids(bad)
        with pytest.raises(error):
            p.epoch_of(bad)
    with pytest.raises(ValueError):
        p.epoch_order(-1)
    with pytest.raises(NotImplementedError):
        OrderPolicy(N, B, RngContract(0)).batch_ids(0)
