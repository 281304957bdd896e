"""torch.library.opcheck on every op of the torch.ops.replay namespace.

opcheck runs each op for real and checks the schema (declared mutations and aliasing), the
autograd registration, the fake (meta) implementation against the real outputs, and AOT
dispatch with dynamic shapes. Arguments follow replay/_ops.py's conventions (the scalars the
wrappers derive on the host).
"""

import pytest
import torch

import replay._ops
from replay import _numerics

replay._ops.load()  # the extension loads on first use: register torch.ops.replay and its fakes now

SIZES = (5, 0, 1000, 33)  # an empty tensor among tensors of different sizes


def floats(seed, positive=False):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(n, generator=gen) for n in SIZES]
    return [t.abs() for t in out] if positive else out


def numerics_codes(uses_sqrt):
    codes = [_numerics.PORTABLE]
    try:
        codes.append(_numerics.resolve("torch", torch.device("cpu"), uses_sqrt=uses_sqrt))
    except _numerics.NumericsUnavailable:
        pass
    return codes


def fingerprint_sums_cases():
    gen = torch.Generator().manual_seed(0)
    yield "mixed_widths", ([
        torch.randint(-100, 100, (3,), dtype=torch.int64, generator=gen),
        torch.empty(0, dtype=torch.int32),
        torch.randint(0, 255, (1000,), dtype=torch.uint8, generator=gen),
        torch.randint(-999, 999, (7, 3), dtype=torch.int16, generator=gen),
    ],)
    yield "one_tensor", ([torch.randint(0, 2**31 - 1, (70_000,), dtype=torch.int32, generator=gen)],)
    # No "no tensors" case: with an empty list the dispatcher has no tensor to pick a backend
    # from and raises NotImplementedError (replay.fingerprints([]) never calls the op).


def option_grid(numerics):
    """(fingerprint, numerics) pairs: both fingerprint settings in portable numerics, and each
    other numerics this machine offers once."""
    return [(True, numerics[0]), (False, numerics[0])] + [(True, n) for n in numerics[1:]]


def sgd_cases():
    for momentum, nesterov in ((0.0, False), (0.9, False), (0.9, True)):
        for fingerprint, numerics in option_grid(numerics_codes(uses_sqrt=False)):
            params, grads = floats(1), floats(2)
            buffers = floats(3) if momentum else []
            first_step = [1, 0, 1, 0] if momentum else []
            name = f"momentum={momentum}-nesterov={nesterov}-fp={fingerprint}-numerics={numerics}"
            yield name, (params, grads, buffers, first_step, 0.01, momentum, 1.0 - 0.1, -0.05,
                         nesterov, False, fingerprint, numerics)
    yield "maximize-no_decay", (floats(4), floats(5), floats(6), [0, 0, 0, 0], 0.0, 0.5, 1.0, -0.1,
                                False, True, True, _numerics.PORTABLE)


def adam_cases():
    for amsgrad, decoupled in ((False, False), (True, False), (False, True), (True, True)):
        for fingerprint, numerics in option_grid(numerics_codes(uses_sqrt=True)):
            lr, beta1, beta2, wd, step = 1e-3, 0.9, 0.999, 0.01, 3.0
            neg_step_size = -(lr / (1 - beta1**step))
            bc2_sqrt = (1 - beta2**step) ** 0.5
            name = f"amsgrad={amsgrad}-decoupled={decoupled}-fp={fingerprint}-numerics={numerics}"
            yield name, (floats(7), floats(8), floats(9), floats(10, positive=True),
                         floats(11, positive=True) if amsgrad else [],
                         [neg_step_size] * len(SIZES), [bc2_sqrt] * len(SIZES),
                         1 - beta1, beta2, 1 - beta2, 1e-8, wd, 1 - lr * wd, decoupled, amsgrad,
                         False, fingerprint, numerics)


def ema_cases():
    for decay in (0.999, 0.3):  # both branches of torch.lerp's formula
        for fingerprint in (True, False):
            yield f"decay={decay}-fp={fingerprint}", (floats(12), floats(13), 1.0 - decay, fingerprint)


def yardstick_cases():
    yield "four_sizes", (floats(14), floats(15), floats(16), floats(17))


CASES = {
    "fingerprint_sums": fingerprint_sums_cases,
    "sgd_step_": sgd_cases,
    "adam_step_": adam_cases,
    "ema_update_": ema_cases,
    "bandwidth_yardstick_": yardstick_cases,
}

PARAMS = [pytest.param(op, name, args, id=f"{op}-{name}") for op, make in CASES.items() for name, args in make()]


def replay_op_names():
    return sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("replay::"))


def test_every_replay_op_has_an_opcheck_case():
    names = replay_op_names()
    assert names, "no replay ops registered"
    missing = sorted(set(names) - set(CASES))
    assert not missing, f"ops without an opcheck case: {missing}"
    stale = sorted(set(CASES) - set(names))
    assert not stale, f"opcheck cases for ops that no longer exist: {stale}"
    for op in CASES:
        assert any(True for _ in CASES[op]()), op


@pytest.mark.parametrize("op,name,args", PARAMS)
def test_opcheck(op, name, args):
    overload = getattr(torch.ops.replay, op).default
    results = torch.library.opcheck(overload, args)
    assert set(results.values()) == {"SUCCESS"}, results


def test_fake_outputs_match_real_shapes():
    """The fake implementations give the same output shape and dtype as the real kernels
    (opcheck compares them too; this states it directly for one case per op)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for op, make in CASES.items():
        for name, args in make():
            overload = getattr(torch.ops.replay, op).default
            real = overload(*clone_args(args))
            with FakeTensorMode() as mode:
                fake = overload(*fake_args(mode, args))
            if real is None:
                assert fake is None, (op, name)
            else:
                assert tuple(fake.shape) == tuple(real.shape) and fake.dtype == real.dtype, (op, name)


def clone_args(args):
    return [[t.clone() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a
            for a in args]


def fake_args(mode, args):
    return [[mode.from_tensor(t) for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
            else a for a in args]
