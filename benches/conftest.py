"""Three modes for every bench.

* Measuring: `pytest benches/ --benchmark-only [--benchmark-json=results.json]` (or
  `--benchmark-enable`). Full sizes and rounds; figures in `benchmark.extra_info`;
  benches/tables.py prints the README's tables from the JSON.
* Smoke (anything else, e.g. CI's plain `pytest -q`, which collects benches/ through
  `testpaths`): pytest-benchmark's timing is disabled, so `benchmark.pedantic` calls its round
  once, and every bench picks tiny sizes from the `smoke` fixture. Every code path runs (the
  loops, the lockstep classification, the breakdown, the goal records, and tables.py on what
  they wrote: test_bench_tables.py) in well under a minute, so the benches cannot rot; their
  figures are checked for presence and finiteness only.
* Quick: `--benchmark-only --bench-quick`: the smoke sizes and one round, but measured and
  written to the JSON: to try the JSON -> tables path in a minute. Its figures mean nothing.
"""

from __future__ import annotations

import os

import pytest

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # pragma: no cover - an old venv made before the Makefile installed it
    pytest_benchmark = None

# What each bench wrote, in smoke mode: test_bench_tables.py renders it with tables.py.
SMOKE_RECORDS: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true", default=False,
                     help="benches: tiny sizes and one round even when measuring (to try the JSON -> tables path)")


def _measuring(config) -> bool:
    return bool(config.getoption("benchmark_only", False) or config.getoption("benchmark_enable", False))


def pytest_configure(config):
    # pytest-benchmark reads this option when its session is made, in its own (trylast)
    # pytest_configure, which runs after this one when benches/ is among the initial paths.
    if pytest_benchmark is not None and not _measuring(config):
        config.option.benchmark_disable = True


def pytest_collection_modifyitems(config, items):
    if pytest_benchmark is None:
        skip = pytest.mark.skip(reason="pytest-benchmark is not installed (make install, or pip install pytest-benchmark)")
        for item in items:
            if "benchmark" in getattr(item, "fixturenames", ()):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def smoke(pytestconfig) -> bool:
    """True unless measuring at full size: benches then use tiny sizes, few steps, one round."""
    return not _measuring(pytestconfig) or bool(pytestconfig.getoption("bench_quick", False))


@pytest.fixture(autouse=True)
def _one_thread_in_smoke_mode(pytestconfig):
    """Smoke mode runs torch on one thread (restored after each bench). It checks code paths,
    not speed, and on a shared machine torch's threads spin-wait for each other: the digits
    MLP's bare step took 109 ms with 2 threads and 5.4 ms with 1 while another job kept 2 cores
    busy (load average 3). Measuring runs keep torch's default, which the JSON records."""
    if _measuring(pytestconfig):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def benchmark(benchmark, pytestconfig, request):
    """pytest-benchmark's fixture, disabled in smoke mode even where this conftest was loaded
    after pytest-benchmark read its options (a path outside the initial ones). Each bench's
    extra_info also gets torch's thread count and the 1-minute load average at its start and
    end: other jobs on the cores inflate every figure, and tables.py says so."""
    import torch

    if not _measuring(pytestconfig):
        benchmark.disabled = True
    load_start = os.getloadavg()[0]
    yield benchmark
    benchmark.extra_info["machine"] = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                       "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                                       "load_start": load_start, "load_end": os.getloadavg()[0]}
    if benchmark.disabled and "goals" in benchmark.extra_info:  # the bench body completed
        SMOKE_RECORDS.append({"group": benchmark.group, "name": benchmark.name, "fullname": benchmark.fullname,
                              "params": benchmark.params, "param": benchmark.param,
                              "extra_info": dict(benchmark.extra_info)})
