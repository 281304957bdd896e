"""Gradient-norm clipping (issue 10): a norm whose additions are ordered by the data alone, the
same for 1, 2 and 4 threads and equal to the correctly rounded norm; Program.clip_grad_norm in
the default step records it per step, and a clipped run replays bit for bit."""

import math
from pathlib import Path

import pytest
import torch

import replay
from replay.clipping import clip_grad_norm_, grad_norm
from replay.session import RecordSession, ReplaySession
from replay.store import RunDir

PROGRAMS = Path(__file__).parent / "programs" / "clipped.py"


def _params(sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for n in sizes:
        p = torch.zeros(n, requires_grad=True)
        p.grad = torch.randn(n, generator=generator) * 3
        params.append(p)
    return params


@pytest.mark.parametrize("sizes", [[1], [1023, 1025], [70_000], [1_000_003, 5, 4096]])
def test_norm_is_exact_and_thread_independent(sizes):
    params = _params(sizes)
    before = torch.get_num_threads()
    try:
        norms = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            norms.append(grad_norm(params))
    finally:
        torch.set_num_threads(before)
    assert norms[0] == norms[1] == norms[2]
    exact = math.sqrt(math.fsum(x * x for p in params for x in p.grad.double().tolist()))
    assert norms[0] == pytest.approx(exact, rel=1e-15)


def test_clip_scales_only_above_the_norm():
    params = _params([100, 50])
    grads = [p.grad.clone() for p in params]
    norm = clip_grad_norm_(params, 1e9)  # within: untouched, bit for bit
    assert all(torch.equal(p.grad.view(torch.int32), g.view(torch.int32)) for p, g in zip(params, grads))
    assert clip_grad_norm_(params, 1.0) == norm
    assert grad_norm(params) == pytest.approx(1.0, rel=1e-5)
    skipped = torch.zeros(3, requires_grad=True)  # no gradient: skipped, as torch does
    assert clip_grad_norm_([skipped], 1.0) == 0.0
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="max_norm"):
            clip_grad_norm_(params, bad)


def test_program_refuses_bad_clip_values():
    for bad in (0, -1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="clip_grad_norm"):
            replay.Program(model=lambda: torch.nn.Linear(2, 2), dataset=(torch.zeros(4, 2), torch.zeros(4)),
                           loss=torch.nn.functional.mse_loss, clip_grad_norm=bad)
    with pytest.raises(ValueError, match="custom step"):
        replay.Program(model=lambda: torch.nn.Linear(2, 2), dataset=(torch.zeros(4, 2),), step=lambda ctx: None,
                       clip_grad_norm=1.0)


def test_clipped_run_records_the_norm_and_replays(tmp_path):
    clipped, plain = tmp_path / "clipped", tmp_path / "plain"
    RecordSession(f"{PROGRAMS}:clipped", clipped, seed=1, progress=False).run()
    RecordSession(f"{PROGRAMS}:unclipped", plain, seed=1, progress=False).run()
    with RunDir.open(clipped) as c, RunDir.open(plain) as p:
        rows, plain_rows = list(c.ledger.rows()), list(p.ledger.rows())
    norms = [r.metrics["grad_norm"] for r in rows]
    assert len(norms) == 20 and all(n > 0 and math.isfinite(n) for n in norms)
    assert sum(n > 0.5 for n in norms) >= 5  # clipping acted
    assert "grad_norm" not in plain_rows[0].metrics
    # the two runs are the same up to the first step whose norm exceeds 0.5, and differ from it on
    first = next(i for i, n in enumerate(norms) if n > 0.5 + 1e-6)
    assert all(a.digest == b.digest for a, b in zip(rows[:first], plain_rows[:first]))
    assert rows[first].loss == plain_rows[first].loss and rows[first].digest != plain_rows[first].digest
    assert ReplaySession(clipped).verify(progress=False).ok


def test_accumulation_splits_the_recorded_ids_and_replays(tmp_path):
    one, three = tmp_path / "one", tmp_path / "three"
    RecordSession(f"{PROGRAMS}:accumulate_1", one, seed=2, progress=False).run()
    RecordSession(f"{PROGRAMS}:accumulate_3", three, seed=2, progress=False).run()
    with RunDir.open(one) as a, RunDir.open(three) as b:
        rows_1, rows_3 = list(a.ledger.rows()), list(b.ledger.rows())
    # the same batches; the gradient is the whole batch's, summed in three parts: close, other bits
    assert [r.batch_ids for r in rows_1] == [r.batch_ids for r in rows_3]
    assert rows_3[0].loss == pytest.approx(rows_1[0].loss, rel=1e-5)
    assert rows_3[0].metrics["grad_norm"] == pytest.approx(rows_1[0].metrics["grad_norm"], rel=1e-4)
    assert rows_3[0].digest != rows_1[0].digest
    assert ReplaySession(three).verify(progress=False).ok


def test_micro_batches_cover_the_ids_in_order():
    from replay.program import StepContext, load_program

    program, _ = load_program(f"{PROGRAMS}:accumulate_3")
    for n in (32, 31, 3, 2, 1):
        ids = list(range(100, 100 + n))
        ctx = StepContext(step=0, epoch=0, ids=ids, batch=program.make_batch(ids), model=None, optimizer=None, scheduler=None,
                          ema=None, components={}, generators={}, program=program)
        parts = ctx.micro_batches()
        assert [i for part, _ in parts for i in part] == ids
        sizes = [len(part) for part, _ in parts]
        assert len(parts) == min(3, n) and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        for part, (x, y) in parts:
            assert torch.equal(x, program.make_batch(part)[0])


def test_program_refuses_bad_accumulate():
    for bad in (0, -1, 2.0, True, 33):
        with pytest.raises(ValueError, match="accumulate"):
            replay.Program(model=lambda: torch.nn.Linear(2, 2), dataset=(torch.zeros(40, 2), torch.zeros(40)),
                           loss=torch.nn.functional.mse_loss, accumulate=bad, batch_size=32)
