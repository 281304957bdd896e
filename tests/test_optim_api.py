"""replay.optim as a drop-in torch.optim: constructor, param groups, schedulers, closures,
state_dict in torch's format both ways, fingerprints, and clear errors on bad input."""

import math

import pytest
import torch

import replay
from replay import NumericsUnavailable

PAIRS = [
    (replay.optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    (replay.optim.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.01, amsgrad=True)),
    (replay.optim.AdamW, torch.optim.AdamW, dict(lr=0.01)),
]
IDS = ["SGD", "Adam", "AdamW"]


def bits(t):
    return t.detach().view(torch.int32)


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def train(model, opt, steps, seed=1, scheduler=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=gen)
        y = torch.randn(32, 3, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_same_model(a, b):
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(bits(pa), bits(pb)), na


@pytest.mark.parametrize("ours,theirs,kw", PAIRS, ids=IDS)
def test_same_defaults_and_isinstance(ours, theirs, kw):
    p = [torch.zeros(3, requires_grad=True)]
    a, b = ours(p), theirs(p)
    assert isinstance(a, theirs) and isinstance(a, torch.optim.Optimizer)
    assert a.defaults == b.defaults
    assert a.state_dict() == b.state_dict()


@pytest.mark.parametrize("ours,theirs,kw", PAIRS, ids=IDS)
def test_training_loop_with_scheduler_and_groups_matches_torch(ours, theirs, kw):
    ma, mb = make_model(), make_model()

    def groups(m):
        return [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": kw["lr"] / 3}]

    oa, ob = ours(groups(ma), numerics="torch", **kw), theirs(groups(mb), **kw)
    sa = torch.optim.lr_scheduler.CosineAnnealingLR(oa, T_max=7)
    sb = torch.optim.lr_scheduler.CosineAnnealingLR(ob, T_max=7)
    train(ma, oa, 15, scheduler=sa)
    train(mb, ob, 15, scheduler=sb)
    assert_same_model(ma, mb)


@pytest.mark.parametrize("ours,theirs,kw", PAIRS, ids=IDS)
def test_state_dict_from_torch_continues_bit_identically(ours, theirs, kw):
    """torch.optim trains, hands its state_dict to replay.optim, which continues exactly as
    torch.optim would have."""
    m_ref, m_mix = make_model(), make_model()
    o_ref, o_first = theirs(m_ref.parameters(), **kw), theirs(m_mix.parameters(), **kw)
    train(m_ref, o_ref, 5)
    train(m_mix, o_first, 5)
    o_second = ours(m_mix.parameters(), numerics="torch", **kw)
    o_second.load_state_dict(o_first.state_dict())
    train(m_ref, o_ref, 5, seed=2)
    train(m_mix, o_second, 5, seed=2)
    assert_same_model(m_ref, m_mix)


@pytest.mark.parametrize("ours,theirs,kw", PAIRS, ids=IDS)
def test_state_dict_to_torch_continues_bit_identically(ours, theirs, kw):
    m_ref, m_mix = make_model(), make_model()
    o_ref, o_first = theirs(m_ref.parameters(), **kw), ours(m_mix.parameters(), numerics="torch", **kw)
    train(m_ref, o_ref, 5)
    train(m_mix, o_first, 5)
    sd = o_first.state_dict()
    assert sd.keys() == o_ref.state_dict().keys()
    assert sd["param_groups"] == o_ref.state_dict()["param_groups"]
    for index, state in o_ref.state_dict()["state"].items():
        assert sd["state"][index].keys() == state.keys()
        for key, value in state.items():
            assert sd["state"][index][key].dtype == value.dtype
            assert sd["state"][index][key].device == value.device
    o_second = theirs(m_mix.parameters(), **kw)
    o_second.load_state_dict(sd)
    train(m_ref, o_ref, 5, seed=2)
    train(m_mix, o_second, 5, seed=2)
    assert_same_model(m_ref, m_mix)


@pytest.mark.parametrize("ours,theirs,kw", PAIRS, ids=IDS)
def test_closure_and_add_param_group(ours, theirs, kw):
    ma, mb = make_model(), make_model()
    oa = ours(ma[0].parameters(), numerics="torch", **kw)
    ob = theirs(mb[0].parameters(), **kw)
    oa.add_param_group({"params": ma[2].parameters(), "lr": 0.002})
    ob.add_param_group({"params": mb[2].parameters(), "lr": 0.002})
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    for model, opt in ((ma, oa), (mb, ob)):
        def closure(model=model, opt=opt):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        for _ in range(3):
            loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)
    assert_same_model(ma, mb)


@pytest.mark.parametrize("ours,theirs,kw", PAIRS, ids=IDS)
def test_fingerprints_describe_what_was_written(ours, theirs, kw):
    model = make_model()
    opt = ours(model.parameters(), **kw)
    assert opt.fingerprints == {}
    model[2].bias.requires_grad_(False)  # no gradient: absent from the step's fingerprints
    train(model, opt, 2)
    fps = opt.fingerprints
    params = list(model.parameters())
    assert sorted(fps) == [0, 1, 2]
    for index, entry in fps.items():
        p = params[index]
        assert entry["param"] == replay.fingerprint(p)
        for key, value in opt.state[p].items():
            assert entry[key] == replay.fingerprint(value), key
        assert set(entry) == {"param", *opt.state[p].keys()}


def test_sgd_without_momentum_keeps_torch_state_layout():
    a, b = torch.ones(4, requires_grad=True), torch.ones(4, requires_grad=True)
    oa, ob = replay.optim.SGD([a], lr=0.1), torch.optim.SGD([b], lr=0.1)
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    oa.step()
    ob.step()
    assert oa.state_dict() == ob.state_dict()
    assert set(oa.fingerprints[0]) == {"param"}


# ------------------------------------------------------------------------------- errors ----


@pytest.mark.parametrize("ours,theirs,kw", PAIRS, ids=IDS)
def test_refuses_what_it_cannot_compute_exactly(ours, theirs, kw):
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="fused"):
        ours([p], fused=True)
    with pytest.raises(ValueError, match="differentiable"):
        ours([p], differentiable=True)
    with pytest.raises(TypeError, match="Tensor"):
        ours([p], lr=torch.tensor(0.01))
    with pytest.raises(ValueError, match="numerics"):
        ours([p], numerics="fast")
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError):
            ours([p], lr=bad)


@pytest.mark.parametrize("ours,theirs,kw", PAIRS, ids=IDS)
def test_bad_parameters_and_gradients(ours, theirs, kw):
    p64 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    p64.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32"):
        ours([p64]).step()
    pc = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    pc.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match="complex"):
        ours([pc]).step()
    ps = torch.zeros(3, requires_grad=True)
    ps.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        ours([ps]).step()
    with pytest.raises(ValueError, match="mixed devices"):
        ours([torch.zeros(3, requires_grad=True), torch.zeros(3, device="meta", requires_grad=True)])
    opt = ours([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="mixed devices"):
        opt.add_param_group({"params": [torch.zeros(3, device="meta", requires_grad=True)]})
    pt = torch.zeros(4, 3).t().requires_grad_()
    pt.grad = torch.ones(3, 4)
    with pytest.raises(ValueError, match="contiguous"):
        ours([pt]).step()


@pytest.mark.parametrize("ours,theirs,kw", PAIRS, ids=IDS)
def test_hyperparameter_made_non_finite_later_is_refused_at_step(ours, theirs, kw):
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    opt = ours([p])
    opt.param_groups[0]["lr"] = math.inf
    with pytest.raises(ValueError, match="finite"):
        opt.step()


def test_torch_numerics_refused_where_bits_cannot_be_promised(monkeypatch):
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "ZVECTOR")
    with pytest.raises(NumericsUnavailable, match="capability"):
        replay.optim.AdamW([p], numerics="torch").step()
    monkeypatch.undo()
    from replay import _numerics
    with pytest.raises(NumericsUnavailable, match="portable"):
        _numerics.resolve("torch", torch.device("cuda"), uses_sqrt=True)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    with pytest.raises(NumericsUnavailable, match="MKL"):
        replay.optim.Adam([p], numerics="torch").step()
    replay.optim.SGD([p], numerics="torch").step()  # SGD takes no square root: still fine


@pytest.mark.parametrize("ours,theirs,kw", PAIRS, ids=IDS)
def test_fingerprint_false_changes_no_bits(ours, theirs, kw):
    ma, mb = make_model(), make_model()
    oa = ours(ma.parameters(), **kw)
    ob = ours(mb.parameters(), fingerprint=False, **kw)
    train(ma, oa, 4)
    train(mb, ob, 4)
    assert_same_model(ma, mb)
    with pytest.raises(RuntimeError, match="fingerprint=False"):
        ob.fingerprints


@pytest.mark.parametrize("sizes", [(100, 3_000), (100, 70_000, 130_000)], ids=["serial", "thread-pool"])
@pytest.mark.parametrize("ours,theirs,kw", PAIRS, ids=IDS)
def test_small_steps_on_the_calling_thread_and_large_ones_on_the_pool_match_torch(ours, theirs, kw, sizes):
    """A step over at most 2^16 elements in all runs on the calling thread, a larger one on
    torch's thread pool (csrc/cpu/loops.h): both give torch's bits and true fingerprints."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(3)
        ours_params = [torch.randn(n, generator=gen).requires_grad_() for n in sizes]
        theirs_params = [p.detach().clone().requires_grad_() for p in ours_params]
        a, b = ours(ours_params, numerics="torch", **kw), theirs(theirs_params, **kw)
        for _ in range(3):
            grads = [torch.randn(n, generator=gen) for n in sizes]
            for p, q, g in zip(ours_params, theirs_params, grads):
                p.grad, q.grad = g.clone(), g.clone()
            a.step()
            b.step()
    finally:
        torch.set_num_threads(before)
    for index, (p, q) in enumerate(zip(ours_params, theirs_params)):
        assert torch.equal(bits(p), bits(q))
        assert a.fingerprints[index]["param"] == replay.fingerprint(p)
        for key, value in a.state[p].items():
            assert a.fingerprints[index][key] == replay.fingerprint(value), key
