"""Fingerprints: 64-bit digests of a tensor's exact bits, dtype and shape.

A fingerprint is computed in two stages:

1. the kernel sum (csrc/kernels/fingerprint.h): S = sum_i mix(bits_i XOR i * GOLDEN) mod 2^64
   over the elements in row-major order, where bits_i is the element's raw bit pattern
   (1, 2, 4 or 8 bytes, zero-extended). Integer addition is order-independent, so S is the
   same on CPU and CUDA, for any thread count, chunking or reduction order;
2. finish(S, dtype, shape) here: S mixed with the dtype's name and every dimension.

The fused optimizer and EMA kernels compute S for every tensor they write in the same pass
over memory, so their fingerprints come at no extra memory traffic and equal
`fingerprint(tensor)` afterwards.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from array import array
from collections.abc import Iterable, Mapping, Sequence

import torch

from . import _ops

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # csrc/kernels/fingerprint.h kFingerprintGolden
_MUL = 0xD6E8FEB86659FD93  # csrc/kernels/fingerprint.h kFingerprintMul
_TENSOR_TAG = 0x7265706C61792D74  # "replay-t": domain separation of tensor digests
_STATE_TAG = 0x7265706C61792D73  # "replay-s": ... and of state digests

_WORD_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _mix(x: int) -> int:
    """A bijective 64-bit mixer (xor-shift / odd multiply rounds) for folding in metadata."""
    x &= _MASK
    x ^= x >> 32
    x = (x * _MUL) & _MASK
    x ^= x >> 32
    x = (x * _MUL) & _MASK
    x ^= x >> 32
    return x


def element_term(bits: int, index: int, width: int = 4) -> int:
    """The term one element of `width` bytes adds to a kernel sum: a pure-Python reference of
    csrc/kernels/fingerprint.h (fingerprint_term32 for 1, 2 or 4-byte words, fingerprint_term64
    for 8-byte words)."""
    x = bits ^ ((index * _GOLDEN) & _MASK)
    if width == 8:
        x ^= x >> 32
    y = (x * _MUL) & _MASK
    return y ^ (y >> 32)


@functools.lru_cache(maxsize=4096)
def name_hash(name: str) -> int:
    """A stable 64-bit hash of a string (unlike Python's hash(), the same in every process)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def finish(kernel_sum: int, dtype: torch.dtype, shape: Sequence[int]) -> int:
    """Fold a kernel sum together with dtype and shape into the final fingerprint."""
    h = _mix((kernel_sum & _MASK) ^ _TENSOR_TAG)
    h = _mix(h ^ name_hash(str(dtype)))
    h = _mix(h ^ len(shape))
    for size in shape:
        h = _mix(h ^ int(size))
    return h


_DTYPE_HASHES: dict[torch.dtype, int] = {}


def _dtype_hash(dtype: torch.dtype) -> int:
    value = _DTYPE_HASHES.get(dtype)
    if value is None:
        value = _DTYPE_HASHES[dtype] = name_hash(str(dtype))
    return value


def finish_many(kernel_sums: Sequence[int], tensors: Sequence) -> list[int]:
    """[finish(s, t.dtype, t.shape) for s, t in zip(kernel_sums, tensors)] in one call to the
    extension (csrc/ops.cpp): a step finishes dozens of fingerprints, and mixing them one by one
    in Python cost more than the kernels that hashed the tensors. `tensors` may be anything with
    .dtype and .shape; kernel sums may be signed (int64 bits) or unsigned."""
    words: list[int] = []
    for s, t in zip(kernel_sums, tensors):
        shape = t.shape
        words += (s & _MASK, _dtype_hash(t.dtype), len(shape), *shape)
    return array("Q", _ops.host().finish_fingerprints(array("Q", words))).tolist()


def _as_words(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous integer view of the tensor's bits, in row-major element order."""
    if tensor.is_sparse or tensor.layout != torch.strided:
        raise TypeError(f"replay.fingerprint takes dense (strided) tensors, not {tensor.layout}")
    if tensor.is_quantized:
        raise TypeError("replay.fingerprint does not take quantized tensors; dequantize or use int_repr()")
    t = tensor.detach()
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj().resolve_neg())
    elif t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    word = _WORD_DTYPES.get(t.element_size())
    if word is None:
        raise TypeError(f"replay.fingerprint: unsupported dtype {tensor.dtype}")
    return t.view(word) if t.dtype != word else t


def fingerprint_scalar(tensor: torch.Tensor, value: float | None = None) -> int:
    """fingerprint() of a one-element float32 CPU tensor (an optimizer's step count), without
    a kernel call: a per-parameter op call would cost more than the step it describes. `value`,
    if the caller already read it (tensor.item()), saves reading it again."""
    if tensor.dtype != torch.float32 or tensor.numel() != 1 or tensor.device.type != "cpu":
        return fingerprint(tensor)
    return _float32_scalar_fingerprint(tensor.item() if value is None else value, tuple(tensor.shape))


@functools.lru_cache(maxsize=1024)
def _float32_scalar_fingerprint(value: float, shape: tuple[int, ...]) -> int:
    """One per distinct (step count, shape), not one per parameter and step."""
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    return finish(element_term(bits, 0, 4), torch.float32, shape)


def kernel_sums(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Kernel sums (unsigned 64-bit ints) of several tensors, one op call per device."""
    words = [_as_words(t) for t in tensors]
    sums: list[int] = [0] * len(words)
    by_device: dict[torch.device, list[int]] = {}
    for i, w in enumerate(words):
        by_device.setdefault(w.device, []).append(i)
    for indices in by_device.values():
        raw = _ops.fingerprint_sums([words[i] for i in indices]).tolist()
        for i, s in zip(indices, raw):
            sums[i] = s & _MASK
    return sums


def fingerprint(tensor: torch.Tensor) -> int:
    """A 64-bit digest of the tensor's exact bits, dtype and shape (an int in [0, 2**64)).

    Identical on CPU and CUDA and for any thread count; changes when any single bit flips
    and when two elements are swapped. Non-contiguous views are digested in logical
    (row-major) order, so a view and its contiguous copy agree.
    """
    return fingerprints([tensor])[0]


def fingerprints(tensors: Sequence[torch.Tensor]) -> list[int]:
    """fingerprint() of several tensors, batched into one kernel call per device."""
    tensors = list(tensors)
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"replay.fingerprint takes tensors, got {type(t).__name__}")
    return finish_many(kernel_sums(tensors), tensors) if tensors else []


def combine_state(named_fingerprints: Iterable[tuple[str, int]]) -> int:
    """Digest of a set of (name, fingerprint) pairs, independent of their order:
    mix(mix(sum_k mix(name_hash(name_k) ^ fp_k) ^ TAG) ^ count), the sum modulo 2^64 (computed
    in the extension, csrc/ops.cpp; tests hold it to this formula written out in Python)."""
    words: list[int] = []
    for name, fp in named_fingerprints:
        words += (name_hash(name), fp & _MASK)
    return _ops.host().combine_fingerprints(array("Q", words))


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> int:
    """Digest of a mapping of names to tensors (a state_dict, say), independent of dict order.

    Each entry's name is mixed with its tensor's fingerprint, so renaming an entry or moving a
    tensor to another name changes the digest.
    """
    names = list(state.keys())
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"state_fingerprint needs string keys, got {name!r}")
        if not isinstance(state[name], torch.Tensor):
            raise TypeError(f"state_fingerprint: entry {name!r} is a {type(state[name]).__name__}, not a tensor")
    fps = fingerprints([state[n] for n in names])
    return combine_state(zip(names, fps))
