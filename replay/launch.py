"""`--nproc N`: run a `replay` command as N processes on this machine, each joining one world
with `--distributed` (replay/distributed.py), and stop them all when one dies. It imports no
torch: the launcher only starts, watches and stops the ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

__all__ = ["launch", "without_nproc"]

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In a rank, before it runs: on Linux, be killed when the launcher dies (kill -9 of the
    launcher leaves no rank running on, writing a run nobody waits for)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def without_nproc(argv: list[str]) -> list[str]:
    """The command line with `--nproc N` (or `--nproc=N`) taken out."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(argv: list[str], nproc: int) -> int:
    """Run `replay ARGV --distributed` as `nproc` processes on this machine (gloo over
    127.0.0.1) and return rank 0's exit status. When one process dies (killed, or an error on a
    rank other than 0), the others are stopped: they would wait for it forever. Each rank runs
    with OMP_NUM_THREADS=1 unless it is set (as torchrun does): the thread count is part of the
    recorded environment, so a replay must use the same."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc {nproc!r}: must be a positive int")
    port = _free_port()
    processes = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env.setdefault("OMP_NUM_THREADS", "1")
        command = [sys.executable, "-m", "replay.cli", *without_nproc(argv), "--distributed"]
        # A follower's errors are shown only when its failure is the one reported: an error every
        # rank meets (a refused input) is rank 0's to report, once.
        processes.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                          stderr=None if rank == 0 else subprocess.PIPE,
                                          preexec_fn=_die_with_parent))
    errors = {rank: [] for rank in range(1, nproc)}
    readers = [threading.Thread(target=lambda p=p, sink=errors[r]: sink.append(p.stderr.read()), daemon=True)
               for r, p in enumerate(processes) if r > 0]
    for reader in readers:
        reader.start()
    interrupted = False
    failed: list[int] = []
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if codes[0] is not None or failed:
                break
            time.sleep(0.05)
        # Rank 0 done (its followers exit on its word) or another rank failed (rank 0 fails soon
        # after, or waits for it forever): give them a moment, then stop them.
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(p.poll() is None for p in processes):
            time.sleep(0.05)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        killed = set()
        for rank, p in enumerate(processes):
            if p.poll() is None:
                p.kill()
                killed.add(rank)
        for p in processes:
            p.wait()
        for reader in readers:
            reader.join(timeout=5)
    codes = [p.returncode for p in processes]

    def show(rank: int) -> None:
        text = b"".join(errors.get(rank, [])).decode(errors="replace")
        if text:
            sys.stderr.write(text if text.endswith("\n") else text + "\n")

    if interrupted:
        return 130
    if codes[0] == 0 and 0 not in killed:
        # Rank 0 completed the command, every collective of it included: every other rank took
        # part to the end, so the result stands; a rank that failed afterwards (tearing down its
        # connections) is said, not counted.
        for rank in range(1, nproc):
            if codes[rank]:
                show(rank)
                print(f"replay: warning: rank {rank} of {nproc} exited with status {codes[rank]} after the command "
                      "completed on rank 0 (the result is complete)", file=sys.stderr)
        return 0
    if failed and 0 not in failed:  # another rank died first: rank 0 failed for it or waited for it
        bad = failed[0]
        show(bad)
        print(f"replay: error: rank {bad} of {nproc} exited with status {codes[bad]}; the other ranks "
              "were stopped (a recording stays resumable: `replay resume RUN --nproc "
              f"{nproc}`)", file=sys.stderr)
        return 1
    return codes[0] if codes[0] >= 0 else 128 - codes[0]
