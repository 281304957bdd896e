#!/usr/bin/env python3
"""Compiles every csrc/cuda/*.cu to PTX with nvcc and checks the floating-point code in it.

Needs nvcc only, no GPU and no CUDA build of torch, so it runs in CPU-only CI. The rules come
from shared/notes/numerics.md ("A portable recipe"): CPU and CUDA kernels give the same bits
only if every fused multiply-add is one the source asks for and every sqrt/division is IEEE.

Checks, per PTX file:
  * every floating-point fma/mad instruction comes (by its `.loc` file/line) from a source
    line marked FMA_SITE (csrc/kernels/common.h), and there is at least one, so the check is
    known to be looking at the right thing;
  * every f32 add/sub/mul carries an explicit rounding modifier (`.rn`): the PTX spec lets
    ptxas (or the driver's JIT) contract unmodified mul/add pairs into FMAs, never these;
  * no `.ftz` (flush-to-zero) anywhere, no `.approx` and no `div.full` on floating point;
  * the expected kernels are there.

Usage:
    python tools/check_cuda_sources.py                # all csrc/cuda/*.cu
    python tools/check_cuda_sources.py FILE.cu ...    # given sources
    python tools/check_cuda_sources.py --ptx FILE.ptx # an existing PTX file

Exit status 0 when everything passes, 1 otherwise. Without nvcc it says so and exits 0, unless
REPLAY_REQUIRE_NVCC=1 (CI sets it), which makes a missing nvcc a failure. nvcc is looked for on
PATH, then in $CUDA_HOME, $CUDA_PATH and /usr/local/cuda; REPLAY_NVCC=/path/to/nvcc overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, "csrc")

# The numerics flags must match setup.py's NVCC_FLAGS (tests/test_cuda_sources.py checks it).
# -lineinfo makes nvcc emit the .loc directives the FMA attribution needs.
NVCC_FLAGS = (
    "--ptx",
    "-lineinfo",
    "--fmad=false",
    "-prec-div=true",
    "-prec-sqrt=true",
    "-ftz=false",
    "-std=c++17",
)
DEFAULT_ARCH = "sm_90"

FMA_MARK = "FMA_SITE"

# Kernels each source must define (substrings of the mangled .entry names).
EXPECTED_KERNELS = {
    "kernels.cu": (
        "fingerprint_sums_kernel",
        "sgd_step_kernel",
        "adam_step_kernel",
        "ema_update_kernel",
        "bandwidth_yardstick_kernel",
    ),
}

FLOAT_TYPES = {"f16", "f16x2", "bf16", "bf16x2", "f32", "f32x2", "f64"}
ROUNDING = {"rn", "rz", "rm", "rp", "rna"}

_FILE_RE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]*)"')
_LOC_RE = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)")
_ENTRY_RE = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+([A-Za-z_$][\w$]*)")
# An instruction: optional guard predicate, then the opcode with its dot-separated modifiers.
_INSTR_RE = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*)\s")


class NvccMissing(RuntimeError):
    pass


@dataclasses.dataclass
class Report:
    """What check_ptx found in one PTX file."""

    name: str
    problems: list = dataclasses.field(default_factory=list)
    kernels: list = dataclasses.field(default_factory=list)
    fma_count: int = 0
    fma_sites: set = dataclasses.field(default_factory=set)  # (source path, line)
    sqrt_count: int = 0
    div_count: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def find_nvcc() -> str | None:
    """nvcc's path, or None. REPLAY_NVCC, when set, is the only place looked at."""
    if "REPLAY_NVCC" in os.environ:
        path = os.environ["REPLAY_NVCC"]
        return path if path and os.access(path, os.X_OK) else None
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return None


def compile_to_ptx(source: str, out_dir: str, *, nvcc: str | None = None,
                   flags: tuple = NVCC_FLAGS, arch: str = DEFAULT_ARCH,
                   include_dirs: tuple = (CSRC,)) -> str:
    """Compiles `source` to PTX in `out_dir` and returns the PTX file's path."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise NvccMissing("nvcc not found (looked on PATH, $CUDA_HOME, $CUDA_PATH, /usr/local/cuda)")
    ptx = os.path.join(out_dir, os.path.splitext(os.path.basename(source))[0] + ".ptx")
    cmd = [nvcc, *flags, f"-arch={arch}"]
    cmd += [f"-I{d}" for d in include_dirs]
    cmd += [os.path.abspath(source), "-o", ptx]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n$ {' '.join(cmd)}\n{result.stdout}{result.stderr}")
    return ptx


class _SourceLines:
    """Source lines by (path, 1-based line), read once per file."""

    def __init__(self, base_dir: str):
        self.base_dir = base_dir
        self.cache: dict = {}

    def get(self, path: str, line: int) -> str | None:
        full = path if os.path.isabs(path) else os.path.join(self.base_dir, path)
        if full not in self.cache:
            try:
                with open(full, encoding="utf-8", errors="replace") as f:
                    self.cache[full] = f.read().splitlines()
            except OSError:
                self.cache[full] = None
        lines = self.cache[full]
        if lines is None or not 1 <= line <= len(lines):
            return None
        return lines[line - 1]


def check_ptx(ptx_text: str, *, name: str = "<ptx>", expected_kernels: tuple = (),
              require_fma: bool = True, source_dir: str = REPO) -> Report:
    """Checks PTX text against the rules in this module's docstring.

    Relative paths in `.file` directives are read relative to `source_dir`.
    """
    report = Report(name)
    lines = ptx_text.splitlines()
    # nvcc writes the .file table at the end of the PTX, after the .loc lines that use it.
    files = {int(m.group(1)): m.group(2) for m in map(_FILE_RE.match, lines) if m}
    sources = _SourceLines(source_dir)
    loc = None  # (file id, line) of the latest .loc: the source of the next instructions
    for number, text in enumerate(lines, start=1):
        if _FILE_RE.match(text):
            continue
        m = _LOC_RE.match(text)
        if m:
            loc = (int(m.group(1)), int(m.group(2)))
            continue
        m = _ENTRY_RE.match(text)
        if m:
            report.kernels.append(m.group(1))
            continue
        m = _INSTR_RE.match(text)
        if not m:
            continue
        opcode = m.group(1)
        parts = opcode.split(".")
        base, modifiers = parts[0], set(parts[1:])
        is_float = bool(modifiers & FLOAT_TYPES)
        where = f"{name}:{number}: `{text.strip()}`"
        if "ftz" in modifiers:
            report.problems.append(f"{where}: flush-to-zero (.ftz) changes subnormal results")
        if not is_float:
            continue
        if "approx" in modifiers or (base == "div" and "full" in modifiers):
            report.problems.append(f"{where}: approximate floating-point {base} is not IEEE")
        if base == "sqrt":
            report.sqrt_count += 1
        if base == "div":
            report.div_count += 1
        if base in ("add", "sub", "mul") and not modifiers & ROUNDING:
            report.problems.append(
                f"{where}: {base} without an explicit rounding modifier may be contracted into "
                "an FMA by ptxas or the driver JIT (compile with --fmad=false)")
        if base in ("fma", "mad"):
            report.fma_count += 1
            report.problems.extend(_check_fma_site(where, loc, files, sources, report))
    if require_fma and report.fma_count == 0:
        report.problems.append(
            f"{name}: no fma instruction at all: the FMA_SITE check saw nothing to check "
            "(is kFused still used? did the kernels move?)")
    for kernel in expected_kernels:
        if not any(kernel in entry for entry in report.kernels):
            report.problems.append(f"{name}: expected kernel {kernel!r} not found among "
                                   f"{len(report.kernels)} .entry functions")
    return report


def _check_fma_site(where, loc, files, sources, report):
    if loc is None:
        return [f"{where}: fma without a .loc line (compile with -lineinfo) cannot be attributed"]
    file_id, line = loc
    path = files.get(file_id)
    if path is None:
        return [f"{where}: fma attributed to unknown .file {file_id}"]
    source = sources.get(path, line)
    if source is None:
        return [f"{where}: fma attributed to {path}:{line}, which cannot be read"]
    if FMA_MARK not in source:
        return [f"{where}: fma from {path}:{line}, a line not marked {FMA_MARK}: `{source.strip()}`"]
    report.fma_sites.add((path, line))
    return []


def check_source(source: str, out_dir: str, **compile_kwargs) -> Report:
    ptx = compile_to_ptx(source, out_dir, **compile_kwargs)
    with open(ptx, encoding="utf-8") as f:
        text = f.read()
    expected = EXPECTED_KERNELS.get(os.path.basename(source), ())
    return check_ptx(text, name=os.path.relpath(source, REPO) if source.startswith(REPO) else source,
                     expected_kernels=expected, source_dir=os.path.dirname(os.path.abspath(source)))


def print_report(report: Report) -> None:
    status = "ok" if report.ok else f"FAILED ({len(report.problems)} problems)"
    print(f"{report.name}: {status}")
    print(f"  kernels: {len(report.kernels)}; fma: {report.fma_count} at "
          f"{len(report.fma_sites)} marked source line(s); sqrt: {report.sqrt_count}; "
          f"div: {report.div_count}")
    for path, line in sorted(report.fma_sites):
        print(f"  fma site: {os.path.relpath(path, REPO) if path.startswith(REPO) else path}:{line}")
    shown = report.problems[:50]
    for problem in shown:
        print(f"  problem: {problem}")
    if len(report.problems) > len(shown):
        print(f"  ... and {len(report.problems) - len(shown)} more")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", help=".cu files (default: csrc/cuda/*.cu)")
    parser.add_argument("--ptx", action="append", default=[], help="check an existing PTX file")
    parser.add_argument("--arch", default=DEFAULT_ARCH)
    parser.add_argument("--keep", metavar="DIR", help="write the PTX files to DIR")
    args = parser.parse_args(argv)

    reports = []
    for ptx in args.ptx:
        with open(ptx, encoding="utf-8") as f:
            reports.append(check_ptx(f.read(), name=ptx))

    sources = args.sources or ([] if args.ptx else sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))))
    if not args.ptx and not sources:
        print("check_cuda_sources: no csrc/cuda/*.cu files found: nothing to check", file=sys.stderr)
        return 1
    if sources:
        nvcc = find_nvcc()
        if nvcc is None:
            required = os.environ.get("REPLAY_REQUIRE_NVCC") == "1"
            print("check_cuda_sources: nvcc not found (REPLAY_NVCC, PATH, $CUDA_HOME, $CUDA_PATH, "
                  "/usr/local/cuda); "
                  + ("REPLAY_REQUIRE_NVCC=1, so this is a failure" if required
                     else "skipping the CUDA source check (set REPLAY_REQUIRE_NVCC=1 to fail)"))
            return 1 if required else 0
        print(f"check_cuda_sources: {nvcc} {' '.join(NVCC_FLAGS)} -arch={args.arch}")
        with tempfile.TemporaryDirectory() as tmp:
            out_dir = args.keep or tmp
            os.makedirs(out_dir, exist_ok=True)
            for source in sources:
                try:
                    reports.append(check_source(source, out_dir, nvcc=nvcc, arch=args.arch))
                except RuntimeError as e:
                    report = Report(source)
                    report.problems.append(str(e))
                    reports.append(report)

    for report in reports:
        print_report(report)
    failed = [r.name for r in reports if not r.ok]
    print("check_cuda_sources: " + (f"FAILED: {', '.join(failed)}" if failed else "all checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
