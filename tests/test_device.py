"""Program.device (replay/device.py): the CPU path, and every CUDA path in tests marked `cuda`.

CPU tests: the device name is validated; an explicit device="cpu" is the default, bit for bit; a
CUDA device on a machine without one is refused before a run directory exists; the manifest and
environment record the device; a replay on another kind of device is refused unless allowed (and
the allowance is recorded) and then reports honestly; batches move (structure kept); the
deterministic settings and the nondeterministic-op error; tools/gpu_check.sh fails clearly here.

CUDA tests (run them all with tools/gpu_check.sh): replay's optimizers, EMA and fingerprints
give the same bits on CPU and CUDA; a CUDA recording verifies, forks (placebo) and resumes after
kill -9 bit for bit; a CUDA run verified on the CPU reports exactly where it parts, if anywhere.
Every comparison is of bits (torch.equal on integer views, fingerprints, ledger digests).
"""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import replay
from replay import device as device_module
from replay.cli import main as cli
from replay.driver import engine_for_run, load_run_program, restore
from replay.engine import Engine
from replay.environment import differences, environment
from replay.fingerprinting import fingerprints
from replay.fork import ForkSession
from replay.session import RecordSession, ReplayRefused, ReplaySession
from replay.program import load_program
from replay.store import CorruptRunError, RunDir
from replay.store.encode import flatten_state

from killing import kill_when_ready

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEVICE_MLP = str(HERE / "programs" / "device_mlp.py") + ":program"
GOLDEN = HERE / "fixtures" / "run_v1" / "run"
GPU_CHECK = ROOT / "tools" / "gpu_check.sh"

HAS_CUDA = torch.cuda.is_available()
cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def process_settings(monkeypatch):
    """A CUDA session sets torch's deterministic mode process-wide (as a seed is): put it back
    after each test so that later tests record the environment they would have alone."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    monkeypatch.setenv(device_module.CUBLAS_VARIABLE, os.environ.get(device_module.CUBLAS_VARIABLE, ":4096:8"))
    yield
    torch.use_deterministic_algorithms(saved[0])
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
     torch.backends.cudnn.deterministic) = saved[1:]


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def digests(path) -> list[tuple[int, int]]:
    with RunDir.open(path) as run:
        return [(r.step, r.digest) for r in run.ledger.rows()]


def rows_of(path) -> list[tuple]:
    """What verify compares of each ledger row: step, batch, loss (its bits), digest."""
    with RunDir.open(path) as run:
        return [(r.step, r.batch_ids, None if r.loss is None else struct.pack("<d", r.loss), r.digest)
                for r in run.ledger.rows()]


def record(out, reference=DEVICE_MLP, **kw) -> Path:
    RecordSession(reference, out, progress=False, **kw).run()
    return Path(out)


def events(path) -> list[str]:
    with RunDir.open(path) as run:
        return [e["kind"] for e in run.ledger.events()]


# ------------------------------------------------------------------------- names ----


@pytest.mark.parametrize("spec", ["cpu", "cuda", "cuda:0", "cuda:7", "cuda:12"])
def test_device_names_accepted(spec):
    program = replay.Program(model=lambda: torch.nn.Linear(2, 2), dataset=(torch.zeros(4, 2),),
                             loss=lambda o, t: o.sum(), device=spec)
    assert program.device == spec
    assert device_module.kind_of(spec) == spec.partition(":")[0]


@pytest.mark.parametrize("spec", ["gpu", "CUDA", "cuda:", "cuda:-1", "cuda:01", "cuda:x", "cpu:0", " cpu",
                                  "mps", "", 0, None, torch.device("cpu")])
def test_device_names_refused(spec):
    with pytest.raises(ValueError, match="Program.device") as caught:
        replay.Program(model=lambda: torch.nn.Linear(2, 2), dataset=(torch.zeros(4, 2),),
                       loss=lambda o, t: o.sum(), device=spec)
    assert repr(spec) in str(caught.value)


# ------------------------------------------------------------------- the CPU path ----


def test_explicit_cpu_is_the_default_bit_for_bit(tmp_path):
    """device="cpu" (the override and a program file that says so) records the same ledger as a
    program that does not name a device. (That the default is still the bits of runs recorded
    before devices existed, test_formats' golden run checks.)"""
    default = record(tmp_path / "default")
    explicit = record(tmp_path / "explicit", device="cpu")
    source = (HERE / "programs" / "device_mlp.py").read_text()
    assert "    checkpoint_every=5,\n)" in source
    named = tmp_path / "named.py"
    named.write_text(source.replace("    checkpoint_every=5,\n)", "    checkpoint_every=5,\n    device=\"cpu\",\n)"))
    in_file = record(tmp_path / "in_file", reference=f"{named}:program")
    assert len(digests(default)) == 20
    assert digests(default) == digests(explicit) == digests(in_file)


def test_a_run_recorded_before_devices_is_a_cpu_run():
    with RunDir.open(GOLDEN) as run:
        manifest = run.manifest
    assert "device" not in manifest and "device" not in manifest["environment"]
    assert device_module.recorded_device(manifest) == {"kind": "cpu", "device": "cpu"}
    assert "device" not in differences(manifest["environment"], environment("cpu"))
    assert differences(manifest["environment"], environment("cuda"))["device"] == ("cpu", "cuda")


def test_the_manifest_and_environment_record_the_device(tmp_path):
    out = record(tmp_path / "run")
    with RunDir.open(out) as run:
        manifest = run.manifest
    assert manifest["device"] == {"kind": "cpu", "device": "cpu"}
    assert manifest["environment"]["device"] == "cpu"
    assert "cublas_workspace_config" not in manifest["environment"]  # meaningless to a CPU run


@pytest.mark.skipif(HAS_CUDA, reason="a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_refused_before_anything_is_made(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(device_module.DeviceUnavailable, match="'cuda' was asked for.*use device='cpu'"):
        RecordSession(DEVICE_MLP, out, progress=False, device="cuda").run()
    assert not out.exists()
    assert cli(["record", DEVICE_MLP, "--device", "cuda:0", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("replay: error: device 'cuda:0' was asked for") and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_cuda_index_beyond_the_machine_is_refused(tmp_path):
    spec = f"cuda:{torch.cuda.device_count()}"  # one past the last, on any machine
    out = tmp_path / "run"
    with pytest.raises(device_module.DeviceUnavailable, match=f"'{spec}' was asked for"):
        RecordSession(DEVICE_MLP, out, progress=False, device=spec).run()
    assert not out.exists()


# -------------------------------------------------------- replay on another device ----


def claim_cuda(out: Path) -> None:
    """Make a CPU recording say it was recorded on CUDA, environment included, through the run's
    writer (the ledger holds the manifest's SHA-256: an edit behind its back is refused)."""
    with RunDir.open(out, writable=True) as run:
        env = run.manifest["environment"]
        run.update_manifest({
            "device": {"kind": "cuda", "device": "cuda:0", "name": "Imaginary GPU"},
            "environment": {**env, "device": "cuda", "cublas_workspace_config": ":4096:8",
                            "deterministic_algorithms": True, "cudnn_deterministic": True,
                            "cudnn_benchmark": False, "matmul_tf32": False, "cudnn_tf32": False},
        })


@pytest.fixture
def claimed(tmp_path):
    """A CPU recording of a copy of device_mlp.py (tmp_path / "device_mlp.py") that claims CUDA."""
    program = tmp_path / "device_mlp.py"
    program.write_text((HERE / "programs" / "device_mlp.py").read_text())
    out = record(tmp_path / "run", reference=f"{program}:program")
    claim_cuda(out)
    return out


def test_a_hand_edited_device_is_caught(tmp_path):
    out = record(tmp_path / "run")
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "device": {"kind": "cuda", "device": "cuda:0"}}))
    with pytest.raises(CorruptRunError, match="edited or damaged"):
        ReplaySession(out).verify(progress=False)
    path.write_text(json.dumps({**manifest, "device": {"kind": "cpu", "device": "cuda:0"}}))
    with pytest.raises(CorruptRunError, match="'cuda:0' is not a cpu device"):
        ReplaySession(out).verify(progress=False)


@pytest.mark.skipif(HAS_CUDA, reason="a machine without CUDA")
def test_by_default_a_run_replays_on_its_recorded_device(claimed):
    with pytest.raises(device_module.DeviceUnavailable, match="recorded on cuda:0.*--device cpu --allow-device-change"):
        ReplaySession(claimed).verify(progress=False)


def test_another_kind_is_refused_with_the_device_message(claimed):
    """Not an environment message: the device check answers the device's keys."""
    for attempt in (lambda: ReplaySession(claimed, device="cpu").verify(progress=False),
                    lambda: ReplaySession(claimed, device="cpu", allow_environment_change=True).verify(progress=False),
                    lambda: ForkSession(claimed, 5, device="cpu", progress=False)):
        with pytest.raises(ReplayRefused, match=r"recorded on cuda \(Imaginary GPU\) and would be replayed on cpu") as e:
            attempt()
        assert "--allow-device-change" in str(e.value) and "environment" not in str(e.value)
    assert not any("device_change_allowed" in kind for kind in events(claimed))


def test_an_allowed_device_change_is_recorded_and_reported(claimed, capsys):
    report = ReplaySession(claimed, device="cpu", allow_device_change=True).verify(progress=False)
    # It really ran on the CPU, so the bits agree; the report says where it was replayed.
    assert report.ok and report.devices == ("cuda (Imaginary GPU)", "cpu")
    assert "replayed on cpu" in report.describe() and report.describe().startswith("OK: steps 0..19")
    assert events(claimed).count("verify:device_change_allowed") == 1
    assert cli(["verify", str(claimed), "--device", "cpu", "--no-progress"]) == 2
    assert "--allow-device-change" in capsys.readouterr().err
    assert cli(["verify", str(claimed), "--device", "cpu", "--allow-device-change", "--no-progress"]) == 0
    assert events(claimed).count("verify:device_change_allowed") == 2


def test_an_allowed_device_change_still_reports_the_first_divergence(claimed):
    """The allowance changes what is refused, never what is compared: a replay that parts from
    the ledger is named as ever."""
    program = claimed.parent / "device_mlp.py"
    source = program.read_text()
    assert "loss = F.cross_entropy(" in source
    program.write_text(source.replace("loss = F.cross_entropy(", "loss = 1.5 * F.cross_entropy("))
    report = ReplaySession(claimed, device="cpu", allow_device_change=True,
                           allow_source_change=True).verify(progress=False)
    assert not report.ok and report.divergence.step == 0
    assert "first divergence at step 0" in report.describe() and "replayed on cpu" in report.describe()


def test_fork_and_resume_on_another_kind_when_allowed(claimed, tmp_path):
    child = ForkSession(claimed, 5, device="cpu", allow_device_change=True, progress=False).fork(
        tmp_path / "child", "placebo")
    assert "fork:device_change_allowed" in events(claimed)
    with RunDir.open(child) as run:
        assert run.manifest["device"] == {"kind": "cpu", "device": "cpu"}
    assert digests(child) == [d for d in digests(claimed) if d[0] >= 5]

    with RunDir.open(claimed, writable=True) as run:  # stopped after checkpoint 10
        run.ledger.truncate_after(9, keep_checkpoint=10)
        run.update_manifest({"status": "incomplete"})
    full = digests(record(tmp_path / "full", reference=f"{claimed.parent / 'device_mlp.py'}:program"))
    with pytest.raises(ReplayRefused, match="--allow-device-change"):
        RecordSession.resume(claimed, progress=False, device="cpu")
    RecordSession.resume(claimed, progress=False, device="cpu", allow_device_change=True, say=lambda m: None)
    assert digests(claimed) == full
    assert "resume:device_change_allowed" in events(claimed)


def test_inspect_shows_the_device(claimed, capsys):
    assert cli(["inspect", str(claimed)]) == 0
    assert "device       cuda:0 (Imaginary GPU)\n" in capsys.readouterr().out
    assert cli(["inspect", str(GOLDEN), "--json"]) == 0  # recorded before devices: a CPU run
    assert json.loads(capsys.readouterr().out)["device"] == {"kind": "cpu", "device": "cpu"}


def test_load_run_program_puts_the_program_on_the_replay_device(claimed):
    with RunDir.open(claimed, writable=True) as run:
        program, _ = load_run_program(run, False, False, "verify", allow_device_change=True, device="cpu")
    assert program.device == "cpu"


# ----------------------------------------------------------------- moving state ----


def test_to_device_keeps_the_batch_structure():
    x, y, z = torch.arange(6.0).view(3, 2), torch.tensor([1, 0, 1]), torch.ones(3)
    batch = {"pair": (x, [y, 3, "label"]), "extra": OrderedDict(z=z), "none": None}
    assert device_module.to_device(batch, torch.device("cpu")) is batch  # no copy on the CPU
    moved = device_module.to_device(batch, torch.device("meta"))  # the same walk as to CUDA
    assert type(moved) is dict and type(moved["pair"]) is tuple and type(moved["pair"][1]) is list
    assert type(moved["extra"]) is OrderedDict and moved["none"] is None
    assert moved["pair"][1][1:] == [3, "label"]
    for a, b in ((moved["pair"][0], x), (moved["pair"][1][0], y), (moved["extra"]["z"], z)):
        assert a.device.type == "meta" and a.shape == b.shape and a.dtype == b.dtype


def test_like_moves_loaded_state_where_the_live_state_is():
    loaded = {"items": torch.ones(2), "nested": [torch.zeros(1), 5], "new": torch.ones(1)}
    live = {"items": torch.empty(2, device="meta"), "nested": [torch.empty(1, device="meta"), 5]}
    out = device_module.like(loaded, live)
    assert out["items"].device.type == "meta" and out["nested"][0].device.type == "meta"
    assert out["nested"][1] == 5 and out["new"] is loaded["new"]  # nothing to follow: left as loaded


def test_host_copy_is_a_deep_copy():
    t = torch.arange(4.0)
    state = {"a": t, "b": [t, {"c": 1.5}]}
    copied = device_module.host_copy(state)
    t.add_(1)
    assert torch.equal(copied["a"], torch.arange(4.0)) and copied["b"][0] is copied["a"]  # sharing kept
    assert copied["b"][1] == {"c": 1.5} and copied["b"][1] is not state["b"][1]


# ---------------------------------------------------------------- determinism ----


def test_deterministic_settings(monkeypatch):
    monkeypatch.delenv(device_module.CUBLAS_VARIABLE)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    torch.use_deterministic_algorithms(False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False
    device_module.apply_deterministic_settings()
    assert os.environ[device_module.CUBLAS_VARIABLE] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32 or torch.backends.cudnn.benchmark)
    env = environment("cuda")
    assert env["device"] == "cuda" and env["cublas_workspace_config"] == ":4096:8"
    assert env["deterministic_algorithms"] and env["cudnn_deterministic"] and not env["matmul_tf32"]


def test_deterministic_settings_refused_when_cublas_may_be_set_up(monkeypatch):
    monkeypatch.setenv(device_module.CUBLAS_VARIABLE, ":1024:4")
    with pytest.raises(device_module.DeterminismUnavailable, match="':1024:4' is not one of"):
        device_module.apply_deterministic_settings()
    monkeypatch.delenv(device_module.CUBLAS_VARIABLE)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(device_module.DeterminismUnavailable, match="CUBLAS_WORKSPACE_CONFIG=:4096:8"):
        device_module.apply_deterministic_settings()
    assert device_module.CUBLAS_VARIABLE not in os.environ  # nothing set that could not take effect


NONDETERMINISTIC_STEP = '''
    torch.use_deterministic_algorithms(True)
    torch.zeros(4).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))'''


def test_an_op_with_no_deterministic_implementation_is_named(program_file, tmp_path, capsys):
    path = program_file(step_prelude=NONDETERMINISTIC_STEP)
    out = tmp_path / "run"
    with pytest.raises(device_module.NondeterministicOp, match="put_ does not have a deterministic implementation") as e:
        RecordSession(f"{path}:program", out, progress=False).run()
    assert f"at {path}, line" in str(e.value)
    assert cli(["record", f"{path}:program", "--out", str(tmp_path / "cli"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("replay: error: the step ran an op with no deterministic implementation") and "put_" in err


# ------------------------------------------------------------------ gpu_check.sh ----


def test_gpu_check_script_is_there_and_parses():
    assert GPU_CHECK.is_file() and os.access(GPU_CHECK, os.X_OK)
    assert GPU_CHECK.read_text().splitlines()[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in GPU_CHECK.read_text()
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)


@pytest.mark.skipif(HAS_CUDA, reason="a machine without CUDA")
def test_gpu_check_without_a_gpu_fails_clearly_and_quickly():
    started = time.monotonic()
    done = subprocess.run([str(GPU_CHECK)], env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert "gpu_check: no GPU: torch.cuda.is_available() is False" in done.stderr
    assert "Nothing was built or run" in done.stderr
    assert time.monotonic() - started < 60
    assert "passed" not in done.stdout  # no test ran


@pytest.mark.skipif(HAS_CUDA, reason="a machine without CUDA")
def test_require_cuda_turns_a_skipped_cuda_test_into_a_failure():
    test = "tests/test_cuda.py::test_cuda_kernels_registered"
    run = lambda **env: subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                                       cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    relaxed = run()
    assert relaxed.returncode == 0 and "1 skipped" in relaxed.stdout
    required = run(REPLAY_REQUIRE_CUDA="1")
    assert required.returncode == 1 and "REPLAY_REQUIRE_CUDA=1 but this cuda test was skipped" in required.stdout


# ===================================================================== CUDA =========


def _opt_pair(make, params_cpu):
    params_cuda = [p.detach().clone().to("cuda").requires_grad_() for p in params_cpu]
    return make(params_cpu), make(params_cuda), params_cuda


OPTIMIZERS = {
    "sgd": lambda ps: replay.optim.SGD(ps, lr=0.05),
    "sgd_momentum_nesterov_wd": lambda ps: replay.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                                            weight_decay=1e-2),
    "adam": lambda ps: replay.optim.Adam(ps, lr=1e-3, weight_decay=1e-2),
    "adam_amsgrad": lambda ps: replay.optim.Adam(ps, lr=1e-3, amsgrad=True),
    "adamw": lambda ps: replay.optim.AdamW(ps, lr=1e-3),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_optimizer_cpu_and_cuda_same_bits(name):
    """numerics="portable" (the default): the same bits on both devices, step after step."""
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=g).requires_grad_() for n in (1, 7, 33, 4099)]
    opt_cpu, opt_cuda, params_cuda = _opt_pair(OPTIMIZERS[name], params)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, q, grad in zip(params, params_cuda, grads):
            p.grad, q.grad = grad.clone(), grad.to("cuda")
        opt_cpu.step()
        opt_cuda.step()
        assert opt_cpu.fingerprints == opt_cuda.fingerprints, f"step {step}"
        for p, q in zip(params, params_cuda):
            assert q.device.type == "cuda" and same_bits(p, q), f"step {step}"
        for p, q in zip(params, params_cuda):
            for key, value in opt_cpu.state[p].items():
                if isinstance(value, torch.Tensor):
                    assert same_bits(value, opt_cuda.state[q][key]), f"step {step} {key}"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_ema_cpu_and_cuda_same_bits():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 3))
    model_cuda = copy.deepcopy(model).to("cuda")
    ema_cpu, ema_cuda = replay.EMA(model, 0.9), replay.EMA(model_cuda, 0.9)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        with torch.no_grad():
            for p, q in zip(model.state_dict().values(), model_cuda.state_dict().values()):
                if p.is_floating_point():
                    delta = torch.randn(p.shape, generator=g)
                    p.add_(delta)
                    q.add_(delta.to("cuda"))
                else:
                    p.add_(1)
                    q.add_(1)
        assert ema_cpu.update() == ema_cuda.update(), f"step {step}"
        for name, t in ema_cpu.state_dict().items():
            assert same_bits(t, ema_cuda.state_dict()[name]), f"step {step} {name}"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fingerprints_cpu_and_cuda_equal():
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(5, 7, generator=g), torch.randint(-9, 9, (65537,), generator=g),
               torch.randn(3, generator=g).half(), torch.tensor(True), torch.randn(4, 4, generator=g).t(),
               torch.empty(0)]
    assert fingerprints(tensors) == fingerprints([t.to("cuda") for t in tensors])
    assert replay.state_fingerprint({str(i): t for i, t in enumerate(tensors)}) == \
        replay.state_fingerprint({str(i): t.to("cuda") for i, t in enumerate(tensors)})


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_the_engine_keeps_state_on_the_device_and_starts_from_the_cpu_bits():
    program = load_program(DEVICE_MLP)[0]
    on_cpu = Engine(program, Engine.contract_for(program))
    on_cuda = Engine(program.with_overrides(device="cuda"), Engine.contract_for(program))
    for (name, a), b in zip(on_cpu.model.state_dict().items(), on_cuda.model.state_dict().values()):
        assert b.device.type == "cuda" and same_bits(a, b), name  # built on the CPU, then moved
    assert on_cuda.components["queue"].items.device.type == "cuda"
    assert all(t.device.type == "cuda" for t in on_cuda.ema.state_dict().values())
    on_cuda.run_step()
    for state in on_cuda.optimizer.state.values():
        assert state["exp_avg"].device.type == "cuda" and state["exp_avg_sq"].device.type == "cuda"
        assert state["step"].device.type == "cpu"  # torch.optim's convention (not capturable)


@pytest.fixture
def cuda_run(tmp_path):
    # Per test, not per module: a fixture set up before process_settings would leave torch's
    # deterministic mode on for the test files after this one.
    return record(tmp_path / "cuda_run", device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_record_on_cuda_and_verify(cuda_run):
    with RunDir.open(cuda_run) as run:
        manifest = run.manifest
        state = run.load_checkpoint(10)
    assert manifest["device"]["kind"] == "cuda" and manifest["device"]["device"].startswith("cuda:")
    assert manifest["device"]["name"] == torch.cuda.get_device_name(0)
    env = manifest["environment"]
    assert env["device"] == "cuda" and env["cublas_workspace_config"] in device_module.CUBLAS_DETERMINISTIC
    assert env["deterministic_algorithms"] and env["cudnn_deterministic"]
    assert not (env["matmul_tf32"] or env["cudnn_tf32"] or env["cudnn_benchmark"])
    assert all(t.device.type == "cpu" for t in flatten_state(state)[1].values())
    report = ReplaySession(cuda_run).verify(progress=False)
    assert report.ok and report.devices is None, report.describe()
    assert report.checkpoints_compared == [0, 5, 10, 15, 20]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_restore_puts_the_state_on_the_device(cuda_run):
    with RunDir.open(cuda_run) as run:
        program, _ = load_run_program(run, False, False, "verify")
        engine = engine_for_run(run, program)
        restore(run, engine, 10)
    assert all(t.device.type == "cuda" for t in engine.model.state_dict().values())
    assert all(t.device.type == "cuda" for t in engine.ema.state_dict().values())
    assert engine.components["queue"].items.device.type == "cuda"
    assert all(s["exp_avg"].device.type == "cuda" for s in engine.optimizer.state.values())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_placebo_fork_on_cuda_equals_its_parent(cuda_run, tmp_path):
    session = ForkSession(cuda_run, 7, progress=False)
    assert session.placebo_check().ok
    child = session.fork(tmp_path / "child", "placebo")
    with RunDir.open(child) as run:
        assert run.manifest["device"]["kind"] == "cuda"
    assert digests(child) == [d for d in digests(cuda_run) if d[0] >= 7]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_kill_9_during_a_cuda_recording_then_resume_is_bit_identical(tmp_path):
    reference = record(tmp_path / "reference", device="cuda", steps=40, checkpoint_every=6)
    expected = digests(reference)
    for trial, target in enumerate((1, 13, 30)):
        out = tmp_path / f"killed{trial}"
        kill_when_ready(tmp_path, target, ["record", DEVICE_MLP, "--device", "cuda", "--steps", "40",
                                           "--checkpoint-every", "6", "--out", out, "--no-progress"],
                        step_sleep=0.02, after_ready=0.01 * (trial + 1))
        with RunDir.open(out) as run:
            assert not run.is_complete, f"trial {trial}: the recording finished before the kill"
        RecordSession.resume(out, progress=False, say=lambda message: None)
        assert digests(out) == expected, f"trial {trial} (target {target})"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_a_cuda_run_verified_on_the_cpu_reports_honestly(cuda_run, tmp_path):
    """Refused without the allowance; with it, verify must name exactly the first step where a
    CPU recording of the same program parts from the CUDA one (or none, if it never does)."""
    with pytest.raises(ReplayRefused, match="--allow-device-change"):
        ReplaySession(cuda_run, device="cpu").verify(progress=False)
    on_cpu = rows_of(record(tmp_path / "cpu"))
    on_cuda = rows_of(cuda_run)
    assert [r[0] for r in on_cpu] == [r[0] for r in on_cuda] == list(range(20))
    parted = next((a[0] for a, b in zip(on_cpu, on_cuda) if a != b), None)
    report = ReplaySession(cuda_run, device="cpu", allow_device_change=True).verify(progress=False)
    assert report.devices is not None and "replayed on cpu" in report.describe()
    if parted is None:
        assert report.ok, report.describe()
    else:
        assert not report.ok and report.divergence.step == parted, report.describe()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_probe_evaluation_of_a_cuda_model():
    """Experiments evaluate their probe on the model's device and keep the results on the CPU."""
    from replay.experiment.probe import Recorder, evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).to("cuda")
    x = torch.randn(5, 8)
    out = evaluate(model, x, "1")
    assert out["logits"].device.type == "cpu" and out["rep"].device.type == "cpu"
    with torch.no_grad():
        assert same_bits(out["logits"], model(x.to("cuda")).float().cpu())

    class Stub:
        completed = 2

    Stub.model = model
    recorder = Recorder(x, None, {2})
    recorder(Stub)
    assert all(t.device.type == "cpu" for t in recorder.tensors.values()) and "logits@2" in recorder.tensors


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("spec", ["weight_noise:std=0.01", "bitflip:param=0.weight,index=3,bit=7", "reset_ema",
                                  "reset_bn", "recompute_bn"])
def test_perturbations_act_on_cuda_state_as_on_cpu_state(spec):
    """Perturbations that write the state from its own values or from CPU draws give the same
    bits on both devices (recompute_bn runs the model: there only that it runs is checked)."""
    from replay.perturb import from_spec

    program = load_program(DEVICE_MLP)[0]
    trained = Engine(program, Engine.contract_for(program))
    for _ in range(3):  # a state whose EMA, BatchNorm statistics and moments are not their initial values
        trained.run_step()
    state = device_module.host_copy(trained.state_dict())
    engines = [Engine(program.with_overrides(device=d), Engine.contract_for(program)) for d in ("cpu", "cuda")]
    for engine in engines:
        engine.load_state_dict(copy.deepcopy(state))
    before = [engine.fingerprints(use_optimizer=False) for engine in engines]
    assert before[0] == before[1]  # restored onto either device: the same bits
    for engine in engines:
        p = from_spec(spec, start=3)
        p.check(engine)
        p.apply(engine)
    after = [engine.fingerprints(use_optimizer=False) for engine in engines]
    assert after[0] != before[0] and after[1] != before[1]
    if spec != "recompute_bn":
        assert after[0] == after[1]
    assert all(t.device.type == "cuda" for t in engines[1].model.state_dict().values())
