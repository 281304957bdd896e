"""The CUDA sources compile to PTX whose floating-point code follows the portable recipe
(tools/check_cuda_sources.py), and the checker itself can fail.

Needs nvcc, not a GPU: runs in CPU-only CI. The PTX-parsing tests need neither.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "check_cuda_sources.py")


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_cuda_sources", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


checker = _load_checker()

# CI sets REPLAY_REQUIRE_NVCC=1: there a missing nvcc fails these tests instead of skipping them.
needs_nvcc = pytest.mark.skipif(
    checker.find_nvcc() is None and os.environ.get("REPLAY_REQUIRE_NVCC") != "1",
    reason="nvcc not found",
)


def _run_tool(*args, env=None):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO)


# ------------------------------------------------------------------ PTX parsing, no nvcc ----

def _ptx(body: str, source: str) -> str:
    """A minimal PTX module whose .file 1 is `source` (nvcc puts .file after the code)."""
    return textwrap.dedent(body) + f'\n\t.file\t1 "{source}"\n'


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "k.cu"
    path.write_text("line one\n"
                    "  return __fmaf_rn(a, b, c);  // FMA_SITE\n"
                    "  x = a * b + c;\n")
    return str(path)


def test_marked_fma_passes(source):
    ptx = _ptx("""
        .visible .entry my_kernel(
        \t.loc\t1 2 5
        \tfma.rn.f32 \t%f4, %f1, %f2, %f3;
        \tmul.rn.f32 \t%f5, %f1, %f2;
        \tadd.rn.f32 \t%f6, %f5, %f3;
        \tsqrt.rn.f32 \t%f7, %f6;
        \tdiv.rn.f32 \t%f8, %f7, %f6;
        """, source)
    report = checker.check_ptx(ptx, expected_kernels=("my_kernel",))
    assert report.ok, report.problems
    assert report.fma_count == 1 and report.fma_sites == {(source, 2)}
    assert (report.sqrt_count, report.div_count) == (1, 1)


def test_unmarked_fma_fails(source):
    ptx = _ptx("""
        \t.loc\t1 3 5, function_name $L__info_string0, inlined_at 1 1 1
        \t@%p1 fma.rn.f32 \t%f4, %f1, %f2, %f3;
        """, source)
    report = checker.check_ptx(ptx)
    assert not report.ok
    assert any("not marked FMA_SITE" in p and "x = a * b + c" in p for p in report.problems)


@pytest.mark.parametrize("instruction, message", [
    ("fma.rn.ftz.f32 \t%f4, %f1, %f2, %f3;", "flush-to-zero"),
    ("sqrt.approx.f32 \t%f2, %f1;", "approximate"),
    ("div.approx.f32 \t%f3, %f1, %f2;", "approximate"),
    ("div.full.f32 \t%f3, %f1, %f2;", "approximate"),
    ("rsqrt.approx.f32 \t%f2, %f1;", "approximate"),
    ("mul.f32 \t%f3, %f1, %f2;", "explicit rounding"),
    ("add.f32 \t%f3, %f1, %f2;", "explicit rounding"),
])
def test_non_ieee_instructions_fail(source, instruction, message):
    ptx = _ptx(f"""
        \t.loc\t1 2 5
        \tfma.rn.f32 \t%f9, %f1, %f2, %f3;
        \t{instruction}
        """, source)
    report = checker.check_ptx(ptx)
    assert any(message in p for p in report.problems), report.problems


def test_integer_and_f64_division_are_not_flagged(source):
    ptx = _ptx("""
        \t.loc\t1 2 5
        \tfma.rn.f32 \t%f9, %f1, %f2, %f3;
        \tdiv.u64 \t%rd3, %rd1, %rd2;
        \tmul.lo.s64 \t%rd4, %rd1, %rd2;
        \tadd.s64 \t%rd5, %rd1, %rd2;
        """, source)
    assert checker.check_ptx(ptx).ok


def test_fma_without_loc_fails(source):
    report = checker.check_ptx(_ptx("\tfma.rn.f32 \t%f4, %f1, %f2, %f3;\n", source))
    assert any("-lineinfo" in p for p in report.problems)


def test_no_fma_at_all_fails(source):
    report = checker.check_ptx(_ptx("\tadd.rn.f32 \t%f3, %f1, %f2;\n", source))
    assert any("no fma instruction" in p for p in report.problems)


def test_missing_kernel_fails(source):
    ptx = _ptx("\t.loc\t1 2 5\n\tfma.rn.f32 \t%f4, %f1, %f2, %f3;\n", source)
    report = checker.check_ptx(ptx, expected_kernels=("adam_step_kernel",))
    assert any("adam_step_kernel" in p for p in report.problems)


def test_setup_py_uses_the_checked_numerics_flags():
    """The extension is built with the flags the checker compiles with."""
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"NVCC_FLAGS\s*=\s*\[(.*?)\]", text, re.S)
    assert match, "setup.py has no NVCC_FLAGS list"
    build_flags = set(re.findall(r'"([^"]+)"', match.group(1)))
    for flag in ("--fmad=false", "-prec-div=true", "-prec-sqrt=true", "-ftz=false"):
        assert flag in checker.NVCC_FLAGS
        assert flag in build_flags, f"setup.py's NVCC_FLAGS lack {flag}"
    assert "fast_math" not in text and "fast-math\"" not in match.group(1)


def test_missing_nvcc_is_a_skip_unless_required():
    missing = {"REPLAY_NVCC": ""}
    result = _run_tool(env={**missing, "REPLAY_REQUIRE_NVCC": "0"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nvcc not found" in result.stdout
    result = _run_tool(env={**missing, "REPLAY_REQUIRE_NVCC": "1"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "REPLAY_REQUIRE_NVCC=1" in result.stdout


# ------------------------------------------------------------------------- with nvcc ----

@needs_nvcc
def test_repo_cuda_sources_pass(tmp_path):
    sources = sorted(p for p in os.listdir(os.path.join(REPO, "csrc", "cuda")) if p.endswith(".cu"))
    assert sources, "no csrc/cuda/*.cu"
    for name in sources:
        report = checker.check_source(os.path.join(REPO, "csrc", "cuda", name), str(tmp_path))
        assert report.ok, "\n".join(report.problems[:20])
        assert report.fma_count > 0
        # Every fma comes from the one marked line in csrc/kernels/common.h.
        assert {os.path.relpath(path, REPO) for path, _ in report.fma_sites} == {
            os.path.join("csrc", "kernels", "common.h")}


@needs_nvcc
def test_tool_exit_code_on_repo():
    result = _run_tool()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout


UNMARKED = """
__global__ void unmarked(float* x) {
  x[0] = x[1] * x[2] + x[3];
}
"""

MARKED = """
__global__ void marked(float* x) {
  x[0] = __fmaf_rn(x[1], x[2], x[3]);  // FMA_SITE
  x[4] = x[5] * x[6] + x[7];
  x[8] = sqrtf(x[9]) / x[10];
}
"""


def _flags(**replace):
    flags = list(checker.NVCC_FLAGS)
    for old, new in replace.items():
        flags = [new if f == old else f for f in flags]
    return tuple(flags)


@needs_nvcc
def test_contracted_fma_is_flagged(tmp_path):
    """The negative control: with --fmad=true nvcc turns an unmarked a*b+c into an fma."""
    source = tmp_path / "unmarked.cu"
    source.write_text(UNMARKED)
    report = checker.check_source(str(source), str(tmp_path),
                                  flags=_flags(**{"--fmad=false": "--fmad=true"}))
    assert report.fma_count == 1
    assert not report.ok
    assert any("not marked FMA_SITE" in p for p in report.problems)
    # ... and the command-line tool fails on it too.
    result = _run_tool("--ptx", str(tmp_path / "unmarked.ptx"))
    assert result.returncode == 1 and "FAILED" in result.stdout


@needs_nvcc
def test_marked_fma_passes_and_fast_math_is_flagged(tmp_path):
    source = tmp_path / "marked.cu"
    source.write_text(MARKED)
    report = checker.check_source(str(source), str(tmp_path))
    assert report.ok, report.problems
    assert report.fma_count == 1 and (report.sqrt_count, report.div_count) == (1, 1)

    # Without the explicit numerics flags (they would override what fast math implies).
    fast_math = tuple(f for f in checker.NVCC_FLAGS
                      if not f.startswith(("--fmad", "-prec-", "-ftz"))) + ("-use_fast_math",)
    report = checker.check_source(str(source), str(tmp_path), flags=fast_math)
    assert any("flush-to-zero" in p for p in report.problems)
    assert any("approximate" in p for p in report.problems)
    assert any("not marked FMA_SITE" in p for p in report.problems)

    report = checker.check_source(str(source), str(tmp_path),
                                  flags=_flags(**{"-prec-div=true": "-prec-div=false"}))
    assert any("approximate floating-point div" in p for p in report.problems)
