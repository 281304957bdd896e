"""numerics="portable": replay.optim equals a pure numpy reference of the portable recipe
(tests/reference.py), bit for bit, and agrees with torch's fused=True CPU kernels wherever
numerics.md says their arithmetic is the same."""

import itertools

import numpy as np
import pytest
import torch

import reference
import replay

SIZES = (0, 1, 7, 8, 9, 17, 33, 1000, 65537)
STEPS = 6


def _values(n, rng, scale):
    x = (rng.standard_normal(n) * scale).astype(np.float32)
    if n >= 6:
        x[rng.integers(0, n, 6)] = np.array([0.0, -0.0, 1e-41, -3e-39, 1e12, -1.0], dtype=np.float32)
    return x


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(np.asarray(a, np.float32).view(np.int32), np.asarray(b, np.float32).view(np.int32))


SGD_CASES = [
    dict(lr=0.05, momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n, wd, mx in itertools.product((0.0, 0.9), (0.0, 0.2), (False, True), (0.0, 0.01), (False, True))
    if not (m == 0 and (d or n)) and not (n and d)
]
ADAM_CASES = [
    dict(lr=0.01, betas=b, eps=1e-8, weight_decay=wd, amsgrad=a, maximize=mx)
    for b, wd, a, mx in itertools.product(((0.9, 0.999), (0.3, 0.99)), (0.0, 0.1), (False, True), (False, True))
]


@pytest.mark.parametrize("kw", SGD_CASES)
def test_sgd_matches_reference(kw):
    rng = np.random.default_rng(1)
    init = [_values(n, rng, 1.0) for n in SIZES]
    params = [torch.from_numpy(x.copy()).requires_grad_() for x in init]
    opt = replay.optim.SGD(params, **kw)
    ref_p = [x.copy() for x in init]
    ref_buf = [None] * len(SIZES)
    for step in range(STEPS):
        for i, p in enumerate(params):
            g = _values(p.numel(), rng, 0.1)
            p.grad = torch.from_numpy(g.copy())
            ref_p[i], ref_buf[i] = reference.sgd_step(ref_p[i], g, ref_buf[i], first=step == 0, **kw)
        opt.step()
    for i, p in enumerate(params):
        assert _same_bits(p.detach().numpy(), ref_p[i]), f"param size {SIZES[i]}"
        if kw["momentum"]:
            assert _same_bits(opt.state[p]["momentum_buffer"].numpy(), ref_buf[i])


@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("kw", ADAM_CASES)
def test_adam_matches_reference(kw, decoupled):
    rng = np.random.default_rng(2)
    init = [_values(n, rng, 1.0) for n in SIZES]
    params = [torch.from_numpy(x.copy()).requires_grad_() for x in init]
    opt = (replay.optim.AdamW if decoupled else replay.optim.Adam)(params, **kw)
    beta1, beta2 = kw["betas"]
    ref = [[x.copy(), np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)] for x in init]
    for step in range(1, STEPS + 1):
        for i, p in enumerate(params):
            g = _values(p.numel(), rng, 0.1)
            p.grad = torch.from_numpy(g.copy())
            ref[i] = list(reference.adam_step(
                *ref[i][:1], g, *ref[i][1:], step=float(step), lr=kw["lr"], beta1=beta1, beta2=beta2,
                eps=kw["eps"], weight_decay=kw["weight_decay"], decoupled=decoupled,
                amsgrad=kw["amsgrad"], maximize=kw["maximize"]))
        opt.step()
    for i, p in enumerate(params):
        state = opt.state[p]
        assert _same_bits(p.detach().numpy(), ref[i][0]), f"param size {SIZES[i]}"
        assert _same_bits(state["exp_avg"].numpy(), ref[i][1])
        assert _same_bits(state["exp_avg_sq"].numpy(), ref[i][2])
        if kw["amsgrad"]:
            assert _same_bits(state["max_exp_avg_sq"].numpy(), ref[i][3])


def test_reference_fma_is_exact():
    """The reference's emulated fma is correctly rounded: it differs from mul-then-add exactly
    where a double rounding would, and matches torch's own fused lerp on an FMA dispatch."""
    rng = np.random.default_rng(3)
    a, b, c = (rng.standard_normal(200_000).astype(np.float32) for _ in range(3))
    fused = reference.fma(a, b, c)
    assert not _same_bits(fused, a * b + c)  # the emulation is not a plain multiply-add
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        # torch.lerp with weight < 0.5 is fma(w, end - start, start) at these capabilities.
        start, end = torch.from_numpy(a), torch.from_numpy(b)
        ours = reference.lerp(a, b, 0.1)
        assert _same_bits(torch.lerp(start, end, 0.1).numpy(), ours)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="torch's fused CPU kernels contract FMAs only on AVX2/AVX-512 builds")
@pytest.mark.parametrize("n", [8, 9, 15, 1000, 65537])
def test_portable_agrees_with_torch_fused_outside_its_tail(n):
    """numerics.md: torch's fused=True CPU AdamW is the portable recipe except for its last
    n % 8 elements (a different contraction of the scalar tail)."""
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(n, generator=gen)
    a, b = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    ours = replay.optim.AdamW([a], lr=0.01)
    theirs = torch.optim.AdamW([b], lr=0.01, fused=True)
    for _ in range(10):
        g = torch.randn(n, generator=gen) * 0.1
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    body = n - n % 8
    assert torch.equal(a.detach()[:body].view(torch.int32), b.detach()[:body].view(torch.int32))


# ------------------------------------------------------------ flush-to-zero (issue 10) ----
#
# torch.set_flush_denormal(True) sets the x86 FTZ/DAZ bits of the calling thread. The portable
# kernels clear them on every thread that runs their units (and restore them), so subnormal
# inputs and results round as IEEE (and CUDA) says whatever the caller's state. Before this,
# every case below differed.


def _mostly_subnormal(t: torch.Tensor) -> bool:
    bits = t.view(torch.int32)
    return bool((((bits & 0x7F800000) == 0) & (t != 0)).float().mean() > 0.9)


def _subnormal_run(kind: str, n: int, threads: int, flush: bool) -> list[torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(7)
    try:
        if kind == "EMA":
            model = torch.nn.Linear(n, 1, bias=False)
            with torch.no_grad():
                model.weight.copy_(torch.randn(1, n, generator=generator) * 1e-39)
            ema = replay.EMA(model, 0.9)
            updates = [torch.randn(1, n, generator=generator) * 1e-39 for _ in range(3)]
            assert all(_mostly_subnormal(t) for t in updates)
            for update in updates:
                with torch.no_grad():
                    model.weight.copy_(update)
                torch.set_flush_denormal(flush)
                try:
                    ema.update()
                finally:
                    torch.set_flush_denormal(False)
            return [t.detach().clone() for t in ema.state_dict().values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
        p = (torch.randn(n, generator=generator) * 1e-39).requires_grad_()
        grads = [torch.randn(n, generator=generator) * 1e-39 for _ in range(3)]
        assert all(_mostly_subnormal(t) for t in [p.detach()] + grads)  # what FTZ/DAZ would flush
        extra = {"momentum": 0.9} if kind == "SGD" else {"weight_decay": 0.01}
        opt = getattr(replay.optim, kind)([p], lr=1e-3, **extra)
        for grad in grads:
            p.grad = grad
            torch.set_flush_denormal(flush)
            try:
                opt.step()
            finally:
                torch.set_flush_denormal(False)
        return [p.detach().clone()] + [v.clone() for v in opt.state[p].values() if v.dim() > 0]
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="this CPU has no flush-to-zero mode")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [1000, 200_003], ids=["serial", "parallel"])
@pytest.mark.parametrize("kind", ["AdamW", "Adam", "SGD", "EMA"])
def test_portable_kernels_ignore_flush_to_zero(kind, n, threads):
    plain = _subnormal_run(kind, n, threads, flush=False)
    flushed = _subnormal_run(kind, n, threads, flush=True)
    assert len(plain) == len(flushed) > 0
    for a, b in zip(plain, flushed):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_the_callers_flush_mode_is_restored():
    p = torch.full((10,), 1e-39).requires_grad_()
    opt = replay.optim.AdamW([p], lr=1e-3)
    p.grad = torch.full((10,), 1e-39)
    torch.set_flush_denormal(True)
    try:
        opt.step()
        flushed = torch.full((4,), 3e-39) * torch.ones(4)  # FTZ still on: the product flushes
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(flushed, torch.zeros(4))


# --------------------------------------------------------------- canonical NaN (issue 10) ----
#
# The portable kernels store one NaN, 0x7FFFFFFF (what an NVIDIA GPU's arithmetic writes). x86
# writes 0xFFC00000 for an invalid operation and passes an input NaN's payload through, so before
# this an inf or NaN gradient left NaN bits (and fingerprints) that depended on the device and on
# which NaN came in.

CANONICAL_NAN = 0x7FFFFFFF
NAN_BITS = (0x7FC00000, 0xFFC00000, 0x7FC12345, 0xFFFFFFFF, 0x7F800001)  # incl. negative, payload, signaling


def _poisoned(n: int, generator, nan_bits: int) -> torch.Tensor:
    """A gradient with infinities of both signs and NaNs of the given bit pattern."""
    g = torch.randn(n, generator=generator)
    g[::7] = float("inf")
    g[3::7] = -float("inf")
    g.view(torch.int32)[5::11] = int(np.array([nan_bits], dtype=np.uint32).view(np.int32)[0])
    return g


def _nan_run(kind: str, n: int, nan_bits: int, numerics: str = "portable"):
    generator = torch.Generator().manual_seed(3)
    if kind == "EMA":
        model = torch.nn.Linear(n, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.randn(1, n, generator=generator))
        ema = replay.EMA(model, 0.9)
        with torch.no_grad():
            model.weight.copy_(_poisoned(n, generator, nan_bits).view(1, n))
        ema.update()
        return [t.detach().clone() for t in ema.state_dict().values()
                if isinstance(t, torch.Tensor) and t.is_floating_point()], []
    p = torch.randn(n, generator=generator).requires_grad_()
    options = {"SGD": dict(momentum=0.9), "SGD0": dict(), "Adam": dict(), "AMSGrad": dict(amsgrad=True),
               "AdamW": dict(weight_decay=0.01)}[kind]
    cls = replay.optim.SGD if kind.startswith("SGD") else replay.optim.AdamW if kind == "AdamW" else replay.optim.Adam
    opt = cls([p], lr=1e-2, numerics=numerics, **options)
    for _ in range(2):
        p.grad = _poisoned(n, generator, nan_bits)
        opt.step()
    tensors = [p.detach().clone()] + [v.clone() for v in opt.state[p].values() if v.dim() > 0]
    return tensors, opt.fingerprints


@pytest.mark.parametrize("n", [1000, 200_003], ids=["serial", "parallel"])
@pytest.mark.parametrize("kind", ["SGD", "SGD0", "Adam", "AMSGrad", "AdamW", "EMA"])
def test_portable_kernels_store_one_nan(kind, n):
    runs = [_nan_run(kind, n, bits) for bits in NAN_BITS]
    tensors, fingerprints = runs[0]
    nans = 0
    for t in tensors:
        bits = t.view(torch.int32)
        is_nan = torch.isnan(t)
        nans += int(is_nan.sum())
        assert torch.equal(bits[is_nan], torch.full_like(bits[is_nan], CANONICAL_NAN))
    assert nans > 0  # the poisoned inputs did make NaNs
    for other, other_fps in runs[1:]:  # whichever NaN came in, the same bits and fingerprints
        for a, b in zip(tensors, other):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))
        assert other_fps == fingerprints
