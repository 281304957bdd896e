"""replay.EMA against two independent references, bit for bit.

1. torch: `ref.lerp_(current, 1 - decay)` per float tensor (csrc/kernels/ema.h says the kernel
   is torch.lerp's formula on an FMA-capable CPU dispatch);
2. numpy: ema.h's formula with an exactly rounded fma emulated in float64 (the product of two
   float32 values is exact; TwoSum gives the exact error of the addition; rounding to odd and
   then to float32 is a correct single rounding since 53 >= 24 + 2).
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import replay

f32 = np.float32


# ------------------------------------------------------------------ numpy reference ----


def fma32(a, b, c) -> np.ndarray:
    """Correctly rounded float32 fma(a, b, c) for finite float32 inputs."""
    a, b, c = (np.asarray(x, dtype=np.float32).astype(np.float64) for x in (a, b, c))
    p = a * b  # exact: 24 + 24 significant bits fit in 53
    s = p + c
    # TwoSum: s + e == p + c exactly.
    pv = s - p
    e = (p - (s - pv)) + (c - pv)
    # Round to odd: an inexact sum with an even last bit moves one ulp toward the exact value
    # (away from zero when e has the sign of s, toward zero otherwise).
    bits = np.array(s, dtype=np.float64, ndmin=1).view(np.uint64)
    needs = (e != 0) & ((bits & np.uint64(1)) == 0)
    away = (e > 0) == (s > 0)
    one = np.uint64(1)
    bits = np.where(needs, np.where(away, bits + one, bits - one), bits)
    return bits.view(np.float64).astype(np.float32).reshape(np.shape(s))


def nearest_float32(q: Fraction) -> float:
    """A rational rounded to the nearest float32 (ties to even), for results in normal range."""
    if q == 0:
        return 0.0
    sign, q = (-1, -q) if q < 0 else (1, q)
    e = q.numerator.bit_length() - q.denominator.bit_length()
    while Fraction(2) ** e > q:
        e -= 1
    while Fraction(2) ** (e + 1) <= q:
        e += 1
    ulp = Fraction(2) ** (e - 23)
    k, r = divmod(q, ulp)
    if r > ulp / 2 or (r == ulp / 2 and k % 2 == 1):
        k += 1
    return sign * float(k * ulp)


def test_fma32_emulation_is_one_correct_rounding():
    # exact = 1 + 2^-23 + 2^-24 - 2^-70: just below a float32 tie. Rounding to double first lands
    # on the tie (and then on the even neighbour 1 + 2^-22); one correct rounding gives 1 + 2^-23.
    a, b, c = f32(2.0**-24 + 2.0**-47), f32(1 - 2.0**-23), f32(1 + 2.0**-23)
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    assert nearest_float32(exact) == 1 + 2.0**-23
    assert float(np.float32(np.float64(a) * np.float64(b) + np.float64(c))) == 1 + 2.0**-22  # the trap
    assert float(fma32(a, b, c)) == 1 + 2.0**-23
    assert float(fma32(-a, b, -c)) == -(1 + 2.0**-23)
    assert float(fma32(f32(2.0**-24), f32(1), f32(1))) == 1.0  # an exact tie: to even
    rng = np.random.default_rng(0)
    a = rng.standard_normal(400).astype(np.float32)
    b = rng.standard_normal(400).astype(np.float32)
    c = (-a.astype(np.float64) * b * (1 + rng.standard_normal(400) * 1e-6)).astype(np.float32)  # cancellation
    c[::2] = rng.standard_normal(200).astype(np.float32)
    got = fma32(a, b, c)
    for i in range(400):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        assert float(got[i]) == nearest_float32(exact), i


def ema_reference(average: np.ndarray, source: np.ndarray, decay: float) -> np.ndarray:
    """csrc/kernels/ema.h: w = float(1 - decay); torch.lerp's two branches with one fma."""
    w = f32(1.0 - decay)
    diff = (source - average).astype(np.float32)
    if -0.5 < w < 0.5:
        return fma32(w, diff, average)
    return fma32(f32(w - f32(1.0)), diff, source)


# --------------------------------------------------------------------------- setup ----


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    # Odd sizes: tensors whose lengths are not multiples of any vector width.
    return torch.nn.Sequential(
        torch.nn.Linear(5, 13), torch.nn.BatchNorm1d(13), torch.nn.ReLU(), torch.nn.Linear(13, 3)
    ).to(dtype)


def perturb(model, gen):
    """A training-like change: a forward pass in train mode (BatchNorm running stats and
    num_batches_tracked move) and a random change to every parameter."""
    model.train()
    with torch.no_grad():
        model(torch.randn(17, 5, generator=gen))
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def float_state(module):
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


def bits(t):
    return t.detach().view(torch.int32)


DECAYS = [None, 0.3, 0.5, 0.999, None, 0.25, 0.9, 0.75]  # None: the EMA's own decay (0.9)


def run_ema(decays=DECAYS):
    model = make_model()
    gen = torch.Generator().manual_seed(1)
    ema = replay.EMA(model, decay=0.9)
    history = []
    for d in decays:
        perturb(model, gen)
        current = {k: v.clone() for k, v in model.state_dict().items()}
        result = ema.update() if d is None else ema.update(decay=d)
        history.append((0.9 if d is None else d, current, result))
    return model, ema, history


# ---------------------------------------------------------------------------- tests ----


def test_averages_match_numpy_fma_reference():
    model, ema, history = run_ema()
    ref = {k: v.numpy().copy() for k, v in float_state(make_model()).items()}
    for decay, current, _ in history:
        for name in ref:
            ref[name] = ema_reference(ref[name], current[name].numpy(), decay)
    averages = float_state(ema.module)
    assert set(averages) == set(ref) and len(ref) == 8  # 2 Linear x 2, BN weight, bias, mean, var
    for name, avg in averages.items():
        assert torch.equal(bits(avg), bits(torch.from_numpy(ref[name]))), name
        # Not vacuous: the average is neither the model nor where it started.
        assert not torch.equal(avg, model.state_dict()[name]), name
        assert not torch.equal(avg, float_state(make_model())[name]), name


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() == "DEFAULT",
    reason="torch's CPU dispatch is DEFAULT (no FMA): torch.lerp then rounds twice, while "
    "replay's EMA always uses one fma, so the torch reference does not apply here",
)
def test_averages_match_torch_lerp():
    _, ema, history = run_ema()
    ref = {k: v.clone() for k, v in float_state(make_model()).items()}
    for decay, current, _ in history:
        for name in ref:
            ref[name].lerp_(current[name], 1 - decay)
    for name, avg in float_state(ema.module).items():
        assert torch.equal(bits(avg), bits(ref[name])), name


def test_large_tensors_match_both_references():
    gen = torch.Generator().manual_seed(2)
    for n in (1, 31, 33, 100_003):
        for decay in (0.9, 0.999, 0.4, 0.5):
            model = torch.nn.Linear(n, 1, bias=False)
            ema = replay.EMA(model, decay=decay)
            start = ema.module.weight.detach().clone()
            with torch.no_grad():
                model.weight.copy_(torch.randn(1, n, generator=gen) * 5)
            ema.update()
            expected = ema_reference(start.numpy(), model.weight.detach().numpy(), decay)
            assert torch.equal(bits(ema.module.weight), bits(torch.from_numpy(expected))), (n, decay)
            if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
                lerped = start.clone().lerp_(model.weight.detach(), 1 - decay)
                assert torch.equal(bits(ema.module.weight), bits(lerped)), (n, decay)


def test_decay_zero_copies_and_decay_one_freezes():
    model = make_model()
    gen = torch.Generator().manual_seed(3)
    ema = replay.EMA(model, decay=0.0)
    perturb(model, gen)
    assert not torch.equal(ema.module[0].weight, model[0].weight)
    ema.update()
    for name, t in model.state_dict().items():
        assert torch.equal(ema.module.state_dict()[name].view(-1).view(torch.uint8),
                           t.view(-1).view(torch.uint8)), name

    frozen = {k: v.clone() for k, v in ema.module.state_dict().items()}
    perturb(model, gen)
    ema.update(decay=1.0)
    for name, t in float_state(ema.module).items():
        assert torch.equal(bits(t), bits(frozen[name])), name
        assert not torch.equal(t, model.state_dict()[name]), name
    ema.update(decay=1)  # Python ints are numbers too
    for name, t in float_state(ema.module).items():
        assert torch.equal(bits(t), bits(frozen[name])), name


def test_num_batches_tracked_is_copied():
    model, ema, history = run_ema()
    tracked = ema.module[1].num_batches_tracked
    assert tracked.dtype == torch.int64
    assert int(tracked) == len(DECAYS) == int(model[1].num_batches_tracked)
    assert tracked.data_ptr() != model[1].num_batches_tracked.data_ptr()


def test_update_returns_fingerprints_of_every_average():
    model, ema, history = run_ema()
    names = set(ema.module.state_dict())
    assert "1.num_batches_tracked" in names
    for _, _, result in history:
        assert set(result) == names
    last = history[-1][2]
    assert ema.fingerprints == last
    for name, tensor in ema.module.state_dict().items():
        assert last[name] == replay.fingerprint(tensor), name
    # Fingerprints move with the averages (the first and last update differ everywhere).
    first = history[0][2]
    for name in float_state(ema.module):
        assert first[name] != last[name], name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1, 1.5, -1e-300])
def test_bad_decay_value_raises(bad):
    model = make_model()
    with pytest.raises(ValueError):
        replay.EMA(model, decay=bad)
    ema = replay.EMA(model, decay=0.5)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with pytest.raises(ValueError):
        ema.update(decay=bad)
    for name, t in ema.module.state_dict().items():
        assert torch.equal(t, before[name]), name  # nothing written


@pytest.mark.parametrize("bad", [torch.tensor(0.9), "0.9", None, [0.9]])
def test_non_number_decay_raises_type_error(bad):
    with pytest.raises(TypeError):
        replay.EMA(make_model(), decay=bad)
    if bad is not None:
        ema = replay.EMA(make_model(), decay=0.5)
        with pytest.raises(TypeError):
            ema.update(decay=bad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_non_float32_model_raises_type_error(dtype):
    with pytest.raises(TypeError, match="float32"):
        replay.EMA(make_model(dtype=dtype), decay=0.9)


def test_model_changed_after_construction_raises():
    model = make_model()
    ema = replay.EMA(model, decay=0.9)
    model.register_buffer("extra", torch.zeros(3))
    with pytest.raises(RuntimeError):
        ema.update()
