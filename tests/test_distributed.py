"""Runs of several processes (replay.distributed): `--nproc 2` (gloo on the CPU) and torchrun's
`--distributed`, recorded, verified, forked and resumed bit for bit under the same world size,
refused under another, a rank killed with -9, ranks whose states part named by rank, and the
state after a step checked against the arithmetic done by hand."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from replay.distributed import shard_bounds
from replay.launch import without_nproc
from replay.rng import RngContract
from replay.store import RunDir

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = "tests/programs/ddp.py"


def replay_cli(*args, env=None, check=True):
    result = subprocess.run([sys.executable, "-m", "replay.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, **(env or {})}, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"replay {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr}")
    return result


def record(out, program="mlp", *extra, env=None):
    return replay_cli("record", f"{PROGRAMS}:{program}", "--out", out, "--no-progress", *extra, env=env)


def rows(path):
    with RunDir.open(path) as run:
        return run.ledger.rows()


def bits(t: torch.Tensor) -> torch.Tensor:
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view)


def same_checkpoint(a, b, step) -> bool:
    from replay.store.encode import flatten_state

    with RunDir.open(a) as ra, RunDir.open(b) as rb:
        (sa, ta), (sb, tb) = flatten_state(ra.load_checkpoint(step)), flatten_state(rb.load_checkpoint(step))
    return sa == sb and ta.keys() == tb.keys() and all(torch.equal(bits(ta[k]), bits(tb[k])) for k in ta)


def same_ledger(a, b):
    ra, rb = rows(a), rows(b)
    assert [r.step for r in ra] == [r.step for r in rb]
    for x, y in zip(ra, rb):
        assert (x.batch_ids, x.fingerprints, x.digest, x.rank_digests) == (y.batch_ids, y.fingerprints, y.digest,
                                                                           y.rank_digests), x.step
        assert repr(x.loss) == repr(y.loss) and x.metrics == y.metrics, x.step


# ---------------------------------------------------------------------------- units ----


def test_shards_are_contiguous_and_cover_the_batch():
    for examples in range(1, 40):
        for size in range(1, min(examples, 7) + 1):
            bounds = [shard_bounds(examples, r, size) for r in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == examples
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            lengths = [b - a for a, b in bounds]
            assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


def test_rank_zero_draws_the_one_process_streams_and_other_ranks_their_own():
    contract = RngContract(7, ("init", "order", "augment", "dropout", "noise"))
    for stream in ("dropout", "noise"):
        assert contract.seed(stream, 3, rank=0) == contract.seed(stream, 3)
        seeds = {contract.seed(stream, 3, rank=r) for r in range(4)}
        assert len(seeds) == 4
    reseeded = contract.with_reseed("noise", 2, 5)
    assert reseeded.seed("noise", 3, rank=1) != contract.seed("noise", 3, rank=1)
    # example seeds do not depend on the rank: a shard's examples are built as in one process
    assert contract.example_seed(3, 17) == contract.example_seed(3, 17)


def test_the_launcher_passes_the_command_on_without_nproc():
    assert without_nproc(["record", "p:x", "--nproc", "2", "--out", "o"]) == ["record", "p:x", "--out", "o"]
    assert without_nproc(["verify", "r", "--nproc=3"]) == ["verify", "r"]


# ------------------------------------------------------------------- world size 2 ----


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The mlp program (dropout, AdamW, EMA) recorded by 2 processes."""
    path = tmp_path_factory.mktemp("ddp") / "mlp"
    record(path, "mlp", "--nproc", 2)
    return path


def test_a_recording_by_two_processes_has_every_ranks_digest(recorded):
    with RunDir.open(recorded) as run:
        assert run.manifest["distributed"]["world_size"] == 2
        assert run.is_complete
        table = run.ledger.rows()
    assert len(table) == 12
    for row in table:
        assert row.rank_digests == [row.digest, row.digest]  # replicated state, every step
        assert len(row.batch_ids) == 30  # the global batch
    shown = replay_cli("inspect", recorded).stdout
    assert "processes    2" in shown


def test_verify_replays_it_bit_for_bit_with_the_same_world_size(recorded):
    result = replay_cli("verify", recorded, "--nproc", 2, "--no-progress")
    assert result.stdout.startswith("OK: steps 0..11 replay bit for bit"), result.stdout
    result = replay_cli("verify", recorded, "--nproc", 2, "--from", 5, "--no-progress")
    assert result.stdout.startswith("OK: steps 5..11 replay bit for bit (from checkpoint 4)"), result.stdout


@pytest.mark.parametrize("command", ["verify", "fork"])  # resume: in the kill -9 test
@pytest.mark.parametrize("nproc", [None, 3])
def test_another_world_size_is_refused(recorded, command, nproc, tmp_path):
    args = {"verify": ["verify", recorded],
            "fork": ["fork", recorded, "--at", 4, "--perturb", "placebo", "--out", tmp_path / "child"]}[command]
    result = replay_cli(*args, *(["--nproc", nproc] if nproc else []), "--no-progress", check=False)
    assert result.returncode == 2, result.stderr
    assert "was recorded by 2 processes (world size 2)" in result.stderr
    assert "--nproc 2" in result.stderr
    assert not (tmp_path / "child").exists()


def test_commands_without_nproc_say_so(recorded):
    result = replay_cli("check", recorded, "--at", 4, "--steps", 1, check=False)
    assert result.returncode == 2 and "check, trace and forget run one process" in result.stderr, result.stderr


@pytest.mark.parametrize("program,message", [
    ("one_example", "every rank needs at least one"),  # a batch smaller than the world
    ("ddp_wrapped", "not a DistributedDataParallel"),  # replay exchanges the gradients itself
])
def test_refused_in_one_line_before_the_run_exists(tmp_path, program, message):
    result = replay_cli("record", f"{PROGRAMS}:{program}", "--out", tmp_path / "x", "--nproc", 2, "--no-progress",
                        check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()


def test_a_one_process_run_is_not_replayed_by_two(tmp_path):
    record(tmp_path / "one", "mlp", "--steps", 2)
    result = replay_cli("verify", tmp_path / "one", "--nproc", 2, "--no-progress", check=False)
    assert result.returncode == 2 and "was recorded by one process" in result.stderr, result.stderr


def test_a_placebo_fork_equals_its_parent_and_a_fork_verifies(recorded, tmp_path):
    replay_cli("fork", recorded, "--at", 5, "--perturb", "placebo", "--out", tmp_path / "placebo", "--nproc", 2,
               "--no-progress")
    parent = {r.step: r for r in rows(recorded)}
    for row in rows(tmp_path / "placebo"):
        assert (row.digest, row.rank_digests, row.fingerprints) == (parent[row.step].digest,
                                                                    parent[row.step].rank_digests,
                                                                    parent[row.step].fingerprints)
    replay_cli("fork", recorded, "--at", 5, "--perturb", "reset_optimizer", "--out", tmp_path / "reset", "--nproc", 2,
               "--no-progress")
    assert rows(tmp_path / "reset")[0].digest != parent[5].digest
    result = replay_cli("verify", tmp_path / "reset", "--nproc", 2, "--no-progress")
    assert result.stdout.startswith("OK: steps 5..11"), result.stdout


def test_batchnorm_and_micro_batches_replay(tmp_path):
    record(tmp_path / "bn", "bn", "--nproc", 2)
    assert all(r.rank_digests == [r.digest] * 2 for r in rows(tmp_path / "bn"))  # rank 0's statistics on both
    result = replay_cli("verify", tmp_path / "bn", "--nproc", 2, "--no-progress")
    assert result.stdout.startswith("OK"), result.stdout


@pytest.mark.parametrize("program", ["fp16", "bf16_master"])
def test_mixed_precision_ranks_replay(tmp_path, program):
    """fp16 autocast with the GradScaler and clipping (the scaler unscales the summed gradients,
    so every rank skips the same steps), and bf16 parameters with fp32 master weights (bf16
    gradients exchanged)."""
    record_args = ["record", f"tests/programs/mixed_precision.py:{program}", "--out", tmp_path / program, "--nproc", 2,
                   "--no-progress"]
    replay_cli(*record_args)
    assert all(r.rank_digests == [r.digest] * 2 for r in rows(tmp_path / program))
    result = replay_cli("verify", tmp_path / program, "--nproc", 2, "--no-progress")
    assert result.stdout.startswith("OK"), result.stdout


def test_a_queue_filled_from_every_ranks_keys_stays_replicated(tmp_path):
    """examples/contrastive.py (MoCo): each rank enqueues ctx.gather_ranks(keys), the keys of the
    whole batch in rank order, so the queue is the same on every rank and moves by the global
    batch each step."""
    replay_cli("record", "examples/contrastive.py:program", "--out", tmp_path / "moco", "--steps", 6, "--nproc", 2,
               "--no-progress")
    table = rows(tmp_path / "moco")
    assert all(r.rank_digests == [r.digest] * 2 for r in table)
    with RunDir.open(tmp_path / "moco") as run:
        queue = run.load_checkpoint(6)["components"]["queue"]
    assert queue["pointer"] == 6 * 64 % 256
    result = replay_cli("verify", tmp_path / "moco", "--nproc", 2, "--no-progress")
    assert result.stdout.startswith("OK"), result.stdout


def test_data_loader_workers_build_each_ranks_share(tmp_path):
    """Program.workers under 2 ranks: each rank's workers build its share of every batch, the
    bits of building it in the rank itself."""
    record(tmp_path / "w0", "jitter_workers_0", "--nproc", 2)
    record(tmp_path / "w1", "jitter_workers_1", "--nproc", 2)
    same_ledger(tmp_path / "w0", tmp_path / "w1")
    assert same_checkpoint(tmp_path / "w0", tmp_path / "w1", 8)


def test_one_process_launched_equals_a_plain_recording(tmp_path):
    """A world of one: rank 0 draws the one-process streams and nothing is summed, so `--nproc 1`
    is a plain recording (with one thread, as the launcher sets)."""
    record(tmp_path / "plain", "mlp", env={"OMP_NUM_THREADS": "1"})
    record(tmp_path / "one", "mlp", "--nproc", 1)
    plain, one = rows(tmp_path / "plain"), rows(tmp_path / "one")
    assert [(r.digest, r.fingerprints, repr(r.loss)) for r in plain] == [(r.digest, r.fingerprints, repr(r.loss))
                                                                         for r in one]


def test_torchrun_distributed_equals_nproc(recorded, tmp_path):
    """`--distributed` under torchrun records the same bits as `--nproc 2`."""
    from replay.launch import _free_port

    port = _free_port()  # torchrun's --master-port 0 leaves the ranks waiting for each other
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
               "-m", "replay.cli", "record", f"{PROGRAMS}:mlp", "--out", str(tmp_path / "torchrun"), "--no-progress",
               "--distributed"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=180)
    finally:  # torchrun's ranks too, should it hang
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 0, stderr
    same_ledger(recorded, tmp_path / "torchrun")
    assert same_checkpoint(recorded, tmp_path / "torchrun", 12)


def test_distributed_without_a_launcher_is_a_clear_error(tmp_path):
    env = {k: "" for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    result = replay_cli("record", f"{PROGRAMS}:mlp", "--out", tmp_path / "x", "--distributed", env=env, check=False)
    assert result.returncode == 2 and "torchrun sets them" in result.stderr, result.stderr
    result = replay_cli("record", f"{PROGRAMS}:mlp", "--out", tmp_path / "x", "--distributed", "--nproc", 2, check=False)
    assert result.returncode == 2 and "give one" in result.stderr, result.stderr


# ------------------------------------------------------------- ranks that disagree ----


def test_ranks_whose_states_part_stop_the_recording_naming_the_rank(tmp_path):
    result = replay_cli("record", f"{PROGRAMS}:rank_drift", "--out", tmp_path / "drift", "--nproc", 2,
                        "--no-progress", check=False)
    assert result.returncode == 2, result.stderr
    assert "after step 3 rank 1's state differs from rank 0's in model: 3.bias" in result.stderr, result.stderr
    assert [r.step for r in rows(tmp_path / "drift")] == [0, 1, 2]


def test_a_custom_step_that_never_synchronizes_is_stopped(tmp_path):
    result = replay_cli("record", f"{PROGRAMS}:custom_unsynced", "--out", tmp_path / "u", "--nproc", 2,
                        "--no-progress", check=False)
    assert result.returncode == 2 and "never called ctx.synchronize_ranks()" in result.stderr, result.stderr


def test_verify_names_the_rank_whose_recorded_digest_differs(recorded, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(recorded, copy)
    with sqlite3.connect(copy / "ledger.sqlite") as db:
        db.execute("""UPDATE steps SET rank_digests = '["' || digest || '","0000000000000001"]' WHERE step = 6""")
    result = replay_cli("verify", copy, "--nproc", 2, "--no-progress", check=False)
    assert result.returncode == 1, result.stderr
    assert "first divergence at step 6" in result.stdout and "rank 1: its digest differs from the recorded one" \
        in result.stdout, result.stdout


# ----------------------------------------------------------------------- kill -9 ----


def _rank_pids(launcher: int) -> dict[int, int]:
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent != launcher:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = int(entry.name)
    return ranks


@pytest.fixture(scope="module")
def slow_whole(tmp_path_factory):
    """The slow program recorded by 2 processes without interruption."""
    path = tmp_path_factory.mktemp("ddp") / "whole"
    record(path, "slow", "--nproc", 2)
    return path


@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_with_minus_9_leaves_a_run_that_resumes_bit_identically(tmp_path, victim, slow_whole):
    out = tmp_path / "killed"
    launcher = subprocess.Popen([sys.executable, "-m", "replay.cli", "record", f"{PROGRAMS}:slow", "--out", str(out),
                                 "--nproc", "2", "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "REPLAY_TEST_STEP_SLEEP": "0.1"})
    try:
        deadline = time.monotonic() + 120
        while True:  # until a checkpoint after step 0 is recorded
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()
            try:
                with RunDir.open(out) as run:
                    if max(run.ledger.checkpoints(), default=0) >= 8:
                        break
            except Exception:
                pass
            time.sleep(0.05)
        pid = _rank_pids(launcher.pid)[victim]
        os.kill(pid, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode != 0
    if victim == 1:
        assert "rank 1 of 2 exited with status -9" in stderr, stderr
    with RunDir.open(out) as run:
        assert not run.is_complete
    for wrong in ([], ["--nproc", 3]):
        refused = replay_cli("resume", out, *wrong, "--no-progress", check=False)
        assert refused.returncode == 2 and "was recorded by 2 processes" in refused.stderr, refused.stderr
    replay_cli("resume", out, "--nproc", 2, "--no-progress")
    same_ledger(slow_whole, out)
    assert same_checkpoint(slow_whole, out, 24)


# ------------------------------------------------------------ the arithmetic by hand ----


def test_the_state_after_a_step_is_the_sum_of_the_ranks_gradients_in_rank_order(tmp_path):
    """Step 0 of the linear program by 2 processes, redone here in one: rank r's share is the
    r-th contiguous half of the batch (16 and 15 of 31 examples), its loss weighted by its share,
    the gradients summed rank 0 first; then plain SGD. The same bits as the recorded checkpoint."""
    from replay.datasets import digits

    record(tmp_path / "linear", "linear", "--nproc", 2)
    (x, y), _ = digits()
    with RunDir.open(tmp_path / "linear") as run:
        before, after = run.load_checkpoint(0)["model"], run.load_checkpoint(1)["model"]
        ids = run.ledger.step_row(0).batch_ids
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran
    try:
        grads = []
        for rank in range(2):
            a, b = shard_bounds(len(ids), rank, 2)
            model = torch.nn.Linear(64, 10)
            model.load_state_dict(before)
            shard = torch.tensor(ids[a:b])
            (F.cross_entropy(model(x[shard]), y[shard]) * ((b - a) / len(ids))).backward()
            grads.append({n: p.grad for n, p in model.named_parameters()})
        for name, value in before.items():
            expected = value.clone()
            expected.add_(grads[0][name] + grads[1][name], alpha=-0.1)  # torch.optim.SGD, lr 0.1
            assert torch.equal(bits(expected), bits(after[name])), name
    finally:
        torch.set_num_threads(threads)


# -------------------------------------------------------------------------- CUDA ----


@pytest.mark.cuda
@pytest.mark.parametrize("transport", ["gloo", pytest.param("nccl", marks=pytest.mark.multi_gpu)])
def test_cuda_ranks_record_verify_and_fork(tmp_path, transport):
    """Two ranks on CUDA (tools/gpu_check.sh): with nccl (a GPU per rank) and with gloo staging
    the CUDA tensors through the host (both ranks on one GPU). Replicated every step, verified,
    a placebo fork equal to its parent."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if transport == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("nccl needs a GPU per rank: 2 GPUs")
    env = {"REPLAY_CUDA_COLLECTIVES": transport}
    record(tmp_path / "cuda", "mlp", "--device", "cuda", "--nproc", 2, env=env)
    table = rows(tmp_path / "cuda")
    assert len(table) == 12 and all(r.rank_digests == [r.digest] * 2 for r in table)
    result = replay_cli("verify", tmp_path / "cuda", "--nproc", 2, "--no-progress", env=env)
    assert result.stdout.startswith("OK"), result.stdout
    replay_cli("fork", tmp_path / "cuda", "--at", 5, "--perturb", "placebo", "--out", tmp_path / "placebo",
               "--nproc", 2, "--no-progress", env=env)
    parent = {r.step: r.digest for r in table}
    assert all(r.digest == parent[r.step] for r in rows(tmp_path / "placebo"))


def test_killing_the_launcher_leaves_no_rank_running(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-m", "replay.cli", "record", f"{PROGRAMS}:slow", "--out",
                                 str(tmp_path / "run"), "--nproc", "2", "--no-progress"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "REPLAY_TEST_STEP_SLEEP": "0.5"})
    try:
        deadline = time.monotonic() + 60
        ranks = {}
        while len(ranks) < 2:
            assert time.monotonic() < deadline and launcher.poll() is None
            ranks = _rank_pids(launcher.pid)
            time.sleep(0.05)
    finally:
        launcher.kill()
        launcher.wait()
    def alive(pid: int) -> bool:  # a zombie (its parent, the launcher, is gone too) is not running
        try:
            return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in ranks.values()):
        assert time.monotonic() < deadline, f"ranks {ranks} outlived their launcher"
        time.sleep(0.05)
