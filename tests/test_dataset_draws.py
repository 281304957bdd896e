"""A dataset that draws random numbers in __getitem__ (torch, random, numpy) or in its collate
function replays bit for bit from any checkpoint: the engine seeds the global generators per
example from the RNG contract (example_seed(step, id)). Before, a replay drew from whatever state
the process was in, and even step 0 diverged."""

from pathlib import Path

import torch

from replay.engine import Engine
from replay.perturb import from_spec
from replay.program import load_program
from replay.session import RecordSession, ReplaySession

PROGRAM = f"{Path(__file__).parent / 'programs' / 'random_dataset.py'}:program"


def _engine(perturbations=()):
    program, _ = load_program(PROGRAM)
    return Engine(program, Engine.contract_for(program, 5), perturbations=perturbations)


def _same(a, b) -> bool:
    return all(torch.equal(x.view(torch.int32) if x.is_floating_point() else x, y.view(torch.int32) if y.is_floating_point() else y)
               for x, y in zip(a, b))


def test_random_dataset_replays_from_every_checkpoint(tmp_path):
    run = tmp_path / "run"
    RecordSession(PROGRAM, run, seed=5, progress=False).run()
    assert ReplaySession(run).verify(progress=False).ok
    for start in (8, 16):
        assert ReplaySession(run).verify(start, start + 4, progress=False).ok


def test_each_example_draws_from_its_own_seed():
    engine = _engine()
    x, _ = engine.make_batch(3, [10, 11, 12])
    torch.rand(100)  # whatever the global state is, the batch is the same
    again, _ = engine.make_batch(3, [10, 11, 12])
    assert torch.equal(x.view(torch.int32), again.view(torch.int32))
    # without the random batch-level scale (collate), an example's values depend on (step, id) only
    program = engine.program
    contract = engine.contract
    from replay.rng import seed_all_globals

    seed_all_globals(contract.example_seed(3, 11))
    alone = program.example(11)[0]
    seed_all_globals(contract.example_seed(3, 11))
    assert torch.equal(alone, program.example(11)[0])
    other_step, _ = engine.make_batch(4, [10, 11, 12])
    assert not torch.equal(x, other_step)  # another step, other draws


def test_redraw_of_augment_changes_the_examples_only_in_its_window():
    plain, redrawn = _engine(), _engine([from_spec({"name": "redraw", "stream": "augment"}, start=6, window=2)])
    for step in range(4, 10):
        same = _same(plain.make_batch(step, [1, 2, 3]), redrawn.make_batch(step, [1, 2, 3]))
        assert same == (not 6 <= step < 8), step


def test_recompute_bn_over_a_random_dataset_replays(tmp_path):
    """recompute_bn's pass over the data runs after the global generators are seeded from the
    fork step's stream, so a dataset that draws in __getitem__ draws the same in a replay of the
    child, whatever state the forking process was in."""
    from replay.fork import ForkSession

    parent = tmp_path / "parent"
    RecordSession(PROGRAM.replace(":program", ":program_bn"), parent, seed=5, progress=False).run()
    child = tmp_path / "child"
    torch.rand(7)  # the fork's process is in some state of its own
    ForkSession(parent, 8, progress=False).fork(child, "recompute_bn:batches=3", steps=4)
    report = ReplaySession(child).verify(progress=False)
    assert report.ok, report.describe()
