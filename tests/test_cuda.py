"""CUDA kernels give the same bits as the CPU kernels (portable numerics), op by op.

Every comparison is exact: torch.equal on integer views of the tensors, and equal fingerprint
sums. Inputs are finite (NaN payloads are not portable between CPU and GPU instructions) but
include signed zeros and subnormals, which -ftz=false must keep.
"""

from __future__ import annotations

import pytest
import torch

import replay._C  # noqa: F401  (registers torch.ops.replay)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ops = torch.ops.replay
DEVICE = "cuda"
SIZES = (0, 1, 7, 33, 65537)
OPS = ("fingerprint_sums", "sgd_step_", "adam_step_", "ema_update_", "bandwidth_yardstick_")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as integers of the same width, on the CPU."""
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(width)


def assert_same_bits(cpu: list[torch.Tensor], cuda: list[torch.Tensor], what: str) -> None:
    assert len(cpu) == len(cuda)
    for i, (a, b) in enumerate(zip(cpu, cuda)):
        assert b.device.type == DEVICE and a.shape == b.shape and a.dtype == b.dtype
        same = bits(a) == bits(b)
        assert bool(same.all()), (f"{what}[{i}]: {int((~same).sum())} of {a.numel()} elements "
                                  f"differ, first at {int((~same).flatten().nonzero()[0])}")


def assert_same_sums(cpu: torch.Tensor, cuda: torch.Tensor) -> None:
    assert cuda.device.type == DEVICE and cuda.dtype == torch.int64
    assert cpu.shape == cuda.shape
    assert torch.equal(cpu, cuda.cpu())


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def floats(n: int, gen: torch.Generator, scale: float = 1.0, nonnegative: bool = False) -> torch.Tensor:
    """float32 values with a few signed zeros and subnormals sprinkled in."""
    x = torch.randn(n, generator=gen) * scale
    if nonnegative:
        x = x.abs()
    if n >= 4:
        specials = torch.tensor([0.0, -0.0, 1e-40, -3e-42])
        if nonnegative:
            specials = specials.abs()
        idx = torch.randint(0, n, (4,), generator=gen)
        x[idx] = specials
    return x


def on_device(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in tensors]


def test_cuda_kernels_registered():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"replay::{op}", "CUDA"), op


# ------------------------------------------------------------------------- fingerprints ----

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.float8_e4m3fn, torch.int16, torch.float16,
          torch.bfloat16, torch.int32, torch.float32, torch.int64, torch.float64, torch.complex64]


def random_tensor(dtype: torch.dtype, n: int, gen: torch.Generator) -> torch.Tensor:
    """n elements of `dtype` with random bits."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
        torch.empty(0, dtype=dtype).element_size()]
    raw = torch.randint(-(2**62), 2**62, (n,), generator=gen, dtype=torch.int64)
    raw = raw.view(torch.uint8)[: n * torch.empty(0, dtype=width).element_size()].clone()
    if dtype == torch.bool:
        return (raw & 1).bool()
    return raw.view(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_fingerprint_sums(dtype, n):
    x = random_tensor(dtype, n, seeded(n))
    assert_same_sums(ops.fingerprint_sums([x]), ops.fingerprint_sums([x.to(DEVICE)]))


def test_fingerprint_sums_many_tensors_one_call():
    """Mixed dtypes and shapes, more tensors than fit in one launch, and a tensor whose chunks
    span several launches."""
    gen = seeded(1)
    tensors = [random_tensor(DTYPES[i % len(DTYPES)], (i * 37) % 300, gen) for i in range(150)]
    tensors.insert(70, random_tensor(torch.float32, 65536 * 330 + 3, gen).view(-1, 1))
    tensors.append(random_tensor(torch.int16, 12, gen).view(3, 4))
    assert_same_sums(ops.fingerprint_sums(tensors), ops.fingerprint_sums(on_device(tensors)))


# ---------------------------------------------------------------------------------- SGD ----

def run_sgd(numels, *, momentum, dampening, weight_decay, nesterov, maximize, steps=3, lr=0.05):
    gen = seeded(sum(numels) + 7)
    params = [floats(n, gen) for n in numels]
    bufs = [floats(n, gen, 0.1) for n in numels] if momentum else []
    cpu = {"params": params, "bufs": bufs}
    cuda = {k: on_device(v) for k, v in cpu.items()}
    for step in range(steps):
        grads = [floats(n, gen) for n in numels]
        # Tensors take their first momentum step at different times.
        first = [int(step == (i % 2)) for i in range(len(numels))] if momentum else []
        args = (first, weight_decay, momentum, 1.0 - dampening, -lr, nesterov, maximize, True, 0)
        sums_cpu = ops.sgd_step_(cpu["params"], grads, cpu["bufs"], *args)
        sums_cuda = ops.sgd_step_(cuda["params"], on_device(grads), cuda["bufs"], *args)
        assert_same_sums(sums_cpu, sums_cuda)
        assert sums_cpu.shape == (len(numels), 2 if momentum else 1)
        for name in cpu:
            assert_same_bits(cpu[name], cuda[name], f"step {step} {name}")


@pytest.mark.parametrize("momentum, dampening, nesterov", [
    (0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.1, False), (0.9, 0.0, True)])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("maximize", [False, True])
def test_sgd_step(momentum, dampening, nesterov, weight_decay, maximize):
    run_sgd(SIZES, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize)


# --------------------------------------------------------------------------------- Adam ----

def run_adam(numels, *, decoupled, weight_decay, amsgrad, maximize, steps=3, lr=1e-3,
             betas=(0.9, 0.999), eps=1e-8):
    gen = seeded(sum(numels) + 11)
    beta1, beta2 = betas
    cpu = {
        "params": [floats(n, gen) for n in numels],
        "exp_avgs": [floats(n, gen, 0.1) for n in numels],
        "exp_avg_sqs": [floats(n, gen, 0.01, nonnegative=True) for n in numels],
        "max_exp_avg_sqs": [floats(n, gen, 0.02, nonnegative=True) for n in numels] if amsgrad else [],
    }
    cuda = {k: on_device(v) for k, v in cpu.items()}
    for step in range(1, steps + 1):
        grads = [floats(n, gen) for n in numels]
        # Host scalars in double, as torch.optim computes them; tensors at different steps.
        steps_of = [step + i for i in range(len(numels))]
        neg_step_sizes = [-lr / (1 - beta1**t) for t in steps_of]
        bc2_sqrts = [(1 - beta2**t) ** 0.5 for t in steps_of]
        args = (neg_step_sizes, bc2_sqrts, 1 - beta1, beta2, 1 - beta2, eps, weight_decay,
                1 - lr * weight_decay, decoupled, amsgrad, maximize, True, 0)
        sums_cpu = ops.adam_step_(cpu["params"], grads, cpu["exp_avgs"], cpu["exp_avg_sqs"],
                                  cpu["max_exp_avg_sqs"], *args)
        sums_cuda = ops.adam_step_(cuda["params"], on_device(grads), cuda["exp_avgs"],
                                   cuda["exp_avg_sqs"], cuda["max_exp_avg_sqs"], *args)
        assert_same_sums(sums_cpu, sums_cuda)
        assert sums_cpu.shape == (len(numels), 4 if amsgrad else 3)
        for name in cpu:
            assert_same_bits(cpu[name], cuda[name], f"step {step} {name}")


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_adam_step(decoupled, weight_decay, amsgrad, maximize):
    run_adam(SIZES, decoupled=decoupled, weight_decay=weight_decay, amsgrad=amsgrad,
             maximize=maximize)


def test_adam_step_lerp_weight_above_half():
    """beta1 < 0.5 takes lerp's other branch."""
    run_adam(SIZES, decoupled=False, weight_decay=0.0, amsgrad=False, maximize=False,
             betas=(0.3, 0.999))


def test_adam_step_batching():
    """More tensors than one launch takes, and one whose chunks span several launches."""
    numels = [(i * 53) % 2000 for i in range(70)] + [65536 * 330 + 3] + [5, 65537]
    run_adam(numels, decoupled=True, weight_decay=1e-2, amsgrad=True, maximize=False, steps=2)
    run_sgd(numels, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True,
            maximize=False, steps=2)


# ---------------------------------------------------------------------------------- EMA ----

@pytest.mark.parametrize("weight", [0.0, 1e-3, 0.4999, 0.5, 0.9, 1.0])
def test_ema_update(weight):
    numels = list(SIZES)
    gen = seeded(3)
    cpu = [floats(n, gen) for n in numels]
    cuda = on_device(cpu)
    for step in range(3):
        sources = [floats(n, gen) for n in numels]
        sums_cpu = ops.ema_update_(cpu, sources, weight, True)
        sums_cuda = ops.ema_update_(cuda, on_device(sources), weight, True)
        assert_same_sums(sums_cpu, sums_cuda)
        assert sums_cpu.shape == (len(numels), 1)
        assert_same_bits(cpu, cuda, f"step {step} averages")


# ------------------------------------------------------------------- bandwidth yardstick ----

def test_bandwidth_yardstick():
    gen = seeded(5)
    cpu = [[floats(n, gen) for n in SIZES] for _ in range(4)]
    cuda = [on_device(lst) for lst in cpu]
    assert ops.bandwidth_yardstick_(*cpu) is None
    assert ops.bandwidth_yardstick_(*cuda) is None
    for name, a, b in zip(("params", "grads", "exp_avgs", "exp_avg_sqs"), cpu, cuda):
        assert_same_bits(a, b, name)


# ---------------------------------------------------------------------------- refusals ----

def test_torch_numerics_refused_on_cuda():
    p = [torch.zeros(4, device=DEVICE)]
    g = [torch.ones(4, device=DEVICE)]
    for numerics in (1, 2):
        with pytest.raises(RuntimeError, match="numerics='torch' is a CPU-only mode"):
            ops.sgd_step_(p, g, [], [], 0.0, 0.0, 1.0, -0.1, False, False, True, numerics)
        with pytest.raises(RuntimeError, match="numerics='torch' is a CPU-only mode"):
            ops.adam_step_(p, g, [torch.zeros(4, device=DEVICE)], [torch.zeros(4, device=DEVICE)],
                           [], [-1e-3], [0.1], 0.1, 0.999, 1e-3, 1e-8, 0.0, 1.0, False, False,
                           False, True, numerics)
    assert torch.equal(p[0].cpu(), torch.zeros(4)), "a refused step must not write"


def test_mixed_devices_refused():
    with pytest.raises(RuntimeError, match="is on cpu"):
        ops.ema_update_([torch.zeros(4, device=DEVICE)], [torch.zeros(4)], 0.5, True)


# --------------------------------------------------------------- streams and ordering ----

def test_fingerprints_on_a_side_stream_read_what_the_stream_wrote():
    """The sums are zeroed, computed and read back on the current stream of the tensor's device:
    under a side stream, a tensor written by a long kernel queue on that stream is fingerprinted
    after it, and the sums are copied back after the fingerprint kernel (a kernel on another
    stream, or a copy not ordered after it, would read stale or partial values here: repeated
    so that a race would show)."""
    from replay.fingerprinting import fingerprints

    gen = seeded(3)
    base = random_tensor(torch.float32, 1 << 22, gen)
    expected = fingerprints([base * 3.0 + 1.0])
    side = torch.cuda.Stream()
    for _ in range(20):
        with torch.cuda.stream(side):
            x = torch.zeros(base.shape, device=DEVICE)
            for _ in range(8):  # a queue of writes the fingerprint must wait for
                x.mul_(0.5)
            x.copy_(base.to(DEVICE, non_blocking=False)).mul_(3.0).add_(1.0)
            got = fingerprints([x])
        assert got == expected
    torch.cuda.synchronize()


def test_optimizer_sums_on_a_side_stream_match_the_cpu():
    """replay.optim's fused step under a side stream: the fingerprints it returns are those of the
    values it wrote (the step's sums are read back on the stream that computed them)."""
    import replay

    gen = seeded(4)
    w = floats(1 << 20, gen)
    g = floats(1 << 20, gen)
    cpu_p = torch.nn.Parameter(w.clone())
    cpu_p.grad = g.clone()
    cpu_opt = replay.optim.AdamW([cpu_p], lr=1e-3)
    cpu_opt.step()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        p = torch.nn.Parameter(w.to(DEVICE))
        p.grad = g.to(DEVICE)
        opt = replay.optim.AdamW([p], lr=1e-3)
        opt.step()
        sums = dict(opt.fingerprints)
    assert sums == dict(cpu_opt.fingerprints)
    assert_same_bits([cpu_p.detach()], [p.detach()], "param")
