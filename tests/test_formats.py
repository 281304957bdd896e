"""Formats that last.

* Golden values: fingerprints of fixed tensors, the RNG stream seeds of replay.rng, the order
  hashes and batches of every replay.order policy. These are what recorded runs are checked
  against: a change to any of them makes every run recorded before it unverifiable. They are
  pinned here as literals; never update them to make a test pass.
* The format versions: the manifest (``format`` "replay.run", ``version``, ``store_version``),
  the checkpoint state (``format``) and the ledger (meta ``version``); a file written by a newer
  replay is refused clearly.
* A small run recorded by replay 0.1.0 (tests/fixtures/run_v1: the program, how it was
  recorded, and the run) that every later version must verify bit for bit, and re-record to the
  same bits.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import torch

from replay.store import RunDir, sha256_bytes
from replay.store.schema import CHECKPOINT_FORMAT, MANIFEST_FORMAT, MANIFEST_VERSION, NewerFormatError
from replay.store.run import STORE_VERSION

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "run_v1")

# ------------------------------------------------------------------------- golden values --


def fixed_tensors() -> dict:
    return {
        "arange_f32": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "neg_zero_f32": torch.tensor([0.0, -0.0, float("inf"), float("-inf")], dtype=torch.float32),
        "f64": torch.linspace(-1, 1, 7, dtype=torch.float64),
        "bf16": torch.arange(5, dtype=torch.bfloat16) / 3,
        "f16": torch.arange(5, dtype=torch.float16) / 7,
        "i64": torch.tensor([-(2**63), -1, 0, 1, 2**63 - 1], dtype=torch.int64),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }


GOLDEN_FINGERPRINTS = {
    "arange_f32": "261114d2f2b38704", "neg_zero_f32": "fccc119a48d579d8", "f64": "a3cd5b81f4963e77",
    "bf16": "13d627c8c008a1df", "f16": "49da1d5fddcc91fb", "i64": "e2c108061fd98d94",
    "u8": "b0f677f02576c154", "bool": "327dea4f385657a7", "scalar": "2ebf9cd6cbb7b666",
    "empty": "111f797ae5728b26",
}
GOLDEN_STATE_FINGERPRINT = "6e7c9494cffb0f38"


def test_golden_fingerprints():
    from replay.fingerprinting import fingerprint, state_fingerprint

    got = {k: f"{fingerprint(t):016x}" for k, t in fixed_tensors().items()}
    assert got == GOLDEN_FINGERPRINTS
    assert f"{state_fingerprint(fixed_tensors()):016x}" == GOLDEN_STATE_FINGERPRINT


GOLDEN_SEEDS = [
    (0, "init", 0, 1616146908120777754), (0, "init", 1, 2205069899226446197),
    (0, "init", 1000000, 6769979553599659881), (0, "order", 0, 7098234836730104026),
    (0, "order", 1, 8178766899569595946), (0, "order", 1000000, 248208454075472917),
    (0, "dropout", 0, 6835324227162075840), (0, "dropout", 1, 7879690839969351963),
    (0, "dropout", 1000000, 709797871638399113), (0, "augment#7", 0, 1207656658259554944),
    (0, "augment#7", 1, 8075057512101799013), (0, "augment#7", 1000000, 6819129152709720467),
    (1, "init", 0, 7102045818548609078), (1, "init", 1, 4560679642519261179),
    (1, "init", 1000000, 4557312167171071516), (1, "order", 0, 2675700730234688534),
    (1, "order", 1, 2612181959409835564), (1, "order", 1000000, 3793851369379876554),
    (1, "dropout", 0, 8488662158980361219), (1, "dropout", 1, 7826455907651520547),
    (1, "dropout", 1000000, 6931665349439531885), (1, "augment#7", 0, 3841122027090080545),
    (1, "augment#7", 1, 7686943504205360614), (1, "augment#7", 1000000, 5908487506270288183),
    (2**63 - 1, "init", 0, 684963119739660497), (2**63 - 1, "init", 1, 4857737454973635539),
    (2**63 - 1, "init", 1000000, 5727431924734512308), (2**63 - 1, "order", 0, 4058228916713040475),
    (2**63 - 1, "order", 1, 313312513285049284), (2**63 - 1, "order", 1000000, 3169768842553426545),
    (2**63 - 1, "dropout", 0, 3515050344577807105), (2**63 - 1, "dropout", 1, 1441100837554300432),
    (2**63 - 1, "dropout", 1000000, 6080314039461477937),
    (2**63 - 1, "augment#7", 0, 1871845611219226838), (2**63 - 1, "augment#7", 1, 4966619170680357113),
    (2**63 - 1, "augment#7", 1000000, 6833446852154432090),
]


def test_golden_stream_seeds():
    from replay.rng import RngContract, stream_seed

    assert [(s, st, k, stream_seed(s, st, k)) for s, st, k, _ in GOLDEN_SEEDS] == GOLDEN_SEEDS
    contract = RngContract(5, ["init", "order", "augment", "dropout", "noise"]).with_reseed("noise", 3, 11)
    got = [(st, k, contract.seed(st, k)) for st in ("noise", "order") for k in (2, 3, 4)]
    assert got == [("noise", 2, 5264550836823623991), ("noise", 3, 6846127686221562551),
                   ("noise", 4, 8114125688443866879), ("order", 2, 1357596625409150696),
                   ("order", 3, 8686224425295043895), ("order", 4, 194685590856232823)]
    # the stream's generator: torch's own mapping from a seed to numbers is part of the contract
    assert contract.generator("augment", 4).initial_seed() == 3283060651741675882
    draws = torch.randint(0, 2**31, (3,), generator=contract.generator("augment", 4)).tolist()
    assert draws == [1334214422, 185793339, 514348814]


SCORES = [float((i * 37) % 11) for i in range(50)]
GOLDEN_ORDERS = {
    "reshuffle": (["f6a0aa1590eef3dc1f27ddb4c4a081aa7881d97ce59645b19c9123a222f94e5c",
                   "475439d24786c5329be148eb8b2237408182410b1a93c6d9966094121b9fd477",
                   "d3a7c72e5fb0e6fbe87aa9e1f878ca3fd0d4038b4e97504550bacb545a6e5eec"],
                  [23, 16, 32, 14, 18, 12, 6, 37], [35, 45, 5, 28, 11, 33, 49, 8]),
    "shuffle_once": (["f6a0aa1590eef3dc1f27ddb4c4a081aa7881d97ce59645b19c9123a222f94e5c"] * 3,
                     [23, 16, 32, 14, 18, 12, 6, 37], [45, 41, 49, 29, 4, 0, 25, 5]),
    "sequential": (["c202d9cfc7858fd49d522047e16948359bbbb2eda2d3825d552e45a78d5f8585"] * 3,
                   [0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]),
    "with_replacement": ([None] * 3, [23, 41, 22, 40, 30, 7, 22, 32], [2, 46, 23, 44, 39, 19, 48, 11]),
    "curriculum": (["c449d3da55b7bd15c46d64ca9705803225eb33b41cfd6c1ccf73333d45222494"] * 3,
                   [0, 11, 22, 33, 44, 3, 14, 25], [36, 47, 6, 17, 28, 39, 9, 20]),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_ORDERS))
def test_golden_order_hashes(name):
    from replay.order import make_policy
    from replay.rng import RngContract

    spec = {"name": "curriculum", "scores": SCORES} if name == "curriculum" else name
    policy = make_policy(spec, 50, 8, RngContract(7))
    hashes, first, later = GOLDEN_ORDERS[name]
    assert [policy.epoch_order_hash(e) for e in (0, 1, 5)] == hashes
    assert policy.batch_ids(0) == first and policy.batch_ids(13) == later


def test_golden_order_hash_function():
    from replay.order import order_hash

    assert order_hash([3, 1, 2]) == "7c4cec7a82e1aa578a08e41043044a9bfed3839e107aef17f4bf292878784259"
    assert order_hash(list(range(10))) == "23c379d6c0f22ef64cdef873fd530df1f1419b4a3935e9323d5f1d82ca697b6a"


# ------------------------------------------------------------------------ format versions --


def test_format_versions_are_one_set_of_numbers():
    from replay import driver, engine

    assert (driver.MANIFEST_FORMAT, driver.MANIFEST_VERSION) == (MANIFEST_FORMAT, MANIFEST_VERSION) == ("replay.run", 1)
    assert engine.CHECKPOINT_FORMAT == CHECKPOINT_FORMAT == 1
    assert STORE_VERSION == 1


def fixture_copy(tmp_path) -> str:
    """A private copy of the golden run (never open the committed one: readers leave -shm)."""
    dst = tmp_path / "run_v1"
    shutil.copytree(FIXTURE, dst, ignore=shutil.ignore_patterns("ledger.sqlite-*", ".lock"))
    return str(dst / "run")


def test_the_golden_run_holds_the_format_versions(tmp_path):
    run = fixture_copy(tmp_path)
    manifest = json.loads(open(os.path.join(run, "manifest.json"), "rb").read())
    assert (manifest["format"], manifest["version"], manifest["store_version"]) == ("replay.run", 1, 1)
    for step in (0, 5, 10):
        state = json.loads(open(os.path.join(run, "checkpoints", f"step-{step:08d}", "state.json"), "rb").read())
        assert state["format"] == 1 and state["completed_steps"] == step
    conn = sqlite3.connect(os.path.join(run, "ledger.sqlite"))
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    conn.close()
    assert meta["format"] == "replay-ledger" and meta["version"] == "1"
    assert meta["manifest_sha256"] == sha256_bytes(open(os.path.join(run, "manifest.json"), "rb").read())


def set_meta(run: str, key: str, value: str) -> None:
    conn = sqlite3.connect(os.path.join(run, "ledger.sqlite"), isolation_level=None)
    conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
    conn.close()


@pytest.mark.parametrize("key", ["version", "store_version"])
def test_a_newer_manifest_is_refused(tmp_path, key):
    run = fixture_copy(tmp_path)
    path = os.path.join(run, "manifest.json")
    manifest = json.loads(open(path, "rb").read())
    manifest[key] = 2
    manifest["a_key_from_the_future"] = {"x": 1}
    data = json.dumps(manifest).encode()
    open(path, "wb").write(data)
    set_meta(run, "manifest_sha256", sha256_bytes(data))  # as the newer replay recorded it
    with pytest.raises(NewerFormatError) as info:
        RunDir.open(run)
    message = str(info.value)
    assert message == (f"{path}: {'manifest' if key == 'version' else 'run layout'} written by a newer "
                       "replay (format 2); this is format 1: upgrade replay to read it")


def test_a_newer_checkpoint_is_refused(tmp_path):
    run = fixture_copy(tmp_path)
    folder = os.path.join(run, "checkpoints", "step-00000005")
    data = open(os.path.join(folder, "state.json"), "rb").read().replace(b'"format": 1', b'"format": 2', 1)
    open(os.path.join(folder, "state.json"), "wb").write(data)
    conn = sqlite3.connect(os.path.join(run, "ledger.sqlite"), isolation_level=None)
    files = json.loads(conn.execute("SELECT files FROM checkpoints WHERE step = 5").fetchone()[0])
    files["state.json"] = sha256_bytes(data)
    conn.execute("UPDATE checkpoints SET files = ? WHERE step = 5", (json.dumps(files),))
    conn.close()
    with RunDir.open(run) as r:
        with pytest.raises(NewerFormatError, match=r"checkpoint written by a newer replay \(format 2\); this is format 1"):
            r.load_checkpoint(5)
        assert r.load_checkpoint(10)["completed_steps"] == 10


def test_a_newer_ledger_is_refused(tmp_path):
    run = fixture_copy(tmp_path)
    set_meta(run, "version", "3")
    with pytest.raises(NewerFormatError, match=r"ledger written by a newer replay \(format 3\); this is format 1"):
        RunDir.open(run)


# ------------------------------------------------------------------------- the golden run --

GOLDEN_FILES = {
    "program.py": "5c6b5257295098eded274a111baa0cbbd5a14f3fc4216c0ee8d0b9a663a23821",
    "run/checkpoints/step-00000000/state.json": "6bf844d561e2662943babe1be5b5183e632f3d534a7625d8ee31d0c8341334d4",
    "run/checkpoints/step-00000000/tensors.safetensors": "1e89aeb35a1dc7a9ae3b188080ac367fd7b74f083643e1c31b00d9f1769e7847",
    "run/checkpoints/step-00000005/state.json": "c2cd5701d5deee3476309325566fcb7247e98d141afa6cccb594d861cd3b81b9",
    "run/checkpoints/step-00000005/tensors.safetensors": "4bf95a744ca96413e5b7939653fbbd18b9822de24e9dafd26f54aa898671a656",
    "run/checkpoints/step-00000010/state.json": "7fcc83abfe1e7ed6ae6706887706190497fddcb37ec2fb96b367dee09c3a2fc5",
    "run/checkpoints/step-00000010/tensors.safetensors": "a2a403e8016c2a50e6bac60a183d9872c9d6a6ca41ea49b28310075ee7cd7558",
    "run/ledger.sqlite": "42c585162a6d3e0e37856d63599576319b716beff2727806d3897c7ac1cbbddd",
    "run/manifest.json": "0d766dce74a21bdcb52d539eb3324eb0e31dae7e78f91cb7f864373565a56a78",
}
GOLDEN_DIGESTS = ["45cb181bcce7d724", "cbf5aa25222e92ff", "2d015ce7977ce901", "493910a0a361a65c", "7c1a0826175fdae7",
                  "727ce6a7d0d076e0", "bcb637ee83c15d64", "aa4eb56dab6f30f1", "c2a454e6bd5d94a9", "7c3f601d5668b9ab"]


def test_the_golden_run_is_unchanged():
    """The committed files are the ones recorded by replay 0.1.0 (never re-record them)."""
    for rel, sha in GOLDEN_FILES.items():
        with open(os.path.join(FIXTURE, rel), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == sha, rel
    assert os.path.getsize(os.path.join(FIXTURE, "run", "ledger.sqlite")) < 200_000


READ = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from replay.driver import engine_for_run, load_run_program, restore
    from replay.store import RunDir
    from replay.store.integrity import check_files
    with RunDir.open(sys.argv[1]) as r:
        damaged = check_files(r)
        program, _ = load_run_program(r, False, True, "verify")
        restored = []
        for step in r.checkpoint_steps():
            restore(r, engine_for_run(r, program), step)  # CorruptRunError if it disagrees with the ledger
            restored.append(step)
    print(json.dumps({"damaged": damaged, "restored": restored}))
""")

VERIFY = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from replay.session import RecordSession, ReplaySession
    from replay.store import RunDir
    run, again = sys.argv[1], sys.argv[2]
    report = ReplaySession(run, allow_environment_change=True).verify(progress=False)
    RecordSession("tests/fixtures/run_v1/program.py:program", again, progress=False).run()
    with RunDir.open(again) as r:
        digests = [f"{row.digest:016x}" for row in r.ledger.rows()]
        checkpoints = {s: files for s, files in r.ledger.checkpoints().items()}
    with RunDir.open(run) as r:
        golden_checkpoints = {s: files for s, files in r.ledger.checkpoints().items()}
    print(json.dumps({"damaged": report.damaged, "ok": report.ok, "describe": report.describe(),
                      "compared": report.checkpoints_compared, "restored_from": report.restored_from,
                      "digests": digests, "same_checkpoints": checkpoints == golden_checkpoints}))
""")

GOLDEN_ENV = {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}


def _run_golden_script(tmp_path, source: str, *args) -> dict:
    """Run `source` in a fresh process under the settings the golden run was recorded with."""
    script = tmp_path / "golden_script.py"
    script.write_text(source)
    env = dict(os.environ, **GOLDEN_ENV, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cpu_vendor() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def test_the_golden_run_reads_and_every_checkpoint_agrees_with_its_ledger(tmp_path):
    """On any machine: every file of the run recorded by 0.1.0 is intact and parses, its program
    loads, and each checkpoint restores into the program's engine with exactly the fingerprints
    the ledger recorded after that step (reading only: no torch op's bits are involved)."""
    result = _run_golden_script(tmp_path, READ, fixture_copy(tmp_path))
    assert result == {"damaged": [], "restored": [0, 5, 10]}


# The run was recorded on an AMD EPYC (AuthenticAMD). Its steps run torch's own CPU ops, and
# torch's float32 GEMM (MKL) takes other code paths, with other rounding, on an Intel CPU, even
# under ATEN_CPU_CAPABILITY=default, MKL_CBWR and ONEDNN_MAX_CPU_ISA (measured on a Xeon: step 0
# diverges in every weight that a matmul's gradient feeds). replay's portable contract covers its
# own ops (optimizer steps, EMA, fingerprints), not torch's matmuls: the bit-for-bit replay of
# this run is checked where it was recorded, the reading above everywhere.
RECORDED_ON = "AuthenticAMD"


@pytest.mark.skipif(_cpu_vendor() != RECORDED_ON,
                    reason=f"the golden run was recorded on an {RECORDED_ON} CPU; torch's GEMM gives other bits on "
                           f"this one ({_cpu_vendor()}), so only its reading is checked here")
def test_the_golden_run_verifies_and_re_records_bit_for_bit(tmp_path):
    """Every later version, on a CPU like the one that recorded it: verify the run recorded by
    0.1.0 (every file, every step, every checkpoint) and record its program again to the same
    bits. The run was recorded with the portable CPU kernels (ATEN_CPU_CAPABILITY=default) on one
    thread; the check runs under the same settings."""
    run = fixture_copy(tmp_path)
    result = _run_golden_script(tmp_path, VERIFY, run, str(tmp_path / "again"))
    assert result["damaged"] == []
    assert result["ok"], result["describe"]
    assert result["restored_from"] is None and result["compared"] == [0, 5, 10]
    assert result["digests"] == GOLDEN_DIGESTS
    assert result["same_checkpoints"]  # the same checkpoint files, byte for byte (their SHA-256)
