"""replay.optim with master_weights=True (issue 10, item 2): bfloat16 / float16 parameters with
fp32 master weights and moments; the parameter is the master rounded to nearest, ties to even,
NaN stored as 0x7FFF; fingerprints of both. Known answers: the master follows exactly the fp32
optimizer fed the widened low-precision gradients; round_to equals torch's conversion wherever
torch's is IEEE round-to-nearest-even (every non-NaN value); the state survives a state_dict
round trip in fp32 (torch would cast it to the parameter's dtype)."""

import copy

import pytest
import torch

import replay
from replay.fingerprinting import fingerprints
from replay.optim.master import round_to

LOW = [torch.bfloat16, torch.float16]
OPTIMIZERS = {
    "sgd": lambda ps, **kw: replay.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, **kw),
    "adam": lambda ps, **kw: replay.optim.Adam(ps, lr=1e-2, **kw),
    "adamw": lambda ps, **kw: replay.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True, **kw),
}


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def special_floats(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-140, 120, (n,), generator=g).float())
    # ties for both formats, subnormals, signed zeros, infinities, the largest finite float
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, 2**-133, -2**-140, 0.0, -0.0,
                         float("inf"), -float("inf"), 3.4028234663852886e38, 65520.0, 6e-8, -3e-8])
    return torch.cat([x, ties])


@pytest.mark.parametrize("dtype", LOW)
def test_round_to_is_torchs_round_to_nearest_even_on_every_non_nan(dtype):
    x = special_floats(200_000, 1)
    assert torch.equal(bits(round_to(x, dtype)), bits(x.to(dtype)))


@pytest.mark.parametrize("dtype", LOW)
def test_round_to_stores_one_canonical_nan(dtype):
    nans = torch.tensor([0x7FC00000, 0xFFC00000 - 2**32, 0x7F800001, 0x7FFFFFFF, 0x7FA00000], dtype=torch.int32)
    low = round_to(nans.view(torch.float32), dtype)
    assert bits(low).tolist() == [0x7FFF] * 5


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_master_follows_the_fp32_optimizer_on_widened_gradients(dtype, name):
    g = torch.Generator().manual_seed(2)
    start = torch.randn(1000, generator=g)
    low = torch.nn.Parameter(start.to(dtype))
    ref = torch.nn.Parameter(start.to(dtype).float())  # the master starts as the widened parameter
    opt = OPTIMIZERS[name]([low], master_weights=True)
    ref_opt = OPTIMIZERS[name]([ref])
    for step in range(5):
        grad = (torch.randn(1000, generator=g) * 3).to(dtype)
        low.grad = grad.clone()
        ref.grad = grad.float()
        opt.step()
        ref_opt.step()
        master = opt.state[low]["master_param"]
        assert master.dtype == torch.float32
        assert torch.equal(bits(master), bits(ref.detach())), step
        assert torch.equal(bits(low.detach()), bits(round_to(master, dtype)))
        for key, value in ref_opt.state[ref].items():
            if key != "momentum_buffer" or name == "sgd":
                assert torch.equal(bits(opt.state[low][key]), bits(value)), key
        fp = opt.fingerprints[0]
        assert fp["param"] == fingerprints([low.detach()])[0]
        assert fp["master_param"] == ref_opt.fingerprints[0]["param"]
    assert not torch.equal(low.detach().float(), ref.detach())  # the rounding is real


def test_mixed_groups_and_a_state_dict_round_trip_keep_fp32_state():
    g = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model[0].to(torch.bfloat16)  # one low-precision layer, one fp32 layer
    def run(opt, steps, start=0):
        for step in range(start, start + steps):
            gen = torch.Generator().manual_seed(100 + step)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
    opt = replay.optim.AdamW(model.parameters(), lr=1e-2, master_weights=True)
    run(opt, 3)
    saved = copy.deepcopy(opt.state_dict())  # state_dict() holds the live tensors
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    run(opt, 3, start=3)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    again = replay.optim.AdamW(model.parameters(), lr=1e-2, master_weights=True)
    again.load_state_dict(saved)
    low = model[0].weight
    assert again.state[low]["master_param"].dtype == torch.float32 and again.state[low]["exp_avg"].dtype == torch.float32
    run(again, 3, start=3)
    for k, v in model.state_dict().items():
        assert torch.equal(bits(v), bits(after[k])), k


def test_refusals():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="numerics='torch' with master_weights"):
        replay.optim.AdamW([p], master_weights=True, numerics="torch")
    with pytest.raises(TypeError, match="master_weights must be True or False"):
        replay.optim.SGD([p], lr=0.1, master_weights=1)
    # without master weights a bf16 parameter is refused, naming the option
    with pytest.raises(TypeError, match="master_weights=True"):
        replay.optim.SGD([p], lr=0.1).step()


def test_a_bf16_model_with_master_weights_records_and_verifies(tmp_path):
    from pathlib import Path

    from replay.session import RecordSession, ReplaySession
    from replay.store import RunDir

    reference = f"{Path(__file__).parent / 'programs' / 'mixed_precision.py'}:bf16_master"
    out = tmp_path / "run"
    RecordSession(reference, out, seed=4, progress=False).run()
    for start in (0, 5):
        report = ReplaySession(out).verify(start, None, progress=False)
        assert report.ok, report.describe()
    with RunDir.open(out) as run:
        state = run.load_checkpoint(8)
    weight = state["model"]["inner.0.weight"]
    assert weight.dtype == torch.bfloat16
    index = 0  # inner.0.weight is the first parameter
    master = state["optimizer"]["state"][index]["master_param"]
    assert master.dtype == torch.float32 and torch.equal(bits(round_to(master, torch.bfloat16)), bits(weight))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_master_weights_are_the_same_bits_on_cpu_and_cuda(dtype, name):
    g = torch.Generator().manual_seed(5)
    start = torch.randn(4099, generator=g).to(dtype)
    params = {d: torch.nn.Parameter(start.clone().to(d)) for d in ("cpu", "cuda")}
    opts = {d: OPTIMIZERS[name]([params[d]], master_weights=True) for d in params}
    for step in range(4):
        grad = (torch.randn(4099, generator=g) * 2).to(dtype)
        grad[step] = float("inf") if step == 3 else grad[step]  # the last step makes NaNs: canonical on both
        for d in params:
            params[d].grad = grad.to(d)
            opts[d].step()
        assert torch.equal(bits(params["cpu"].detach()), bits(params["cuda"].detach().cpu())), step
        for key, value in opts["cpu"].state[params["cpu"]].items():
            assert torch.equal(bits(value), bits(opts["cuda"].state[params["cuda"]][key].cpu())), (step, key)
        assert opts["cpu"].fingerprints == opts["cuda"].fingerprints
