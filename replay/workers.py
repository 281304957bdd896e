"""Batches built in DataLoader worker processes, bit for bit the batches of the main process.

A step's batch is a pure function of its *plan*: the example ids (the order policy and any
data-order perturbation, functions of the step) and, for a dataset that runs code per example,
the seed each example is built under (RngContract.example_seed(step, id)) and the seed of the
collate call. `build_batch` turns a plan into a batch; the engine calls it in the main process
(Program.workers = 0) and `WorkerBatches` calls it in worker processes, so the number of workers
cannot change a bit:

* plans are made in the main process, by the engine, ahead of the step that uses them (the
  sampler below walks the steps from the one the engine is at; DataLoader prefetches
  `prefetch_factor` plans per worker);
* each worker seeds torch's, Python's and numpy's global generators from the plan before every
  example and before collate, as the main process does;
* examples are always built with one torch thread (a DataLoader worker runs one; the main
  process switches to one for the build), so an augmentation with a reduction adds in the same
  order wherever it runs;
* the batch comes back tagged with its step and ids, and the engine checks both against the
  step it runs; restoring the engine to another step restarts the iterator there.

Inter-process transport is DataLoader's own (tensors in shared memory); nothing is written.
"""

from __future__ import annotations

import itertools
import multiprocessing
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .rng import seed_all_globals


@dataclass(frozen=True)
class BatchPlan:
    """What determines a step's batch: the ids, and the seeds of each example and of collate
    (None for a tuple-of-tensors dataset, where no example code runs)."""

    step: int
    ids: tuple[int, ...]
    example_seeds: tuple[int, ...] | None
    collate_seed: int | None


@contextmanager
def one_thread():
    """torch with one intra-op thread inside the block (as in a DataLoader worker)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_batch(program, plan: BatchPlan):
    """The batch of a plan: the tuple-of-tensors dataset indexed, or each example built under
    its seed and collated under the collate seed, with one torch thread."""
    if plan.example_seeds is None:
        return program.make_batch(list(plan.ids))
    with one_thread():
        examples = []
        for i, seed in zip(plan.ids, plan.example_seeds):
            seed_all_globals(seed)
            examples.append(program.example(i))
        seed_all_globals(plan.collate_seed)
        return program.collate_examples(examples)


class _PlanError:
    """Stands in for a plan that could not be made ahead (e.g. a drop_examples perturbation
    that empties a batch): the engine makes that step's plan itself, raising the real error in
    its place, and a plan it can make is then built in the main process (the same bits)."""

    def __init__(self, step: int):
        self.step = step


class _Plans(torch.utils.data.Sampler):
    """The plans of the steps from `start` on, made by the engine (held weakly: the engine owns
    the loader, not the other way round)."""

    def __init__(self, engine):
        super().__init__()
        self._engine = weakref.ref(engine)
        self.start = 0

    def __iter__(self):
        for step in itertools.count(self.start):
            engine = self._engine()
            if engine is None:
                return
            try:
                plan = engine.rank_plan(step)  # this rank's share in a run of several processes
            except Exception:  # raised again, in its place, when the engine runs the step
                plan = _PlanError(step)
            del engine  # not held while suspended
            yield plan


class _BuildFailed:
    """What a worker returns when the program's example or collate code raised: the engine then
    builds that batch in the main process, where the same error is raised with the program's own
    frames (as without workers), instead of DataLoader's re-raise with a traceback in a string."""

    def __init__(self, error: BaseException):
        self.description = f"{type(error).__name__}: {error}"


class _PlanDataset(torch.utils.data.Dataset):
    """A 'dataset' indexed by plans: item(plan) = (step, ids, batch)."""

    def __init__(self, program):
        self.program = program

    def __getitem__(self, plan):
        if isinstance(plan, _PlanError):
            return plan.step, None, None
        try:
            return plan.step, plan.ids, build_batch(self.program, plan)
        except Exception as error:
            return plan.step, plan.ids, _BuildFailed(error)


def _as_is(item):
    return item


class WorkerBatches:
    """The engine's batches from `workers` persistent DataLoader worker processes."""

    def __init__(self, engine, workers: int, prefetch_factor: int = 2):
        if "fork" not in multiprocessing.get_all_start_methods():
            raise RuntimeError("Program.workers needs the 'fork' start method (the workers inherit the program "
                               "instead of unpickling it), which this platform lacks; use workers=0")
        self._program = engine.program
        self._plans = _Plans(engine)
        # persistent workers keep the program's dataset and stay up across restarts;
        # batch_size=None: every sampled plan is one batch, passed through untouched (_as_is).
        self._loader = torch.utils.data.DataLoader(
            _PlanDataset(engine.program), sampler=self._plans, batch_size=None, collate_fn=_as_is,
            num_workers=workers, persistent_workers=True, prefetch_factor=prefetch_factor,
            multiprocessing_context="fork")
        self._iterator = None
        self._next = None

    def start(self, step: int) -> None:
        """(Re)start the stream of plans at `step` (forking the workers the first time)."""
        self._plans.start = step
        self._iterator = iter(self._loader)
        self._next = step

    def batch(self, plan: BatchPlan):
        """The batch of `plan`, built by a worker (restarting the stream of plans at plan.step
        if the engine is not at the step the stream expects)."""
        if self._iterator is None or self._next != plan.step:
            self.start(plan.step)
        step, ids, batch = next(self._iterator)
        self._next = step + 1
        if step == plan.step and ids is None:
            return build_batch(self._program, plan)
        if step != plan.step or ids != plan.ids:
            raise RuntimeError(f"a data-loader worker built the batch of step {step} (ids {list(ids or ())[:8]}...) "
                               f"where step {plan.step} was expected: the plans made ahead do not match the step's; "
                               "this is a bug in replay, please report it")
        if isinstance(batch, _BuildFailed):
            build_batch(self._program, plan)  # raises the program's error here, with its frames
            raise RuntimeError(f"a data-loader worker could not build the batch of step {step} ({batch.description}), "
                               "but the main process built it from the same plan: the dataset behaves differently "
                               "in a worker process (state set up after the workers started?); use workers=0")
        return batch

    def close(self) -> None:
        """Stop the worker processes."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
