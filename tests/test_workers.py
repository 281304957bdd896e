"""Program.workers: batches built in data-loader worker processes are the same bits as batches
built in the main process, for any number of workers, from any step (replay.workers).

The dataset draws from torch's, Python's and numpy's global generators in __getitem__ and in
collate (tests/programs/random_dataset.py), so a batch built under the wrong seed, in the wrong
order or for the wrong step changes the bits the ledger records."""

from pathlib import Path

import pytest
import torch

from replay.engine import Engine
from replay.fork import ForkSession
from replay.perturb import PerturbationRefused, from_spec
from replay.program import Program, load_program
from replay.session import RecordSession, ReplaySession
from replay.store import RunDir

from killing import kill_when_ready

HERE = Path(__file__).parent
SOURCE = HERE / "programs" / "random_dataset.py"
PROGRAMS = {n: f"{SOURCE}:{name}" for n, name in ((0, "program"), (1, "program_workers1"), (2, "program_workers2"))}


def rows(run):
    with RunDir.open(run) as r:
        return [(row.step, row.batch_hash, row.digest, row.loss) for row in r.ledger.rows()]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.is_floating_point() else t


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The program recorded with 0, 1 and 2 workers (24 steps, checkpoints every 8)."""
    root = tmp_path_factory.mktemp("workers")
    runs = {}
    for n, reference in PROGRAMS.items():
        runs[n] = root / f"w{n}"
        RecordSession(reference, runs[n], seed=3, progress=False).run()
    return runs


def test_any_number_of_workers_records_the_same_bits(recorded):
    expected = rows(recorded[0])
    assert len(expected) == 24 and len({r[1] for r in expected}) == 24
    for n in (1, 2):
        assert rows(recorded[n]) == expected, f"workers={n}"
    with RunDir.open(recorded[0]) as a, RunDir.open(recorded[2]) as b:
        for step in a.ledger.checkpoints():
            sa, sb = a.load_checkpoint(step), b.load_checkpoint(step)
            for name, t in sa["model"].items():
                assert torch.equal(bits(t), bits(sb["model"][name])), (step, name)


def test_a_workers_run_verifies_from_every_checkpoint(recorded):
    # each start restores a checkpoint and restarts the workers' stream of batches there
    for start, end in ((0, None), (8, 12), (16, None), (9, 20)):
        report = ReplaySession(recorded[2]).verify(start, end, progress=False)
        assert report.ok, report.describe()


def test_engine_restored_to_another_step_gets_that_steps_batches():
    program, _ = load_program(PROGRAMS[2])
    plain, _ = load_program(PROGRAMS[0])
    workers = Engine(program, Engine.contract_for(program, 3))
    direct = Engine(plain, Engine.contract_for(plain, 3))
    try:
        digests = [direct.run_step().digest for _ in range(12)]
        assert [workers.run_step().digest for _ in range(6)] == digests[:6]
        fresh = Engine(plain, Engine.contract_for(plain, 3))
        saved = [fresh.run_step() for _ in range(3)] and fresh.state_dict()
        workers.load_state_dict(saved)  # back to step 3: the prefetched batches of 6.. are not used
        assert [workers.run_step().digest for _ in range(9)] == digests[3:12]
    finally:
        workers.close()


def test_examples_are_built_with_one_torch_thread_everywhere():
    seen = {}

    class Threads(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.tensor([float(torch.get_num_threads())]), torch.tensor(0)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n in (0, 2):
            program = Program(model=lambda: torch.nn.Linear(1, 1), dataset=Threads(), loss=lambda o, t: o.sum(),
                              batch_size=4, steps=2, workers=n)
            engine = Engine(program, Engine.contract_for(program))
            seen[n] = engine.batch_from(engine.batch_plan(0))[0].flatten().tolist()
            engine.close()
        assert torch.get_num_threads() == 2  # the main process's count is restored after the build
    finally:
        torch.set_num_threads(before)
    assert seen == {0: [1.0] * 4, 2: [1.0] * 4}


def test_a_placebo_fork_of_a_workers_run_equals_its_parent(recorded, tmp_path):
    child = tmp_path / "placebo"
    ForkSession(recorded[2], 10, progress=False).fork(child, "placebo")
    parent = {r[0]: r for r in rows(recorded[2])}
    for row in rows(child):
        assert row == parent[row[0]], row[0]
    assert ReplaySession(child).verify(progress=False).ok


def test_data_order_forks_match_with_and_without_workers(recorded, tmp_path):
    for n in (0, 2):
        ForkSession(recorded[n], 6, progress=False).fork(tmp_path / f"swap{n}", "swap_windows:b=14", window=3)
    assert rows(tmp_path / "swap0") == rows(tmp_path / "swap2")
    assert rows(tmp_path / "swap0") != [r for r in rows(recorded[0]) if r[0] >= 6]


def test_a_batch_that_cannot_be_planned_ahead_fails_at_its_step_as_without_workers():
    errors = {}
    for n in (0, 2):
        program, _ = load_program(PROGRAMS[n])
        probe = Engine(program, Engine.contract_for(program, 3))
        emptied = probe.batch_plan(4).ids  # drop every example of step 4's batch
        probe.close()
        engine = Engine(program, Engine.contract_for(program, 3),
                        perturbations=[from_spec({"name": "drop_examples", "ids": list(emptied)}, start=0)])
        done = []
        with pytest.raises(PerturbationRefused) as error:
            for _ in range(8):
                done.append(engine.run_step().digest)
        engine.close()
        errors[n] = (done, str(error.value))
    assert len(errors[0][0]) == 4 and errors[0] == errors[2]


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2"])
def test_workers_must_be_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="Program.workers"):
        Program(model=lambda: torch.nn.Linear(1, 1), dataset=(torch.zeros(4, 1), torch.zeros(4)),
                loss=lambda o, t: o.sum(), batch_size=2, workers=bad)


def test_kill_9_of_a_workers_recording_resumes_bit_identically(recorded, tmp_path):
    out = tmp_path / "killed"
    kill_when_ready(tmp_path, 10, ["record", PROGRAMS[2], "--seed", "3", "--out", out, "--no-progress"],
                    step_sleep=0.005, after_ready=0.02)
    with RunDir.open(out) as run:
        assert not run.is_complete
    RecordSession.resume(out, progress=False, say=lambda message: None)
    assert rows(out) == rows(recorded[0])


class _Corrupt(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        if i == 13:
            raise KeyError("example 13 is corrupt")
        return torch.rand(4), torch.tensor(i % 2)


def test_an_error_in_the_dataset_is_raised_with_its_frames_as_without_workers():
    """A worker's failed build is built again in the main process, which raises the program's own
    exception with its frames at the step that holds the example (DataLoader would re-raise a
    copy whose traceback is a string)."""
    import traceback

    raised = {}
    for n in (0, 2):
        program = Program(model=lambda: torch.nn.Linear(4, 2), dataset=_Corrupt(),
                          loss=torch.nn.functional.cross_entropy, batch_size=8, steps=20, workers=n)
        engine = Engine(program, Engine.contract_for(program))
        steps = 0
        with pytest.raises(KeyError) as error:
            for _ in range(20):
                engine.run_step()
                steps += 1
        engine.close()
        frames = traceback.extract_tb(error.value.__traceback__)
        assert frames[-1].name == "__getitem__" and frames[-1].filename == __file__
        raised[n] = (steps, str(error.value))
    assert raised[0] == raised[2] and raised[0][1] == "'example 13 is corrupt'"
