"""replay.store: encoding, atomic writes, checkpoints, the ledger, the run directory and its lock.

Everything is compared exactly: tensors through integer views, floats through their bits.
Crash tests SIGKILL real subprocesses at random moments and then check that every file a reader
would take as data is whole. Pickle appears only here, to build hostile files; a pickle whose
unpickling would create a marker file is dropped into runs and must never be loaded.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pickle
import random
import re
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from conftest import minimal_manifest as M  # a minimal valid manifest
import replay.store as store
from replay.store import (
    CorruptRunError,
    Ledger,
    RunDir,
    RunError,
    RunExistsError,
    RunLockedError,
    StepRow,
    atomic_write_bytes,
    atomic_write_json,
    checkpoint_steps,
    flatten_state,
    float_from_text,
    float_to_text,
    read_checkpoint,
    remove_stale_temporaries,
    sha256_bytes,
    sha256_file,
    unflatten_state,
    write_checkpoint,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOMIC_PY = os.path.join(REPO, "replay", "store", "atomic.py")


# --------------------------------------------------------------------------- helpers ----



def write_manifest_as_writer(run_path, data: bytes) -> None:
    """Replace a run's manifest and its digest in the ledger, as a writer would."""
    (run_path / "manifest.json").write_bytes(data)
    conn = sqlite3.connect(run_path / "ledger.sqlite", isolation_level=None)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'manifest_sha256'", (sha256_bytes(data),))
    conn.close()




def fbits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def from_bits(b: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", b))[0]


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw elements as integers (bit-exact comparison, NaNs included)."""
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view(_INT_VIEW[t.element_size()])


def assert_same(a, b, path="<root>"):
    """Deep equality with exact types, float bits, tensor bits and dict key order."""
    assert type(a) is type(b), f"{path}: type {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)}"
        assert torch.equal(tensor_bits(a), tensor_bits(b)), f"{path}: tensor bits differ"
    elif type(a) is float:
        assert fbits(a) == fbits(b), f"{path}: {a!r} != {b!r} (bits)"
    elif type(a) in (list, tuple):
        assert len(a) == len(b), f"{path}: length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, dict):
        ka, kb = list(a), list(b)
        assert len(ka) == len(kb), f"{path}: keys {ka} != {kb}"
        for x, y in zip(ka, kb):
            assert_same(x, y, f"{path}/<key {x!r}>")
        for k in ka:
            assert_same(a[k], b[k], f"{path}/{k!r}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def via_disk(obj):
    """flatten -> JSON text + safetensors bytes -> unflatten, as a checkpoint does."""
    import safetensors.torch

    skeleton, tensors = flatten_state(obj)
    text = json.dumps(skeleton, allow_nan=False, sort_keys=False)
    tensors = safetensors.torch.load(safetensors.torch.save(tensors))
    return unflatten_state(json.loads(text), tensors)


def python_child(tmp_path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Bomb:
    """Unpickling this creates a marker file: proof that something unpickled it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def bomb(tmp_path):
    marker = str(tmp_path / "UNPICKLED")
    return marker, pickle.dumps({"model": Bomb(marker), "weights": [1.0, 2.0]})


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail loudly if anything reaches for pickle or torch.load while this is active."""

    def forbidden(*a, **k):
        raise AssertionError("the run store tried to unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)


# ---------------------------------------------------------------------------- encode ----


def nan_with_payload():
    return from_bits(0x7FF8000000000ABC)


def test_encode_python_values_round_trip_with_types():
    neg_nan = from_bits(0xFFF8000000000000)
    obj = {
        "ints": [0, 1, -1, 2**63, 2**64 - 1, -(2**100), 10**30],
        "floats": [0.0, -0.0, 1.0, 0.1, 1e300, 5e-324, float("inf"), float("-inf"),
                   float("nan"), neg_nan, nan_with_payload()],
        "bools": [True, False],
        "one": (1, 1.0, True),  # int, float, bool never swap
        "none": None,
        "text": ["", "ünïcödé", "line\nbreak", "\ud800"],
        "nested": {"tuple": (1, (2, [3, (4,)])), "empty": ((), [], {})},
        "int_keys": {0: "a", 1: "b", -5: "c"},
        "mixed_keys": {1: "int", "1": "str", (1, 2): "tuple", 2.5: "float", None: "none",
                       True: "bool"},
        "reserved": {"__tensor__": 3},
        "reserved2": {"__tuple__": [1, 2], "other": 1},
        "reserved3": {"__dict__": {"__float__": "nan"}},
        "ordered": collections.OrderedDict([("b", 1), ("a", 2)]),
        "dtypes": [torch.float32, torch.bfloat16, torch.int64, torch.bool],
    }
    back = via_disk(obj)
    assert_same(obj, back)
    # the skeleton is strict JSON: no NaN / Infinity literals
    skeleton, tensors = flatten_state(obj)
    assert tensors == {}
    json.dumps(skeleton, allow_nan=False)


def test_encode_markers_are_exactly_as_documented():
    skeleton, _ = flatten_state(
        {"t": (1, 2), "k": {3: 4}, "f": [float("inf"), float("-inf"), float("nan")],
         "d": torch.float16, "x": torch.zeros(2)}
    )
    assert skeleton == {
        "t": {"__tuple__": [1, 2]},
        "k": {"__dict__": [[3, 4]]},
        "f": [{"__float__": "inf"}, {"__float__": "-inf"}, {"__float__": "nan"}],
        "d": {"__dtype__": "float16"},
        "x": {"__tensor__": "x"},
    }


TENSOR_CASES = {
    "zero_dim": lambda: torch.tensor(3.5),
    "empty": lambda: torch.zeros(0, 3),
    "empty_int": lambda: torch.zeros(2, 0, dtype=torch.int64),
    "bool": lambda: torch.tensor([True, False, True]),
    "int64_extremes": lambda: torch.tensor([-(2**63), 2**63 - 1, 0, -1]),
    "uint8": lambda: torch.arange(256, dtype=torch.uint8),
    "bfloat16": lambda: torch.randn(7, 5, generator=torch.Generator().manual_seed(1)).bfloat16(),
    "float16": lambda: torch.randn(33, generator=torch.Generator().manual_seed(2)).half(),
    "float64": lambda: torch.randn(4, 4, generator=torch.Generator().manual_seed(3)).double(),
    "float32_nan_payloads": lambda: torch.tensor(
        [0x7FC00001, 0xFFC00000, 0x7F800001, 0x80000000, 0x7F800000, 1], dtype=torch.int64
    ).to(torch.int32).view(torch.float32),
    "bfloat16_specials": lambda: torch.tensor([0x7FC1, 0xFF80, 0x8000, 0x0001], dtype=torch.int32)
    .to(torch.int16).view(torch.bfloat16),
    "uint64": lambda: torch.tensor([0, 1, 2**62], dtype=torch.int64).view(torch.uint64),
    "float8": lambda: torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn),
    "complex64": lambda: torch.complex(torch.randn(5), torch.randn(5)),
    "transposed": lambda: torch.arange(12.0).reshape(3, 4).t(),
    "strided_slice": lambda: torch.arange(20, dtype=torch.int32)[1::3],
    "expanded": lambda: torch.tensor([1.0, 2.0]).expand(3, 2),
    "conj_view": lambda: torch.complex(torch.ones(3), torch.arange(3.0)).conj(),
    "parameter": lambda: torch.nn.Parameter(torch.randn(3, 2)),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_encode_tensors_round_trip_bit_exact(case):
    t = TENSOR_CASES[case]()
    back = via_disk({"t": t, "nested": [t]})
    expected = t.detach().resolve_conj()
    if type(expected) is not torch.Tensor:
        expected = expected.data  # Parameter comes back as a plain tensor (documented)
    for got in (back["t"], back["nested"][0]):
        assert type(got) is torch.Tensor
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(tensor_bits(got), tensor_bits(expected.contiguous()))


def test_flattened_tensors_are_private_contiguous_cpu_copies():
    base = torch.arange(10.0, requires_grad=False)
    shared = base[2:6]
    obj = {"a": base, "b": shared, "c": base.view(2, 5).t(), "g": torch.ones(2, requires_grad=True)}
    _, tensors = flatten_state(obj)
    ptrs = set()
    for name, t in tensors.items():
        assert t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad, name
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
        ptrs.add(t.untyped_storage().data_ptr())
    assert len(ptrs) == len(tensors)  # no shared storage
    base.add_(100)  # the copy does not follow the original
    assert tensors["a"][0].item() == 0.0
    assert torch.equal(tensors["b"], torch.tensor([2.0, 3, 4, 5]))


def test_tensor_keys_are_readable_paths_and_never_collide():
    t = torch.zeros(1)
    skeleton, tensors = flatten_state(
        {"optimizer": {"state": {0: {"exp_avg": t}}}, "a/b": t, "a": {"b": t},
         "__metadata__": t, "list": [t, (t,)]}
    )
    assert "optimizer/state/0/exp_avg" in tensors
    assert {"a/b", "a/b~1"} <= set(tensors)
    assert "__metadata__" not in tensors  # safetensors reserves that name
    assert "list/0" in tensors and "list/1/0" in tensors
    assert len(tensors) == 6
    _, root = flatten_state(t)
    assert list(root) == ["tensor"]


def train_a_bit(model, opt, sched, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()


def make_training(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    opt = torch.optim.AdamW(
        [{"params": model[0].parameters(), "lr": 1e-2},
         {"params": list(model[1].parameters()) + list(model[3].parameters()), "lr": 3e-3,
          "betas": (0.8, 0.99)}],
        weight_decay=0.05, amsgrad=True,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[2e-2, 5e-3], total_steps=50)
    return model, opt, sched


def test_real_training_state_round_trips_and_training_continues_bit_identically():
    model, opt, sched = make_training()
    train_a_bit(model, opt, sched, 5, seed=1)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "step": 5}
    back = via_disk(state)
    assert_same(state, back)
    assert isinstance(back["optimizer"]["state"], dict) and 0 in back["optimizer"]["state"]
    assert type(back["optimizer"]["param_groups"][1]["betas"]) is tuple
    assert "num_batches_tracked" in "".join(back["model"])

    model2, opt2, sched2 = make_training(seed=123)  # different init: everything must come from back
    model2.load_state_dict(back["model"])
    opt2.load_state_dict(back["optimizer"])
    sched2.load_state_dict(back["scheduler"])
    train_a_bit(model, opt, sched, 4, seed=2)
    train_a_bit(model2, opt2, sched2, 4, seed=2)
    assert_same(model.state_dict(), model2.state_dict())
    assert_same(opt.state_dict()["state"], opt2.state_dict()["state"])
    assert_same(sched.state_dict(), sched2.state_dict())


@pytest.mark.parametrize("make_sched", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, 3, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10),
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.9 ** s),
    lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o),
], ids=["StepLR", "Cosine", "LambdaLR", "Plateau"])
def test_scheduler_state_dicts_round_trip(make_sched):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    sched = make_sched(opt)
    for _ in range(4):
        opt.step()
        sched.step(1.0) if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) else sched.step()
    sd = sched.state_dict()
    assert_same(sd, via_disk(sd))


class Thing:
    pass


UNSUPPORTED = {
    "object": (lambda: {"a": {"b": [Thing()]}}, "a/b/0"),
    "function": (lambda: {"fn": lambda x: x}, "fn"),
    "numpy_array": (lambda: {"arr": np.zeros(3)}, "arr"),
    "numpy_scalar": (lambda: {"x": np.float64(1.0)}, "x"),
    "set": (lambda: {"s": {1, 2}}, "s"),
    "bytes": (lambda: {"b": b"x"}, "b"),
    "namedtuple": (lambda: {"nt": collections.namedtuple("P", "x y")(1, 2)}, "nt"),
    "defaultdict": (lambda: {"dd": collections.defaultdict(int)}, "dd"),
    "device": (lambda: {"dev": torch.device("cpu")}, "dev"),
    "complex128": (lambda: {"c": torch.zeros(2, dtype=torch.complex128)}, "c"),
    "sparse": (lambda: {"sp": torch.eye(3).to_sparse()}, "sp"),
    "meta": (lambda: {"m": torch.empty(3, device="meta")}, "m"),
    "tensor_key": (lambda: {"k": {torch.zeros(1): 1}}, "k"),
    "object_key": (lambda: {"k": {Thing(): 1}}, "k"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_encode_rejects_unsupported_values_naming_the_path(case):
    make, path = UNSUPPORTED[case]
    with pytest.raises(TypeError) as info:
        flatten_state(make())
    assert path in str(info.value)


def test_encode_rejects_cycles():
    a = [1]
    a.append(a)
    with pytest.raises(TypeError, match="contains itself"):
        flatten_state({"a": a})
    shared = [1, 2]  # shared (acyclic) references are fine: stored twice
    assert via_disk({"x": shared, "y": shared}) == {"x": [1, 2], "y": [1, 2]}


@pytest.mark.parametrize("skeleton, tensors, match", [
    ({"__tensor__": "gone"}, {}, "not in the tensor file"),
    ({"a": 1}, {"extra": torch.zeros(1)}, "not referenced"),
    ({"__pickle__": "x"}, {}, "unknown marker"),
    ({"__dtype__": "not_a_dtype"}, {}, "unknown dtype"),
    ({"__float__": "1.0x"}, {}, "not a float"),
    ({"__dict__": [[[1], 2]]}, {}, "unhashable"),
    ({"__dict__": [[1, 2], [1, 3]]}, {}, "duplicate"),
    ([{"__tensor__": "t"}, {"__tensor__": "t"}], {"t": torch.zeros(1)}, "referenced twice"),
    ({"__tuple__": [1], "x": 2}, {}, "unexpected key"),
])
def test_unflatten_rejects_malformed_skeletons(skeleton, tensors, match):
    with pytest.raises(ValueError, match=match):
        unflatten_state(skeleton, tensors)


def test_float_text_is_exact_and_canonical():
    values = [0.0, -0.0, 0.1, -1.5e-300, 5e-324, 1.7976931348623157e308, float("inf"),
              float("-inf"), float("nan"), from_bits(0xFFF8000000000000), nan_with_payload(),
              from_bits(0x7FF0000000000001)]
    for v in values:
        text = float_to_text(v)
        assert fbits(float_from_text(text)) == fbits(v), text
    assert float_to_text(float("nan")) == "nan"
    assert float_to_text(nan_with_payload()) == "nan:0x7ff8000000000abc"
    for bad in ["1_0", " 1.0", "Infinity", "nan:0x3ff0000000000000", "nan:zz", "0.10", ""]:
        with pytest.raises(ValueError):
            float_from_text(bad)


# ---------------------------------------------------------------------------- atomic ----


def test_atomic_write_json_format_and_no_leftovers(tmp_path):
    p = tmp_path / "m.json"
    atomic_write_json(p, {"b": 1, "a": [1.5, None]})
    assert p.read_text() == json.dumps({"b": 1, "a": [1.5, None]}, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(p, b"xyz")
    assert p.read_bytes() == b"xyz"
    assert os.listdir(tmp_path) == ["m.json"]
    assert sha256_file(p) == sha256_bytes(b"xyz")
    assert sha256_bytes(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_atomic_write_json_refuses_nan_and_leaves_the_old_file(tmp_path):
    p = tmp_path / "m.json"
    atomic_write_json(p, {"v": 1})
    with pytest.raises(ValueError):
        atomic_write_json(p, {"v": float("nan")})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"v": object()})
    assert json.loads(p.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["m.json"]


def test_atomic_write_failure_midway_leaves_no_temporary(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")

    def boom(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


ATOMIC_CHILD = """
import hashlib, importlib.util, os, sys
spec = importlib.util.spec_from_file_location("store_atomic", sys.argv[1])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
folder = sys.argv[2]
i = 0
while True:
    for name in ("a.json", "b.json", "c.json"):
        blob = hashlib.sha256(str(i).encode()).hexdigest() * 8000  # ~0.5 MB
        atomic.atomic_write_json(os.path.join(folder, name),
                                 {"i": i, "blob": blob, "sha": hashlib.sha256(blob.encode()).hexdigest()})
    if i == 0:
        print("ready", flush=True)
    i += 1
"""


def test_atomic_write_survives_sigkill(tmp_path):
    """Kill a writer at random moments: every file present is a whole, valid version."""
    import hashlib

    child = python_child(tmp_path, "child.py", ATOMIC_CHILD)
    rng = random.Random(20240601)
    data = tmp_path / "data"
    data.mkdir()
    leftovers = 0
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, child, ATOMIC_PY, str(data)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        names = os.listdir(data)
        leftovers += sum(n.startswith(".tmp-") for n in names)
        finals = sorted(n for n in names if not n.startswith(".tmp-"))
        assert finals == ["a.json", "b.json", "c.json"]
        for n in finals:
            obj = json.loads((data / n).read_text())  # whole JSON, never a torn file
            assert hashlib.sha256(obj["blob"].encode()).hexdigest() == obj["sha"], n
    # the temporaries a kill can leave are never under a final name (checked above); note how
    # many there were so a reader of the test log can see the kill landed mid-write sometimes
    print(f"temporaries left by kills: {leftovers}")


# ------------------------------------------------------------------------ checkpoints ----


def sample_state(step: int):
    g = torch.Generator().manual_seed(step)
    return {
        "step": step,
        "model": collections.OrderedDict(
            [("w", torch.randn(4, 3, generator=g)), ("bn.num_batches_tracked", torch.tensor(step))]
        ),
        "optimizer": {"state": {0: {"exp_avg": torch.randn(4, 3, generator=g).bfloat16()}},
                      "param_groups": [{"lr": 0.1 / (step + 1), "betas": (0.9, 0.999),
                                        "params": [0]}]},
        "queue": {"buf": torch.zeros(0, 8), "ptr": step % 7, "flag": torch.tensor(True)},
        "lost": float("nan"),
    }


def test_checkpoint_round_trip(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    files = write_checkpoint(ck, 7, sample_state(7))
    folder = ck / "step-00000007"
    assert sorted(os.listdir(folder)) == ["state.json", "tensors.safetensors"]
    assert files == {f: sha256_file(folder / f) for f in ("tensors.safetensors", "state.json")}
    assert os.listdir(ck) == ["step-00000007"]
    assert_same(sample_state(7), read_checkpoint(ck, 7, files))
    # restored tensors own writable memory (an optimizer may update them in place)
    back = read_checkpoint(ck, 7, files)
    back["model"]["w"].add_(1)
    assert_same(sample_state(7), read_checkpoint(ck, 7, files))


def test_checkpoint_overwrite_and_listing(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    write_checkpoint(ck, 3, sample_state(3))
    files = write_checkpoint(ck, 3, sample_state(4))  # replace step 3's content
    assert_same(sample_state(4), read_checkpoint(ck, 3, files))
    write_checkpoint(ck, 10**8 + 5, sample_state(1))
    # things checkpoint_steps must ignore
    (ck / ".tmp-step-00000009-abcd").mkdir()
    (ck / ".tmp-step-00000009-abcd" / "tensors.safetensors").write_bytes(b"partial")
    (ck / "step-00000011").mkdir()  # incomplete (no files)
    (ck / "step-000000012").mkdir()  # not our spelling
    (ck / "step-00000013").write_bytes(b"a file, not a folder")
    (ck / "notes.txt").write_text("hello")
    assert checkpoint_steps(ck) == [3, 10**8 + 5]
    assert remove_stale_temporaries(ck) == [".tmp-step-00000009-abcd"]
    assert not any(n.startswith(".tmp-") for n in os.listdir(ck))


def test_checkpoint_overwrite_without_rename_exchange(tmp_path, monkeypatch):
    import replay.store.checkpoint as cpmod

    monkeypatch.setattr(cpmod, "_exchange", lambda a, b: False)
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    write_checkpoint(ck, 1, sample_state(1))
    files = write_checkpoint(ck, 1, sample_state(2))
    assert_same(sample_state(2), read_checkpoint(ck, 1, files))
    assert os.listdir(ck) == ["step-00000001"]


def test_checkpoint_failed_write_leaves_nothing(tmp_path, monkeypatch):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    with pytest.raises(TypeError, match="queue/fn"):
        write_checkpoint(ck, 1, {"queue": {"fn": print}})
    assert os.listdir(ck) == []
    files = write_checkpoint(ck, 2, sample_state(2))

    def boom(*a):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "rename", boom)
    import replay.store.checkpoint as cpmod

    monkeypatch.setattr(cpmod, "_exchange", lambda a, b: False)
    with pytest.raises(OSError):
        write_checkpoint(ck, 2, sample_state(3))
    with pytest.raises(OSError):
        write_checkpoint(ck, 4, sample_state(4))
    assert os.listdir(ck) == ["step-00000002"]
    assert_same(sample_state(2), read_checkpoint(ck, 2, files))


def flip_byte(path, where=0.5):
    data = bytearray(open(path, "rb").read())
    i = min(len(data) - 1, int(len(data) * where))
    data[i] ^= 0x01
    open(path, "wb").write(bytes(data))


DAMAGE = {
    "flip_middle": lambda p: flip_byte(p, 0.5),
    "flip_last": lambda p: flip_byte(p, 1.0),
    "flip_first": lambda p: flip_byte(p, 0.0),
    "truncate": lambda p: open(p, "r+b").truncate(os.path.getsize(p) // 2),
    "truncate_one": lambda p: open(p, "r+b").truncate(os.path.getsize(p) - 1),
    "empty": lambda p: open(p, "wb").close(),
    "delete": lambda p: os.unlink(p),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("fname", ["tensors.safetensors", "state.json"])
def test_damaged_checkpoint_file_is_named(tmp_path, fname, damage):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    files = write_checkpoint(ck, 5, sample_state(5))
    target = ck / "step-00000005" / fname
    DAMAGE[damage](target)
    with pytest.raises(CorruptRunError) as info:
        read_checkpoint(ck, 5, files)
    assert info.value.path == str(target)
    assert str(target) in str(info.value)


@pytest.mark.parametrize("fname", ["tensors.safetensors", "state.json"])
def test_unparseable_file_with_matching_hash_is_named(tmp_path, fname):
    """Even with a forged ledger hash, a bad file fails to parse cleanly, naming itself."""
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    files = write_checkpoint(ck, 5, sample_state(5))
    target = ck / "step-00000005" / fname
    target.write_bytes(b'{"__tensor__": "nope"}' if fname == "state.json" else b"\x08" + b"\0" * 20)
    files[fname] = sha256_file(target)
    with pytest.raises(CorruptRunError) as info:
        read_checkpoint(ck, 5, files)
    assert info.value.path == str(target)


def test_bomb_fixture_really_goes_off(tmp_path, bomb):
    """The marker mechanism works: unpickling the payload does create the marker."""
    marker, payload = bomb
    pickle.loads(payload)
    assert os.path.exists(marker)


@pytest.mark.parametrize("fname", ["tensors.safetensors", "state.json"])
@pytest.mark.parametrize("forged", [False, True], ids=["hash_mismatch", "forged_hash"])
def test_pickle_in_place_of_a_checkpoint_file_is_never_loaded(tmp_path, bomb, no_unpickling,
                                                               fname, forged):
    marker, payload = bomb
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    files = write_checkpoint(ck, 5, sample_state(5))
    target = ck / "step-00000005" / fname
    target.write_bytes(payload)
    if forged:
        files[fname] = sha256_file(target)
    with pytest.raises(CorruptRunError) as info:
        read_checkpoint(ck, 5, files)
    assert info.value.path == str(target)
    assert not os.path.exists(marker)


def test_torch_save_file_in_place_of_tensors_is_never_loaded(tmp_path, bomb):
    marker, _ = bomb
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    files = write_checkpoint(ck, 5, sample_state(5))
    target = ck / "step-00000005" / "tensors.safetensors"
    torch.save({"w": torch.zeros(3), "bomb": Bomb(marker)}, target)
    files["tensors.safetensors"] = sha256_file(target)
    with pytest.raises(CorruptRunError):
        read_checkpoint(ck, 5, files)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("extra", ["extra.pkl", "model.pt", "state.pickle", "optimizer.bin"])
def test_extra_pickle_next_to_a_checkpoint_is_ignored(tmp_path, bomb, no_unpickling, extra):
    marker, payload = bomb
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    files = write_checkpoint(ck, 5, sample_state(5))
    (ck / "step-00000005" / extra).write_bytes(payload)
    assert_same(sample_state(5), read_checkpoint(ck, 5, files))
    assert checkpoint_steps(ck) == [5]
    assert not os.path.exists(marker)


# ----------------------------------------------------------------------------- ledger ----


def make_row(step, **kw):
    base = dict(
        step=step, epoch=step // 10, batch_ids=[step * 3, step * 3 + 1, -1], batch_hash=f"h{step}",
        loss=1.0 / (step + 3), lr=0.1 * 0.99**step, metrics={"acc": step / 7, "n": 3.0},
        fingerprints={"model": {"w": (step * 0x9E3779B97F4A7C15) % 2**64, "b": 2**64 - 1 - step},
                      "optimizer": {"exp_avg": 2**63 + step}},
        digest=(2**64 - 1) ^ step,
    )
    base.update(kw)
    return StepRow(**base)


def assert_rows_same(a: StepRow, b: StepRow):
    assert_same(a.__dict__, b.__dict__)


def test_ledger_round_trip_exact(tmp_path):
    path = tmp_path / "ledger.sqlite"
    special = [
        make_row(0, loss=float("nan"), lr=float("inf"),
                 metrics={"a": float("-inf"), "b": -0.0, "c": nan_with_payload(),
                          "d": from_bits(0xFFF8000000000000), "tiny": 5e-324},
                 fingerprints={"model": {"max": 2**64 - 1, "top": 2**63, "zero": 0,
                                         "mid": 2**63 - 1}},
                 digest=2**64 - 1),
        make_row(1, loss=None, lr=None, metrics={}, fingerprints={}, batch_ids=[], digest=0),
        make_row(2, loss=np.float32(0.1), lr=3, metrics={"x": np.float64(0.3)}),
    ]
    rows = special + [make_row(s) for s in range(3, 40)]
    with Ledger.create(path) as led:
        led.append_step(rows[0])
        led.append_steps(rows[1:])
        assert led.last_step() == 39
    with Ledger.open(path) as led:  # read-only, from disk
        got = led.rows()
        assert len(got) == 40
        for a, b in zip(got[3:], rows[3:]):
            assert_rows_same(a, b)
        assert_rows_same(got[0], rows[0])
        assert got[1].loss is None and got[1].lr is None and got[1].fingerprints == {}
        # numpy/int inputs are stored as the exact Python float they convert to
        assert fbits(got[2].loss) == fbits(float(np.float32(0.1)))
        assert type(got[2].lr) is float and got[2].lr == 3.0
        assert_rows_same(led.step_row(17), rows[17])
        assert led.step_row(1000) is None
        assert [r.step for r in led.rows(5, 8)] == [5, 6, 7, 8]
        assert [r.step for r in led.rows(start=37)] == [37, 38, 39]
        assert [r.step for r in led.rows(end=1)] == [0, 1]
    # 64-bit values are stored as text, readable without replay
    con = sqlite3.connect(path)
    assert con.execute("SELECT digest, loss FROM steps WHERE step = 0").fetchone() == (
        "ffffffffffffffff", "nan")
    con.close()


@pytest.mark.parametrize("bad, exc", [
    (dict(digest=2**64), ValueError),
    (dict(digest=-1), ValueError),
    (dict(digest=True), TypeError),
    (dict(fingerprints={"m": {"w": 2**64}}), ValueError),
    (dict(fingerprints={"m": {"w": 1.0}}), TypeError),
    (dict(loss="0.1"), TypeError),
    (dict(metrics={"a": None}), TypeError),
    (dict(batch_ids=[1.5]), TypeError),
    (dict(step=-1), ValueError),
])
def test_ledger_rejects_bad_rows(tmp_path, bad, exc):
    with Ledger.create(tmp_path / "l.sqlite") as led:
        with pytest.raises(exc):
            led.append_step(dataclasses.replace(make_row(0), **bad))
        assert led.last_step() is None


def test_ledger_duplicate_step_and_all_or_nothing_batches(tmp_path):
    with Ledger.create(tmp_path / "l.sqlite") as led:
        led.append_step(make_row(0))
        with pytest.raises(ValueError, match="step 0 is already recorded"):
            led.append_step(make_row(0))
        with pytest.raises(ValueError):
            led.append_steps([make_row(1), make_row(2), make_row(0)])
        assert led.last_step() == 0


def test_ledger_truncate_after(tmp_path):
    with Ledger.create(tmp_path / "l.sqlite") as led:
        led.append_steps([make_row(s) for s in range(20)])
        for s in (0, 5, 10, 15):
            led.record_checkpoint(s, {"tensors.safetensors": "aa" * 32, "state.json": f"{s}"})
        led.record_epoch(0, "e0")
        led.record_epoch(1, "e1")
        led.add_event("start", {"x": 1})
        led.truncate_after(7)
        assert led.last_step() == 7
        assert [r.step for r in led.rows()] == list(range(8))
        assert list(led.checkpoints()) == [0, 5]
        assert led.epochs() == {0: "e0", 1: "e1"}
        assert len(led.events()) == 1
        led.append_step(make_row(8))  # re-recording after a truncation works
        led.record_checkpoint(9, {"state.json": "9"})
        led.record_checkpoint(12, {"state.json": "12"})
        led.truncate_after(3, keep_checkpoint=5)  # checkpoint 5 = state after steps 0..4
        assert led.last_step() == 3 and list(led.checkpoints()) == [0, 5]
        led.truncate_after(-1)
        assert led.last_step() is None and led.checkpoints() == {}


def test_ledger_epochs_checkpoints_events(tmp_path):
    with Ledger.create(tmp_path / "l.sqlite") as led:
        led.record_epoch(0, "abc")
        led.record_epoch(0, "abc")  # idempotent
        with pytest.raises(ValueError, match="epoch 0 is recorded with order hash abc"):
            led.record_epoch(0, "abd")
        led.record_epoch(2, "x")
        assert led.epochs() == {0: "abc", 2: "x"}
        files = {"tensors.safetensors": "1" * 64, "state.json": "2" * 64}
        led.record_checkpoint(10, files)
        led.record_checkpoint(3, files)
        assert led.checkpoints() == {3: files, 10: files}
        assert list(led.checkpoints()) == [3, 10]
        assert led.checkpoint_files(10) == files and led.checkpoint_files(4) is None
        led.remove_checkpoint(10)
        assert list(led.checkpoints()) == [3]
        led.add_event("resume", {"from": 3, "why": ["crash"]})
        led.add_event("env-override", {})
        with pytest.raises(ValueError):
            led.add_event("bad", M(x=float("nan")))
        ev = led.events()
        assert [e["kind"] for e in ev] == ["resume", "env-override"]
        assert ev[0]["detail"] == {"from": 3, "why": ["crash"]}
        assert ev[0]["id"] < ev[1]["id"] and abs(ev[0]["time"] - time.time()) < 60


def test_ledger_read_only(tmp_path):
    missing = tmp_path / "nope.sqlite"
    with pytest.raises(CorruptRunError, match="nope.sqlite"):
        Ledger.open(missing)
    assert not missing.exists()
    path = tmp_path / "l.sqlite"
    Ledger.create(path).close()
    with pytest.raises(RunExistsError):
        Ledger.create(path)
    with Ledger.open(path) as led:
        with pytest.raises(RunError, match="read-only"):
            led.append_step(make_row(0))
    led.close()  # idempotent
    with pytest.raises(RunError, match="closed"):
        led.last_step()


def test_ledger_reader_sees_writer_commits(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger.create(path) as w:
        w.append_step(make_row(0))
        with Ledger.open(path) as r:
            assert r.last_step() == 0
            w.append_step(make_row(1))
            assert r.last_step() == 1


def ledger_with_pages(path, rows=300):
    with Ledger.create(path) as led:
        led.append_steps([make_row(s) for s in range(rows)])
    assert not os.path.exists(str(path) + "-wal") or os.path.getsize(str(path) + "-wal") == 0
    return os.path.getsize(path)


LEDGER_DAMAGE = {
    "junk_page_middle": lambda p, n: _overwrite(p, (n // 4096 // 2) * 4096,
                                                random.Random(1).randbytes(4096)),
    "junk_in_header": lambda p, n: _overwrite(p, 16, b"\xff" * 40),
    "junk_magic": lambda p, n: _overwrite(p, 0, b"not a database!!"),
    "truncate_half": lambda p, n: open(p, "r+b").truncate(n // 2),
    "truncate_tail": lambda p, n: open(p, "r+b").truncate(n - 4096),
    "random_file": lambda p, n: open(p, "wb").write(random.Random(2).randbytes(n)),
    "empty_file": lambda p, n: open(p, "wb").close(),
    "other_sqlite_db": lambda p, n: _other_db(p),
}


def _overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _other_db(path):
    os.unlink(path)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t(x)")
    con.commit()
    con.close()


@pytest.mark.parametrize("damage", sorted(LEDGER_DAMAGE))
@pytest.mark.parametrize("writable", [False, True], ids=["reader", "writer"])
def test_damaged_ledger_is_named(tmp_path, damage, writable):
    path = tmp_path / "ledger.sqlite"
    n = ledger_with_pages(path)
    LEDGER_DAMAGE[damage](path, n)
    with pytest.raises(CorruptRunError) as info:
        Ledger.open(path, writable=writable)  # quick_check at open finds it
    assert info.value.path == str(path)
    assert "ledger.sqlite" in str(info.value)


# -------------------------------------------------------------------------- run dir ----


def test_run_create_open_manifest(tmp_path):
    path = tmp_path / "runs" / "r1"  # parents are created
    with RunDir.create(path, M(seed=3)) as run:
        assert run.writable and run.path == str(path)
        assert run.manifest == {**M(seed=3), "status": "incomplete", "store_version": 1}
        assert not run.is_complete
        names = set(os.listdir(path)) - {"ledger.sqlite-wal", "ledger.sqlite-shm"}  # WAL, while open
        assert names == {".lock", "checkpoints", "ledger.sqlite", "manifest.json"}
        assert os.listdir(path.parent) == ["r1"]  # the temporary build folder is gone
        with RunDir.open(path) as reader:  # readers need no lock
            assert reader.manifest["seed"] == 3 and not reader.writable
            with pytest.raises(RunError, match="read-only"):
                reader.mark_complete()
            with pytest.raises(RunError, match="read-only"):
                reader.save_checkpoint(0, {})
        assert run.update_manifest({"seed": 4, "note": [1, 2]})["seed"] == 4
        with pytest.raises(ValueError):
            run.update_manifest({"status": "done"})
        with pytest.raises(ValueError):
            run.update_manifest({"store_version": 99})
        with pytest.raises(ValueError):
            run.update_manifest({"x": float("inf")})
        run.mark_complete()
        assert run.is_complete
    with RunDir.open(path) as run:
        assert run.is_complete and run.manifest["note"] == [1, 2]
    assert json.loads((path / "manifest.json").read_text())["status"] == "complete"


def test_run_create_refuses_existing(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(RunExistsError):
        RunDir.create(tmp_path / "full", M())
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunExistsError):
        RunDir.create(tmp_path / "file", M())
    RunDir.create(tmp_path / "r", M()).close()
    with pytest.raises(RunExistsError):
        RunDir.create(tmp_path / "r", M())
    (tmp_path / "empty").mkdir()
    RunDir.create(tmp_path / "empty", M(ok=True)).close()  # an empty folder is fine
    assert RunDir.open(tmp_path / "empty").manifest["ok"] is True
    with pytest.raises(ValueError):
        RunDir.create(tmp_path / "nan", M(x=float("nan")))
    assert not (tmp_path / "nan").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_run_open_errors(tmp_path):
    with pytest.raises(RunError, match="no run directory"):
        RunDir.open(tmp_path / "missing")
    (tmp_path / "notrun").mkdir()
    with pytest.raises(RunError, match="no manifest.json"):
        RunDir.open(tmp_path / "notrun")
    RunDir.create(tmp_path / "r", M()).close()
    manifest = tmp_path / "r" / "manifest.json"
    good = manifest.read_bytes()
    for bad in [b"{not json", b"[1, 2]", b'{"status": "weird", "store_version": 1}',
                b'{"status": "complete", "store_version": NaN}', good[: len(good) // 2], b""]:
        manifest.write_bytes(bad)
        with pytest.raises(CorruptRunError) as info:
            RunDir.open(tmp_path / "r")
        assert info.value.path == str(manifest)
    newer = json.dumps({**M(), "status": "complete", "store_version": 2}).encode()
    write_manifest_as_writer(tmp_path / "r", newer)  # as a newer replay would
    with pytest.raises(RunError, match=r"written by a newer replay \(format 2\); this is format 1: upgrade"):
        RunDir.open(tmp_path / "r")
    write_manifest_as_writer(tmp_path / "r", good)
    RunDir.open(tmp_path / "r").close()
    os.rmdir(tmp_path / "r" / "checkpoints")
    with pytest.raises(CorruptRunError, match="checkpoints"):
        RunDir.open(tmp_path / "r")


def test_run_checkpoints(tmp_path):
    with RunDir.create(tmp_path / "r", M()) as run:
        for s in (0, 4, 8):
            run.save_checkpoint(s, sample_state(s))
        assert run.checkpoint_steps() == [0, 4, 8]
        assert_same(sample_state(4), run.load_checkpoint(4))
        assert run.latest_checkpoint_at_or_before(7) == 4
        assert run.latest_checkpoint_at_or_before(8) == 8
        assert run.latest_checkpoint_at_or_before(100) == 8
        # a complete but unrecorded folder (a crash between write and record) is ignored
        write_checkpoint(run.checkpoints_dir, 12, sample_state(12))
        assert run.latest_checkpoint_at_or_before(100) == 8
        with pytest.raises(CorruptRunError, match="step-00000012: no checkpoint of step 12"):
            run.load_checkpoint(12)
        # overwriting a recorded checkpoint records the new hashes
        files = run.save_checkpoint(4, sample_state(40))
        assert run.ledger.checkpoint_files(4) == files
        assert_same(sample_state(40), run.load_checkpoint(4))
        run.save_checkpoint(12, sample_state(12))  # overwrites the unrecorded folder
        run.ledger.append_steps([make_row(s) for s in range(13)])
        run.save_checkpoint(10, sample_state(10))
        run.truncate_after(8, keep_checkpoint=10)
        assert run.checkpoint_steps() == [0, 4, 8, 10] and run.ledger.last_step() == 8
        assert checkpoint_steps(run.checkpoints_dir) == [0, 4, 8, 10]
        run.truncate_after(5)
        assert run.checkpoint_steps() == [0, 4]
        assert checkpoint_steps(run.checkpoints_dir) == [0, 4]
        assert run.ledger.last_step() == 5
        assert sorted(os.listdir(run.checkpoints_dir)) == ["step-00000000", "step-00000004"]
    with RunDir.open(tmp_path / "r") as reader:
        assert_same(sample_state(0), reader.load_checkpoint(0))
        assert reader.latest_checkpoint_at_or_before(3) == 0


def test_run_checkpoint_corruption_and_pickles(tmp_path, bomb, no_unpickling):
    marker, payload = bomb
    path = tmp_path / "r"
    with RunDir.create(path, M()) as run:
        run.save_checkpoint(2, sample_state(2))
    folder = path / "checkpoints" / "step-00000002"
    (folder / "weights.pkl").write_bytes(payload)
    (path / "checkpoints" / "step-00000003.pkl").write_bytes(payload)
    (path / "run.pkl").write_bytes(payload)
    with RunDir.open(path, writable=True) as run:
        assert_same(sample_state(2), run.load_checkpoint(2))
    flip_byte(folder / "tensors.safetensors")
    with RunDir.open(path) as run, pytest.raises(CorruptRunError) as info:
        run.load_checkpoint(2)
    assert info.value.path == str(folder / "tensors.safetensors")
    (path / "manifest.json").write_bytes(payload)
    with pytest.raises(CorruptRunError, match="manifest.json"):
        RunDir.open(path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("damage", ["junk_page_middle", "truncate_half", "random_file"])
def test_run_with_damaged_ledger_is_named(tmp_path, damage):
    path = tmp_path / "r"
    with RunDir.create(path, M()) as run:
        run.ledger.append_steps([make_row(s) for s in range(300)])
    ledger = path / "ledger.sqlite"
    LEDGER_DAMAGE[damage](ledger, os.path.getsize(ledger))
    for writable in (False, True):
        with pytest.raises(CorruptRunError) as info:
            with RunDir.open(path, writable=writable) as run:
                run.ledger.rows()
        assert info.value.path == str(ledger)
    # a failed writable open released the lock: a pickle in place of the ledger is also refused
    ledger.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(CorruptRunError, match="ledger.sqlite"):
        RunDir.open(path, writable=True)


def test_run_lock_same_process(tmp_path):
    path = tmp_path / "r"
    run = RunDir.create(path, M())
    with pytest.raises(RunLockedError) as info:
        RunDir.open(path, writable=True)
    assert info.value.pid == os.getpid()
    assert str(os.getpid()) in str(info.value)
    RunDir.open(path).close()  # a reader is fine
    run.close()
    run.close()  # idempotent
    with RunDir.open(path, writable=True) as again:
        with pytest.raises(RunLockedError):
            RunDir.open(path, writable=True)
        assert again.writable
    with RunDir.open(path, writable=True):
        pass
    # dropping a writer without close() does not leave the run locked
    run = RunDir.open(path, writable=True)
    del run
    import gc

    gc.collect()
    RunDir.open(path, writable=True).close()


LOCK_CHILD = """
import sys, time
from replay.store import RunDir, RunLockedError

path, mode = sys.argv[1], sys.argv[2]

def attempt():
    try:
        RunDir.open(path, writable=True).close()
        print("GOT", flush=True)
    except RunLockedError as e:
        print("LOCKED", e.pid, flush=True)

if mode == "try-twice":
    attempt()
    sys.stdin.readline()
    attempt()
elif mode == "hold-and-fork":  # a forked child (a data-loader worker) outlives its parent
    import os
    run = RunDir.open(path, writable=True)
    pid = os.fork()
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    print("HOLDING", pid, flush=True)
    time.sleep(120)
else:  # hold
    run = RunDir.open(path, writable=True)
    print("HOLDING", flush=True)
    time.sleep(120)
"""


def test_run_lock_across_processes(tmp_path):
    child = python_child(tmp_path, "lock_child.py", LOCK_CHILD)
    path = tmp_path / "r"
    run = RunDir.create(path, M())
    proc = subprocess.Popen([sys.executable, child, str(path), "try-twice"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert proc.stdout.readline().split() == ["LOCKED", str(os.getpid())]
        run.close()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "GOT"
    finally:
        proc.kill()
        proc.wait()

    # a holder that dies by SIGKILL leaves the run unlocked
    proc = subprocess.Popen([sys.executable, child, str(path), "hold"], stdout=subprocess.PIPE,
                            text=True, env=child_env())
    try:
        assert proc.stdout.readline().strip() == "HOLDING"
        with pytest.raises(RunLockedError) as info:
            RunDir.open(path, writable=True)
        assert info.value.pid == proc.pid
    finally:
        proc.kill()
        proc.wait()
    RunDir.open(path, writable=True).close()


def test_a_forked_child_does_not_keep_its_dead_parents_lock(tmp_path):
    """A child forked while the run is locked inherits the lock's fd; it closes it at once, so
    a parent killed with -9 leaves the run writable though the child lives on."""
    child = python_child(tmp_path, "lock_child.py", LOCK_CHILD)
    path = tmp_path / "r"
    RunDir.create(path, M()).close()
    proc = subprocess.Popen([sys.executable, child, str(path), "hold-and-fork"], stdout=subprocess.PIPE,
                            text=True, env=child_env())
    grandchild = None
    try:
        word, grandchild = proc.stdout.readline().split()
        grandchild = int(grandchild)
        assert word == "HOLDING"
        with pytest.raises(RunLockedError):
            RunDir.open(path, writable=True)  # the parent holds it
        proc.kill()
        proc.wait()
        os.kill(grandchild, 0)  # the forked child is still alive
        RunDir.open(path, writable=True).close()
    finally:
        proc.kill()
        proc.wait()
        if grandchild is not None:
            try:
                os.kill(grandchild, signal.SIGKILL)
            except ProcessLookupError:
                pass


RECORD_CHILD = """
import json, sys, torch
from replay.store import RunDir, StepRow

def state(step):
    g = torch.Generator().manual_seed(step)
    return {"step": step, "w": torch.randn(256, 512, generator=g), "t": (step, step / 3)}

run = RunDir.create(sys.argv[1], json.loads(sys.argv[2]))
step = 0
while True:
    run.ledger.append_step(StepRow(step, 0, [step], "h", step / 7, None, {},
                                   {"m": {"w": (step * 0x9E3779B97F4A7C15) % 2**64}}, step))
    if step % 2 == 0:
        run.save_checkpoint(step, state(step))
    if step % 5 == 0 and step >= 2:
        run.save_checkpoint(step - 2, state(step - 2))  # overwrite a recorded checkpoint
    if step == 3:
        print("ready", flush=True)
    step += 1
"""


def test_recording_killed_at_random_leaves_a_consistent_run(tmp_path):
    """SIGKILL a recording: the ledger opens, every recorded checkpoint passes its hash and holds
    the state of its step, no temporary is taken as data, and the lock is free."""
    child = python_child(tmp_path, "record_child.py", RECORD_CHILD)
    rng = random.Random(7)
    for i in range(3):
        path = tmp_path / f"run{i}"
        proc = subprocess.Popen([sys.executable, child, str(path), json.dumps(M())], stdout=subprocess.PIPE,
                                text=True, env=child_env())
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

        with RunDir.open(path) as run:
            assert not run.is_complete
            last = run.ledger.last_step()
            rows = run.ledger.rows()
            assert [r.step for r in rows] == list(range(last + 1))
            assert all(r.digest == r.step and r.loss == r.step / 7 for r in rows)
            recorded = run.checkpoint_steps()
            assert recorded and recorded[-1] <= last
            for s in recorded:
                got = run.load_checkpoint(s)
                g = torch.Generator().manual_seed(s)
                assert got["step"] == s and got["t"] == (s, s / 3)
                assert torch.equal(got["w"], torch.randn(256, 512, generator=g))
            # every complete step folder, recorded or not, holds a whole checkpoint of its step
            for s in checkpoint_steps(run.checkpoints_dir):
                folder = os.path.join(run.checkpoints_dir, f"step-{s:08d}")
                on_disk = {f: sha256_file(os.path.join(folder, f))
                           for f in ("tensors.safetensors", "state.json")}
                got = read_checkpoint(run.checkpoints_dir, s, on_disk)
                g = torch.Generator().manual_seed(s)
                assert got["step"] == s and torch.equal(got["w"], torch.randn(256, 512, generator=g))
        with RunDir.open(path, writable=True) as run:  # the dead writer's lock is gone
            assert not [n for n in os.listdir(run.checkpoints_dir) if n.startswith(".tmp-")]
            assert set(run.checkpoint_steps()) <= set(checkpoint_steps(run.checkpoints_dir))


def test_public_api_names():
    for name in ["RunError", "CorruptRunError", "RunLockedError", "RunExistsError",
                 "atomic_write_bytes", "atomic_write_json", "fsync_dir", "sha256_file",
                 "sha256_bytes", "flatten_state", "unflatten_state", "write_checkpoint",
                 "read_checkpoint", "checkpoint_steps", "remove_stale_temporaries", "StepRow",
                 "Ledger", "RunDir", "MANIFEST", "LEDGER", "CHECKPOINTS", "LOCK"]:
        assert hasattr(store, name), name
    assert issubclass(CorruptRunError, RunError) and issubclass(RunLockedError, RunError)
    assert issubclass(RunExistsError, RunError)
    assert (store.MANIFEST, store.LEDGER, store.CHECKPOINTS, store.LOCK) == (
        "manifest.json", "ledger.sqlite", "checkpoints", ".lock")


def test_store_sources_never_use_pickle():
    folder = os.path.join(REPO, "replay", "store")
    for name in os.listdir(folder):
        if name.endswith(".py"):
            text = open(os.path.join(folder, name)).read()
            for pattern in (r"^\s*(?:import|from)\s+(?:pickle|dill|joblib|marshal|shelve)\b",
                            r"\bpickle\.\w", r"(?<![\w.])torch\.load\b", r"\beval\(", r"\bexec\("):
                assert not re.search(pattern, text, re.M), f"{name} matches {pattern}"
