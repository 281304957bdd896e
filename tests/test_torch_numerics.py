"""numerics="torch": replay.optim computes exactly torch.optim's bits on this machine's CPU,
over the option grid and sizes of tests/numerics_grid.py, with 1 and 2 threads, at this
machine's CPU capability and under ATEN_CPU_CAPABILITY=default."""

import json
import os
import subprocess
import sys

import pytest
import torch

import numerics_grid
import replay

CASES = list(numerics_grid.all_cases())


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_matches_torch_optim(name, kw, threads):
    assert numerics_grid.compare(name, kw) == []


# Under the default (non-vectorized) capability, sizes up to 65,537: past 2^16 elements, the
# largest kernel-dispatch boundary (replay's kernels split across threads above it), the code
# paths are the ones the 1,000,003-element case takes, which the in-process grid above runs at
# this machine's capability. Dropping it here took 160 s off the suite on the 2-core machine.
DEFAULT_CAPABILITY_MAX_SIZE = 65537


@pytest.mark.parametrize("threads", [1, 2])
def test_matches_torch_optim_at_default_capability(threads):
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [sys.executable, os.path.join(here, "numerics_grid.py"), str(threads), str(DEFAULT_CAPABILITY_MAX_SIZE)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["capability"] == "DEFAULT"
    assert max(result["sizes"]) == DEFAULT_CAPABILITY_MAX_SIZE > 2**16
    assert result["mismatches"] == []


def test_foreach_path_is_the_same_arithmetic():
    """torch's foreach=True CPU path: the same bits as replay's torch numerics."""
    kw = dict(lr=0.01, weight_decay=0.1, foreach=True)
    assert numerics_grid.compare("AdamW", kw, sizes=(7, 1000, 65537)) == []
    assert numerics_grid.compare("SGD", dict(lr=0.01, momentum=0.9, foreach=True), sizes=(7, 1000)) == []


def test_grid_detects_a_difference():
    """The comparison can fail: a different hyperparameter on one side is reported."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(100, generator=generator).requires_grad_()
    b = a.detach().clone().requires_grad_()
    ours = replay.optim.AdamW([a], numerics="torch", lr=0.01)
    theirs = torch.optim.AdamW([b], lr=0.01, eps=1e-7)
    g = torch.randn(100, generator=generator)
    a.grad, b.grad = g.clone(), g.clone()
    ours.step()
    theirs.step()
    assert not torch.equal(a.view(torch.int32), b.view(torch.int32))
