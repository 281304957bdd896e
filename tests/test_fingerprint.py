"""replay.fingerprint, fingerprints and state_fingerprint.

The kernel sums are compared with two references that share no code with the kernel: the
pure-Python element_term of replay.fingerprint and an independent numpy uint64 re-implementation
of csrc/kernels/fingerprint.h's fingerprint_term over the tensor's raw bytes. Everything is exact
integer equality; inputs come from fixed seeds.
"""

import collections
import sys
import types

import numpy as np
import pytest
import torch

import replay

# The module that defines replay.fingerprint (found through the function, not by its file name).
fpmod = sys.modules[replay.fingerprint.__module__]
element_term, finish, kernel_sums = fpmod.element_term, fpmod.finish, fpmod.kernel_sums

MASK = (1 << 64) - 1
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MUL = np.uint64(0xD6E8FEB86659FD93)

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.complex128,
]
SIZES = [0, 1, 7, 1000, 100_003]

# Same-width signed integer dtypes, for flipping bits through an integer view.
INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ------------------------------------------------------------------------- references ----


def word_width(dtype: torch.dtype) -> int:
    """Bytes per hashed word: complex numbers are hashed as (real, imag) pairs of words."""
    size = torch.empty((), dtype=dtype).element_size()
    return size // 2 if dtype.is_complex else size


def raw_words(t: torch.Tensor) -> np.ndarray:
    """The tensor's elements in row-major order as zero-extended uint64 words, read from its
    raw little-endian bytes (no replay code involved)."""
    flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)
    width = word_width(t.dtype)
    return data.view(f"<u{width}").astype(np.uint64)


def numpy_terms(words: np.ndarray, index: np.ndarray, width: int) -> np.ndarray:
    """csrc/kernels/fingerprint.h's terms in numpy: fingerprint_term32 for words of up to 4
    bytes, fingerprint_term64 (one more xor-shift first) for 8-byte words."""
    x = words ^ (index * GOLDEN)  # uint64 array arithmetic wraps modulo 2^64
    if width == 8:
        x = x ^ (x >> np.uint64(32))
    y = x * MUL
    return y ^ (y >> np.uint64(32))


def numpy_sum(words: np.ndarray, width: int) -> int:
    """sum_i term(words[i], i) mod 2^64, in numpy."""
    index = np.arange(words.size, dtype=np.uint64)
    return int(numpy_terms(words, index, width).sum(dtype=np.uint64))


def numpy_sum_of(t: torch.Tensor) -> int:
    return numpy_sum(raw_words(t), word_width(t.dtype))


def python_sum(words: np.ndarray, width: int) -> int:
    total = 0
    for i, w in enumerate(words.tolist()):
        total += element_term(int(w), i, width)
    return total & MASK


def random_tensor(dtype: torch.dtype, shape, seed: int) -> torch.Tensor:
    """Random raw bit patterns (NaN payloads, subnormals, infinities included) for every
    dtype; 0/1 for bool."""
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8).bool()
    size = torch.empty((), dtype=dtype).element_size()
    numel = int(np.prod(shape, dtype=np.int64))
    raw = torch.randint(0, 256, (numel * size,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


# -------------------------------------------------------------------- kernel vs reference ----


def test_numpy_reference_agrees_with_element_term():
    """The two references agree term by term, including huge indices and all-ones words."""
    gen = np.random.default_rng(0)
    wide = gen.integers(0, 2**64, size=64, dtype=np.uint64, endpoint=False)
    wide[0], wide[1] = 0, np.uint64(MASK)
    for width, words in ((8, wide), (4, wide & np.uint64(0xFFFFFFFF))):
        for index in [0, 1, 2, 1000, 2**31, 2**32 + 5, 2**40 + 3, 2**63 + 1]:
            index_array = np.full(words.size, index, dtype=np.uint64)
            terms = numpy_terms(words, index_array, width)
            assert terms.tolist() == [element_term(w, index, width) for w in words.tolist()]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_sum_and_fingerprint_match_reference(dtype, size):
    t = random_tensor(dtype, (size,), seed=size * 31 + DTYPES.index(dtype))
    words = raw_words(t)
    assert words.size == size * (2 if dtype.is_complex else 1)
    expected = numpy_sum(words, word_width(dtype))
    if size <= 1000:
        assert python_sum(words, word_width(dtype)) == expected
    (got,) = kernel_sums([t])
    assert got == expected
    assert replay.fingerprint(t) == finish(expected, dtype, t.shape)
    assert 0 <= replay.fingerprint(t) < 2**64


def test_batched_call_matches_single_calls_and_reference():
    tensors = [random_tensor(dt, shape, seed=k) for k, (dt, shape) in enumerate(
        [(torch.float32, (3, 0, 2)), (torch.int64, ()), (torch.bfloat16, (5, 7)),
         (torch.bool, (40_000,)), (torch.uint8, (1,)), (torch.complex64, (2, 3))])]
    batched = kernel_sums(tensors)
    assert batched == [kernel_sums([t])[0] for t in tensors]
    assert batched == [numpy_sum_of(t) for t in tensors]
    assert replay.fingerprints(tensors) == [finish(s, t.dtype, t.shape) for s, t in zip(batched, tensors)]
    assert replay.fingerprints([]) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8], ids=str)
def test_same_value_for_one_and_two_threads(dtype):
    t = random_tensor(dtype, (3_000_017,), seed=5)  # about 92 work units of 2^15 elements
    expected = numpy_sum_of(t)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel_sums([t, t[1:]])
        fp_one = replay.fingerprint(t)
        torch.set_num_threads(2)
        assert torch.get_num_threads() == 2
        two = kernel_sums([t, t[1:]])
        fp_two = replay.fingerprint(t)
    finally:
        torch.set_num_threads(before)
    assert one == two
    assert one[0] == expected
    assert one[1] == numpy_sum_of(t[1:])
    assert fp_one == fp_two == finish(expected, dtype, t.shape)


# ------------------------------------------------------------------------- sensitivity ----


FLIP_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
               torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64]


def flipped(t: torch.Tensor, position: int, bit: int) -> torch.Tensor:
    """A copy of t with one bit of one hashed word flipped."""
    out = t.clone()
    if t.dtype == torch.bool:
        flat = out.view(-1)
        flat[position] = ~flat[position]
        return out
    words = torch.view_as_real(out) if t.is_complex() else out
    ints = words.view(INT_OF_WIDTH[words.element_size()]).view(-1)
    width = 8 * words.element_size()
    mask = -(1 << bit) if bit == width - 1 else 1 << bit  # the sign bit as a signed scalar
    ints[position] ^= mask
    return out


@pytest.mark.parametrize("dtype", FLIP_DTYPES, ids=str)
def test_any_single_flipped_bit_changes_the_fingerprint(dtype):
    n = 4099
    if dtype.is_floating_point:
        t = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    else:
        t = random_tensor(dtype, (n,), seed=1)
    words = 2 * n if dtype.is_complex else n
    width = 1 if dtype == torch.bool else 8 * word_width(dtype)
    gen = np.random.default_rng(2)
    cases = {(p, b) for p in (0, words - 1, words // 2) for b in {0, width - 1}}
    while len(cases) < 200:
        cases.add((int(gen.integers(words)), int(gen.integers(width))))
    cases = sorted(cases)
    variants = [flipped(t, p, b) for p, b in cases]
    base = replay.fingerprint(t)
    fps = replay.fingerprints(variants)
    for (p, b), v, fp in zip(cases, variants, fps):
        assert not torch.equal(raw_words_tensor(v), raw_words_tensor(t)), (p, b)  # the flip happened
        assert fp != base, f"flipping bit {b} of word {p} left the fingerprint unchanged"


DISTINCT_DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32,
    torch.complex64, torch.float64, torch.int64, torch.complex128,
]


@pytest.mark.parametrize("dtype", DISTINCT_DTYPES, ids=str)
def test_flips_of_any_bit_at_different_positions_give_distinct_fingerprints(dtype):
    """Not implied by bijectivity: the term's change must carry enough entropy that the same
    flip at two positions is told apart, and that two flips do not cancel."""
    n = 512
    t = torch.randn(n, generator=torch.Generator().manual_seed(21)).to(dtype)
    if not dtype.is_floating_point and not dtype.is_complex:
        t = random_tensor(dtype, (n,), seed=21)
    words = 2 * n if dtype.is_complex else n
    width = 8 * word_width(dtype)
    base = replay.fingerprint(t)
    rng = np.random.default_rng(22)
    for bit in range(width):
        positions = rng.choice(words, size=16, replace=False).tolist()
        singles = replay.fingerprints([flipped(t, p, bit) for p in positions])
        assert len(set(singles)) == len(positions), f"bit {bit}: equal fingerprints for flips at different positions"
        pairs = [flipped(flipped(t, p, bit), q, bit) for p, q in zip(positions[::2], positions[1::2])]
        assert base not in replay.fingerprints(pairs), f"bit {bit}: two flips cancelled"


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str
)
def test_negating_two_elements_changes_the_fingerprint(dtype):
    t = torch.randn(1000, generator=torch.Generator().manual_seed(23)).to(dtype)
    base = replay.fingerprint(t)
    rng = np.random.default_rng(24)
    variants = []
    for _ in range(64):
        i, j = rng.choice(1000, size=2, replace=False).tolist()
        v = t.clone()
        v[i], v[j] = -t[i], -t[j]
        variants.append(v)
    assert base not in replay.fingerprints(variants)


def raw_words_tensor(t):
    return torch.from_numpy(raw_words(t).view(np.int64))


def test_swapping_two_different_elements_changes_the_fingerprint():
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(1000, generator=gen)
    base = replay.fingerprint(t)
    rng = np.random.default_rng(4)
    seen = {base}
    for _ in range(100):
        i, j = (int(k) for k in rng.choice(1000, size=2, replace=False))
        s = t.clone()
        s[i], s[j] = t[j], t[i]
        fp = replay.fingerprint(s)
        assert fp != base, (i, j)
        seen.add(fp)
    assert len(seen) == 101
    # Neighbours, ends, and a permutation that keeps the multiset of values (XOR-style
    # digests miss all of these).
    for perm in (torch.tensor([1, 0] + list(range(2, 1000))), torch.roll(torch.arange(1000), 1),
                 torch.arange(999, -1, -1)):
        assert replay.fingerprint(t[perm]) != base
    ints = torch.tensor([5, 9, 5, 9], dtype=torch.int32)
    assert replay.fingerprint(ints) != replay.fingerprint(torch.tensor([9, 5, 5, 9], dtype=torch.int32))


def test_same_bits_with_other_shape_or_dtype_differ():
    x = torch.randn(24, generator=torch.Generator().manual_seed(6))
    same_bits = [
        x, x.view(4, 6), x.view(6, 4), x.view(24, 1), x.view(1, 24), x.view(2, 3, 4),
        x.view(torch.int32), x.view(torch.int32).view(4, 6), x.view(torch.uint32) if hasattr(torch, "uint32") else None,
    ]
    same_bits = [t for t in same_bits if t is not None]
    assert len(set(kernel_sums(same_bits))) == 1  # the kernel sum sees the raw bits only ...
    fps = replay.fingerprints(same_bits)
    assert len(set(fps)) == len(fps)  # ... the fingerprint also sees dtype and shape

    h = torch.randn(8, generator=torch.Generator().manual_seed(7)).half()
    halfwords = [h, h.view(torch.bfloat16), h.view(torch.int16)]
    assert len(set(replay.fingerprints(halfwords))) == 3
    b = torch.tensor([0, 1, 200, 255], dtype=torch.uint8)
    assert replay.fingerprint(b) != replay.fingerprint(b.view(torch.int8))
    assert replay.fingerprint(b[:2].bool()) != replay.fingerprint(b[:2])
    z = torch.randn(5, dtype=torch.complex64, generator=torch.Generator().manual_seed(8))
    assert kernel_sums([z]) == kernel_sums([torch.view_as_real(z)])
    assert replay.fingerprint(z) != replay.fingerprint(torch.view_as_real(z))
    assert replay.fingerprint(torch.zeros(0)) != replay.fingerprint(torch.zeros(0, 3))
    assert replay.fingerprint(torch.tensor(1.0)) != replay.fingerprint(torch.tensor([1.0]))


# ------------------------------------------------------------------------------ views ----


def view_cases():
    base = torch.randn(6, 8, 5, generator=torch.Generator().manual_seed(9))
    row = torch.randn(7, generator=torch.Generator().manual_seed(10))
    img = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(11))
    ints = torch.arange(60, dtype=torch.int16).view(6, 10)
    return {
        "transpose": base.transpose(0, 2),
        "permute": base.permute(1, 2, 0),
        "step_slice": base[:, ::3, 1::2],
        "range_slice": base[1:-1, 2:7:2, ::4],
        "select": base[..., 3],
        "expand": row.expand(4, 7),
        "expand_middle": row.view(7, 1).expand(7, 3),
        "unfold_overlapping": row.unfold(0, 3, 1),
        "diagonal": base[:, :, 0].diagonal(),
        "channels_last": img.contiguous(memory_format=torch.channels_last),
        "as_strided_overlap": torch.as_strided(row, (3, 4), (1, 1)),
        "int_transpose": ints.t(),
        "bool_slice": (ints % 3 == 0)[::2, 1::3],
        "bfloat16_transpose": base.bfloat16().transpose(1, 2),
        "complex_transpose": torch.complex(base, base.flip(0)).transpose(0, 1),
    }


@pytest.mark.parametrize("name", list(view_cases()))
def test_view_equals_its_contiguous_copy(name):
    view = view_cases()[name]
    copy = view.contiguous()
    if name != "channels_last":
        assert not view.is_contiguous()
    assert copy.is_contiguous()
    assert replay.fingerprint(view) == replay.fingerprint(copy)
    assert kernel_sums([view]) == [numpy_sum_of(copy)]


def test_views_are_digested_in_logical_order_not_storage_order():
    x = torch.randn(5, 5, generator=torch.Generator().manual_seed(12))
    assert replay.fingerprint(x.t()) != replay.fingerprint(x)
    assert replay.fingerprint(x.t()) == replay.fingerprint(x.t().clone(memory_format=torch.contiguous_format))
    img = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(13))
    cl = img.contiguous(memory_format=torch.channels_last)
    assert replay.fingerprint(cl) == replay.fingerprint(img)


def test_conj_view_is_resolved():
    z = torch.randn(6, dtype=torch.complex64, generator=torch.Generator().manual_seed(14))
    zc = z.conj()
    assert zc.is_conj()
    assert replay.fingerprint(zc) == replay.fingerprint(torch.conj_physical(z))
    assert replay.fingerprint(zc) != replay.fingerprint(z)
    assert replay.fingerprint(zc[::2]) == replay.fingerprint(torch.conj_physical(z)[::2].contiguous())
    x = torch.randn(4, generator=torch.Generator().manual_seed(15))
    assert replay.fingerprint(x.conj()) == replay.fingerprint(x)  # a no-op for real tensors


def test_real_neg_view_is_resolved():
    z = torch.randn(6, dtype=torch.complex64, generator=torch.Generator().manual_seed(16))
    imag_of_conj = z.conj().imag  # a real view with the negative bit set
    assert imag_of_conj.is_neg()
    materialized = -(z.imag.clone())
    assert not materialized.is_neg()
    assert replay.fingerprint(imag_of_conj) == replay.fingerprint(materialized)
    assert replay.fingerprint(imag_of_conj) != replay.fingerprint(z.imag)
    x = torch.randn(9, generator=torch.Generator().manual_seed(17))
    nx = torch._neg_view(x)
    assert nx.is_neg()
    assert replay.fingerprint(nx) == replay.fingerprint(-x)
    assert replay.fingerprint(nx[::2]) == replay.fingerprint((-x)[::2].contiguous())


def test_complex_neg_view_is_resolved():
    z = torch.randn(6, dtype=torch.complex64, generator=torch.Generator().manual_seed(18))
    nz = torch._neg_view(z)
    assert nz.is_neg()
    assert replay.fingerprint(nz) == replay.fingerprint(-z)


def test_requires_grad_and_nonleaf_tensors():
    w = torch.randn(10, requires_grad=True)
    y = w * 2
    assert replay.fingerprint(w) == replay.fingerprint(w.detach().clone())
    assert replay.fingerprint(y) == replay.fingerprint(y.detach().clone())


# ------------------------------------------------------------------------------ errors ----


@pytest.mark.filterwarnings("ignore::UserWarning")  # sparse CSR is beta; quantize_per_tensor deprecated
def test_sparse_and_quantized_tensors_raise_type_error():
    x = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]])
    with pytest.raises(TypeError, match="dense"):
        replay.fingerprint(x.to_sparse())
    with pytest.raises(TypeError, match="dense"):
        replay.fingerprint(x.to_sparse_csr())
    with pytest.raises(TypeError, match="dense"):
        replay.fingerprints([x, x.to_sparse()])
    with pytest.raises(TypeError, match="quantized"):
        replay.fingerprint(torch.quantize_per_tensor(x, 0.1, 0, torch.quint8))


def test_non_tensors_raise_type_error():
    with pytest.raises(TypeError):
        replay.fingerprint([1.0, 2.0])
    with pytest.raises(TypeError):
        replay.fingerprints([torch.zeros(2), np.zeros(2)])
    with pytest.raises(TypeError):
        replay.fingerprint(3.0)


# ----------------------------------------------------------------------- stable format ----


PINNED_SUM = 3631261991852591283
PINNED_FP = 4770758651262501850
PINNED_FP_FLOAT = 16549586220996487722
PINNED_STATE = 13795044949668714861


def test_fingerprint_values_are_pinned():
    """Recorded ledgers store fingerprints: a change to the format must be deliberate.
    (Values computed at the introduction of this test; update them only with a format bump.)"""
    assert kernel_sums([torch.arange(10, dtype=torch.int32)]) == [PINNED_SUM]
    assert replay.fingerprint(torch.arange(10, dtype=torch.int32)) == PINNED_FP
    assert replay.fingerprint(torch.tensor([1.5, -0.0, float("inf")])) == PINNED_FP_FLOAT
    assert replay.state_fingerprint({"w": torch.arange(10, dtype=torch.int32), "b": torch.zeros(2)}) == PINNED_STATE


# --------------------------------------------------------------------- state fingerprints ----


def make_state():
    gen = torch.Generator().manual_seed(20)
    return {
        "layer.weight": torch.randn(4, 3, generator=gen),
        "layer.bias": torch.randn(4, generator=gen),
        "bn.num_batches_tracked": torch.tensor(7),
        "bn.running_mean": torch.randn(4, generator=gen),
    }


def test_state_fingerprint_ignores_insertion_order():
    state = make_state()
    fp = replay.state_fingerprint(state)
    reordered = dict(reversed(list(state.items())))
    assert list(reordered) != list(state)
    assert replay.state_fingerprint(reordered) == fp
    assert replay.state_fingerprint(collections.OrderedDict(sorted(state.items()))) == fp
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    sd = model.state_dict()
    assert replay.state_fingerprint(dict(reversed(list(sd.items())))) == replay.state_fingerprint(sd)


def test_state_fingerprint_changes_with_names_tensors_and_contents():
    state = make_state()
    fp = replay.state_fingerprint(state)
    renamed = dict(state)
    renamed["layer.bias_"] = renamed.pop("layer.bias")
    assert replay.state_fingerprint(renamed) != fp
    exchanged = dict(state)
    exchanged["layer.bias"], exchanged["bn.running_mean"] = state["bn.running_mean"], state["layer.bias"]
    assert not torch.equal(state["layer.bias"], state["bn.running_mean"])
    assert replay.state_fingerprint(exchanged) != fp
    changed = dict(state)
    changed["layer.weight"] = flipped(state["layer.weight"], 5, 0)
    assert replay.state_fingerprint(changed) != fp
    fewer = dict(state)
    del fewer["bn.num_batches_tracked"]
    assert replay.state_fingerprint(fewer) != fp
    assert replay.state_fingerprint({}) != replay.state_fingerprint({"": torch.zeros(0)})
    assert replay.state_fingerprint(make_state()) == fp  # fresh, equal tensors: same digest


def test_state_fingerprint_rejects_bad_entries():
    t = torch.zeros(2)
    with pytest.raises(TypeError):
        replay.state_fingerprint({"a": t, "b": 1.0})
    with pytest.raises(TypeError):
        replay.state_fingerprint({"a": [t]})
    with pytest.raises(TypeError):
        replay.state_fingerprint({"a": t, 1: t})
    with pytest.raises(TypeError):
        replay.state_fingerprint({("a",): t})
    with pytest.raises(TypeError):
        replay.state_fingerprint({"a": t.to_sparse()})


def test_vectorized_finish_and_combine_equal_the_scalar_reference():
    """finish_many and combine_state (numpy, for many values) against finish and a loop of _mix
    written out here: every rank, several dtypes, sums over the whole signed/unsigned range."""
    import random

    from replay.fingerprinting import _MASK, _STATE_TAG, _mix, combine_state, finish_many, name_hash

    rng = random.Random(11)
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.bool, torch.complex64]
    for n in (1, 3, 4, 5, 40):
        # finish_many reads only .dtype and .shape: huge shapes need no memory.
        metas = [types.SimpleNamespace(dtype=rng.choice(dtypes),
                                       shape=torch.Size(rng.choice([0, 1, 7, 2**40, 2**63 - 1])
                                                        for _ in range(rng.randrange(0, 5))))
                 for _ in range(n)]
        sums = [rng.choice([0, _MASK, -1, -(2**63), 2**63 - 1]) if rng.random() < 0.3 else rng.randrange(-(2**63), 2**64)
                for _ in range(n)]
        assert finish_many(sums, metas) == [finish(s & _MASK, t.dtype, t.shape) for s, t in zip(sums, metas)]
        pairs = [(f"part/{i}.{rng.random()}", rng.randrange(0, 2**64)) for i in range(n)]
        total = 0
        for name, fp in pairs:
            total = (total + _mix(name_hash(name) ^ fp)) & _MASK
        assert combine_state(pairs) == _mix(_mix(total ^ _STATE_TAG) ^ n)


def test_the_extension_refuses_malformed_finishing_buffers():
    from array import array

    from replay import _ops

    with pytest.raises(ValueError, match="64-bit words"):
        _ops.host().finish_fingerprints(b"12345")
    with pytest.raises(ValueError, match="truncated"):
        _ops.host().finish_fingerprints(array("Q", [1, 2, 3, 4]))  # rank 3, one size
    with pytest.raises(ValueError, match="pairs"):
        _ops.host().combine_fingerprints(array("Q", [1, 2, 3]))
    assert _ops.host().finish_fingerprints(array("Q")) == b""
