"""The RNG contract (DESIGN.md invariant 3): every stream's seed is a pure function of
(run seed, stream name, step); a step's generators need no stored state; re-seeding one stream
leaves every other stream's draws untouched."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from replay.rng import BUILTIN_STREAMS, CONTRACT_VERSION, RngContract, seed_torch_globals, stream_seed

STREAMS = BUILTIN_STREAMS + ("noise", "mask")


def reference_seed(run_seed: int, key: str, step: int) -> int:
    """The documented derivation, written out independently of the module."""
    digest = hashlib.sha256(f"replay-rng-v1|{run_seed}|{key}|{step}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def draws(contract: RngContract, stream: str, step: int) -> torch.Tensor:
    return torch.rand(8, generator=contract.generator(stream, step))


# ------------------------------------------------------------------------- derivation ----


def test_stream_seed_matches_documented_derivation():
    for run_seed, stream, step in [(0, "init", 0), (7, "order", 3), (2**70, "noise", 10**12), (1, "x#3", 5)]:
        assert stream_seed(run_seed, stream, step) == reference_seed(run_seed, stream, step)
    # a pinned value, so that a change of derivation cannot go unnoticed
    assert stream_seed(0, "order", 0) == reference_seed(0, "order", 0)
    assert stream_seed(12345, "dropout", 99) == int.from_bytes(
        hashlib.sha256(b"replay-rng-v1|12345|dropout|99").digest()[:8], "little"
    ) % 2**63


def test_seeds_are_accepted_by_torch_and_fit_int64():
    contract = RngContract(3, STREAMS)
    seeds = [contract.seed(s, t) for s in STREAMS for t in range(200)]
    assert all(0 <= s < 2**63 for s in seeds)
    assert max(seeds) >= 2**62  # the full 63 bits are used
    g = torch.Generator()
    for s in seeds:
        g.manual_seed(s)
        assert g.initial_seed() == s
    torch.manual_seed(max(seeds))
    assert torch.initial_seed() == max(seeds)


def test_seeds_differ_across_streams_steps_and_run_seeds():
    seeds = {
        (r, s, t): RngContract(r, STREAMS).seed(s, t)
        for r in range(4)
        for s in STREAMS
        for t in range(50)
    }
    assert len(set(seeds.values())) == len(seeds)


@pytest.mark.parametrize(
    "args, error",
    [
        ((-1, "init", 0), ValueError),
        ((True, "init", 0), TypeError),
        ((1.0, "init", 0), TypeError),
        ((1, "", 0), ValueError),
        ((1, "a|b", 0), ValueError),
        ((1, 3, 0), TypeError),
        ((1, "init", -1), ValueError),
        ((1, "init", 2.0), TypeError),
    ],
)
def test_stream_seed_validates_inputs(args, error):
    with pytest.raises(error):
        stream_seed(*args)


def test_numpy_integers_are_accepted_as_their_value():
    np = pytest.importorskip("numpy")
    assert stream_seed(np.int64(5), "init", np.uint32(3)) == stream_seed(5, "init", 3)
    assert RngContract(np.int64(5)) == RngContract(5)


# ------------------------------------------------------------------------- contract ----


def test_streams_always_start_with_the_builtins():
    assert RngContract(1).streams == BUILTIN_STREAMS
    assert RngContract(1, ("noise",)).streams == BUILTIN_STREAMS + ("noise",)
    assert RngContract(1, ("noise", "dropout", "mask")).streams == BUILTIN_STREAMS + ("noise", "mask")
    assert RngContract(1, ("noise",)) == RngContract(1, BUILTIN_STREAMS + ("noise",))


@pytest.mark.parametrize("streams", [("a", "a"), ("",), ("a|b",), ("a#1",), "noise", (3,)])
def test_bad_stream_declarations(streams):
    with pytest.raises((ValueError, TypeError)):
        RngContract(1, streams)


def test_unknown_stream_names_the_declared_ones():
    contract = RngContract(1, ("noise",))
    with pytest.raises(KeyError, match="noise"):
        contract.seed("nosie", 0)
    with pytest.raises(KeyError):
        contract.generator("mask", 0)
    with pytest.raises(KeyError):
        contract.with_reseed("mask", 3, 1)
    with pytest.raises(KeyError):
        RngContract(1, reseeds={"mask": (3, 1)})


def test_seed_is_the_derivation_of_the_run_seed():
    contract = RngContract(42, STREAMS)
    for s in STREAMS:
        for t in (0, 1, 17, 10**9):
            assert contract.seed(s, t) == reference_seed(42, s, t)
            assert contract.generator(s, t).initial_seed() == reference_seed(42, s, t)


def test_generator_needs_no_stored_state():
    contract = RngContract(9, STREAMS)
    forward = {t: draws(contract, "augment", t) for t in (3, 5)}
    backward = {t: draws(contract, "augment", t) for t in (5, 3)}
    for t in (3, 5):
        assert torch.equal(forward[t], backward[t])
    # drawing from other streams or global state in between changes nothing
    torch.rand(100)
    draws(contract, "noise", 5)
    assert torch.equal(draws(contract, "augment", 5), forward[5])
    assert torch.equal(draws(RngContract(9, STREAMS), "augment", 3), forward[3])
    assert not torch.equal(forward[3], forward[5])


def test_generators_cover_every_stream_but_dropout():
    contract = RngContract(2, STREAMS)
    gens = contract.generators(4)
    assert list(gens) == [s for s in STREAMS if s != "dropout"]
    for s, g in gens.items():
        assert isinstance(g, torch.Generator) and g.device.type == "cpu"
        assert g.initial_seed() == contract.seed(s, 4)


def test_step_generators_are_made_on_first_lookup_and_refuse_unknown_streams():
    contract = RngContract(2, STREAMS)
    gens = contract.generators(4)
    first = gens["augment"]
    assert gens["augment"] is first  # one generator per stream and step: its draws continue
    assert torch.equal(first.get_state(), contract.generator("augment", 4).get_state())
    draws = torch.rand(5, generator=gens["noise"])
    assert torch.equal(draws, torch.rand(5, generator=contract.generator("noise", 4)))
    for bad in ("dropout", "nope"):
        with pytest.raises(KeyError, match="no generator for stream"):
            gens[bad]
    assert len(gens) == len(STREAMS) - 1 and "dropout" not in gens and "augment" in gens
    with pytest.raises(TypeError):
        gens["augment"] = torch.Generator()


def test_seed_global_makes_global_draws_a_function_of_step():
    contract = RngContract(5, STREAMS)
    dropout = torch.nn.Dropout(p=0.5)

    def step_draws(step):
        contract.seed_global(step)
        return torch.rand(16), dropout(torch.ones(64)), torch.randn(4)

    first = step_draws(7)
    torch.rand(1000)  # disturb the global generator
    again = step_draws(7)
    other = step_draws(8)
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    assert torch.initial_seed() == contract.seed("dropout", 8)


def test_seed_torch_globals_leaves_the_generators_as_torch_manual_seed_does():
    """The engine's cheap per-step seeding: the CPU generator's whole state (and, on a machine
    with CUDA, every device's) equals torch.manual_seed's, bit for bit."""
    for seed in (0, 1, 12345, 2**63 - 1, 2**64 - 1):
        torch.manual_seed(seed)
        expected = torch.get_rng_state()
        cuda_expected = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        torch.manual_seed(7)
        torch.rand(100)
        seed_torch_globals(seed)
        assert torch.equal(torch.get_rng_state(), expected)
        assert torch.initial_seed() == seed
        if cuda_expected is not None:
            assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_expected))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generators_and_global_seed():
    contract = RngContract(5, STREAMS)
    g = contract.generator("augment", 3, device="cuda")
    assert g.device.type == "cuda" and g.initial_seed() == contract.seed("augment", 3)
    contract.seed_global(3)
    assert torch.cuda.initial_seed() == contract.seed("dropout", 3)
    first = torch.rand(32, device="cuda")
    contract.seed_global(3)
    assert torch.equal(first, torch.rand(32, device="cuda"))


# ------------------------------------------------------------------------- re-seeding ----


def test_reseed_changes_one_stream_from_its_step_only():
    base = RngContract(11, STREAMS)
    forked = base.with_reseed("augment", 10, 1)
    assert base.reseeds == {}  # immutable: the parent is unchanged
    assert forked.reseeds == {"augment": ((10, 1),)}
    for t in range(30):
        for s in STREAMS:
            same = s != "augment" or t < 10
            assert (forked.seed(s, t) == base.seed(s, t)) is same, (s, t)
            assert torch.equal(draws(forked, s, t), draws(base, s, t)) is same, (s, t)
        if t >= 10:
            assert forked.seed("augment", t) == reference_seed(11, "augment#1", t)
    # the global (dropout) draws are untouched too
    base.seed_global(20)
    a = torch.rand(8)
    forked.seed_global(20)
    assert torch.equal(a, torch.rand(8))


def test_reseed_of_dropout_changes_global_draws_from_its_step():
    base = RngContract(11, STREAMS)
    forked = base.with_reseed("dropout", 5, 3)
    for t, same in ((4, True), (5, False), (9, False)):
        base.seed_global(t)
        a = torch.rand(8)
        forked.seed_global(t)
        assert torch.equal(a, torch.rand(8)) is same


def test_reseed_of_a_reseed_keeps_the_parent_segment():
    parent = RngContract(1, STREAMS).with_reseed("order", 10, 1)
    child = parent.with_reseed("order", 20, 2)
    assert child.reseeds == {"order": ((10, 1), (20, 2))}
    for t in range(30):
        expected = "order" if t < 10 else "order#1" if t < 20 else "order#2"
        assert child.seed("order", t) == reference_seed(1, expected, t)
        assert (child.seed("order", t) == parent.seed("order", t)) is (t < 20)
    # a re-seed from an earlier step supersedes the later ones
    earlier = child.with_reseed("order", 5, 3)
    assert earlier.reseeds == {"order": ((5, 3),)}
    # reusing a salt still in effect would repeat draws already made: refused
    with pytest.raises(ValueError, match="salt"):
        child.with_reseed("order", 25, 1)
    with pytest.raises(ValueError, match="salt"):
        parent.with_reseed("order", 15, 1)


@pytest.mark.parametrize(
    "reseeds",
    [{"order": (1,)}, {"order": (-1, 2)}, {"order": (1, -2)}, {"order": ((1, 2), (1, 3))}, {"order": "ab"},
     {"order": []}, {"order": (1.0, 2)}, [("order", (1, 2))]],
)
def test_bad_reseeds(reseeds):
    with pytest.raises((ValueError, TypeError)):
        RngContract(1, reseeds=reseeds)


def test_reseeds_accept_a_pair_or_segments():
    assert RngContract(1, reseeds={"order": (3, 1)}) == RngContract(1, reseeds={"order": [[3, 1]]})
    assert RngContract(1, reseeds={"order": [(8, 2), (3, 1)]}).reseeds == {"order": ((3, 1), (8, 2))}


# ------------------------------------------------------------------------- JSON ----


def test_json_round_trip():
    contract = RngContract(2**40 + 3, STREAMS).with_reseed("noise", 4, 7).with_reseed("order", 2, 1)
    d = contract.to_json()
    text = json.dumps(d)
    back = RngContract.from_json(json.loads(text))
    assert back == contract and hash(back) == hash(contract)
    assert d["version"] == CONTRACT_VERSION == 1
    assert d["streams"] == list(STREAMS)
    assert d["reseeds"] == {"noise": [[4, 7]], "order": [[2, 1]]}
    assert "sha256" in d["derivation"]
    for s in STREAMS:
        for t in range(8):
            assert back.seed(s, t) == contract.seed(s, t)


def test_equality():
    assert RngContract(1) == RngContract(1)
    assert RngContract(1) != RngContract(2)
    assert RngContract(1) != RngContract(1, ("noise",))
    assert RngContract(1) != RngContract(1).with_reseed("order", 0, 1)
    assert RngContract(1) != "RngContract(1)"


@pytest.mark.parametrize(
    "change, match",
    [
        ({"version": 2}, "version"),
        ({"version": None}, "version"),
        ({"extra": 1}, "unknown"),
        ({"streams": ["noise"]}, "built-in"),
        ({"run_seed": -3}, "run_seed"),
    ],
)
def test_from_json_refuses_what_it_cannot_read(change, match):
    d = RngContract(1, ("noise",)).to_json()
    d.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        RngContract.from_json(d)


def test_from_json_refuses_missing_fields():
    d = RngContract(1).to_json()
    del d["run_seed"]
    with pytest.raises(ValueError, match="missing"):
        RngContract.from_json(d)
    with pytest.raises(TypeError):
        RngContract.from_json([1, 2])


# ------------------------------------------------------------------------- fresh process ----

CHILD = r"""
import json, sys, torch
from replay.rng import RngContract
contract = RngContract.from_json(json.loads(sys.argv[1]))
out = {"seeds": {s: [contract.seed(s, t) for t in range(0, 40, 3)] for s in contract.streams}}
out["draws"] = torch.rand(5, generator=contract.generator("augment", 6)).tolist()
contract.seed_global(6)
out["global"] = torch.rand(5).tolist()
print(json.dumps(out))
"""


def test_seeds_and_draws_are_the_same_in_a_fresh_process():
    contract = RngContract(77, STREAMS).with_reseed("noise", 9, 4)
    env = dict(os.environ, PYTHONHASHSEED="12345")  # str hashing differs from this process's
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(contract.to_json())],
        capture_output=True, text=True, env=env, check=True,
    )
    child = json.loads(result.stdout)
    assert child["seeds"] == {s: [contract.seed(s, t) for t in range(0, 40, 3)] for s in STREAMS}
    assert child["draws"] == torch.rand(5, generator=contract.generator("augment", 6)).tolist()
    contract.seed_global(6)
    assert child["global"] == torch.rand(5).tolist()
