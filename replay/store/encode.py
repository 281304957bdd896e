"""Nested training state <-> (JSON skeleton, flat dict of tensors), without pickle.

``flatten_state`` turns a nested structure of dicts, lists, tuples, scalars and tensors (a model's
``state_dict()``, an optimizer's, a scheduler's, extra components) into

* a *skeleton*: plain JSON data (dicts with str keys, lists, str, int, finite float, bool, None),
  where each tensor is replaced by ``{"__tensor__": key}``;
* a dict ``key -> tensor`` ready for ``safetensors.torch.save_file``: detached, CPU, contiguous,
  private copies (no shared storage).

``unflatten_state(skeleton, tensors)`` gives back the identical structure, types included. The
only code that runs while decoding is this module's own: the skeleton is data, never a recipe.

Encoding (a JSON object with exactly one key of the form ``__name__`` is a marker):

====================================  ======================================================
Python value                          skeleton
====================================  ======================================================
``None``, ``bool``, ``int``, ``str``  itself (ints of any size; bool stays bool)
finite ``float``                      itself (JSON keeps the shortest repr: exact round trip)
``inf``, ``-inf``, ``nan``            ``{"__float__": "inf" | "-inf" | "nan"}``; a NaN with any
                                      other bit pattern (sign, payload) is
                                      ``{"__float__": "nan:0x<16 hex digits>"}``
``torch.Tensor``                      ``{"__tensor__": "optimizer/state/0/exp_avg"}``
``tuple``                             ``{"__tuple__": [...]}``
``list``                              ``[...]``
``dict`` with str keys                ``{...}``, unless a key looks like a marker
                                      (``__x__``): then it is escaped as ``__dict__``
other ``dict``                        ``{"__dict__": [[key, value], ...]}`` (keys encoded too)
``collections.OrderedDict``           ``{"__odict__": [[key, value], ...]}``
``torch.dtype``                       ``{"__dtype__": "float32"}``
====================================  ======================================================

Types are matched exactly: subclasses (numpy scalars, namedtuples, defaultdict, IntEnum, ...)
and anything else raise TypeError naming where in the state the value sits. Tensor subclasses
such as ``nn.Parameter`` are stored as their data and come back as plain tensors; the
``_metadata`` attribute of a ``state_dict()`` is not kept (``load_state_dict`` does not need it
for current modules). The skeleton relies on JSON object order to keep dict order: serialize it
with ``sort_keys=False`` (``write_checkpoint`` does).
"""

from __future__ import annotations

import collections
import math

import torch

from .floats import float_from_text, float_to_text

__all__ = [
    "SUPPORTED_DTYPES",
    "flatten_state",
    "float_from_text",
    "float_to_text",
    "unflatten_state",
]

SUPPORTED_DTYPES = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.float8_e5m2,
        torch.float8_e4m3fn,
        torch.float8_e5m2fnuz,
        torch.float8_e4m3fnuz,
    }
)
"""Tensor dtypes safetensors can store (checked at flatten time, not at write time)."""

_TENSOR, _TUPLE, _DICT, _ODICT, _FLOAT, _DTYPE = (
    "__tensor__",
    "__tuple__",
    "__dict__",
    "__odict__",
    "__float__",
    "__dtype__",
)

_DTYPES_BY_NAME = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}



def _is_marker_like(key: str) -> bool:
    return len(key) > 4 and key.startswith("__") and key.endswith("__")


# ----------------------------------------------------------------------------- flatten ---


def _show(path: tuple[str, ...]) -> str:
    return "/".join(path) if path else "<root>"


def _key_text(key) -> str:
    return key if type(key) is str else repr(key)


class _Flattener:
    def __init__(self, copy: bool = True) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.copy = copy
        self._active: set[int] = set()

    def _tensor_key(self, path: tuple[str, ...]) -> str:
        base = "/".join(path) or "tensor"
        key, n = base, 0
        while key in self.tensors or key == "__metadata__":  # safetensors reserves __metadata__
            n += 1
            key = f"{base}~{n}"
        return key

    def _tensor(self, t: torch.Tensor, path: tuple[str, ...]) -> dict:
        where = _show(path)
        if t.layout != torch.strided:
            raise TypeError(f"cannot store the {t.layout} tensor at '{where}': only dense tensors")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"cannot store the {t.dtype} tensor at '{where}': safetensors does not hold "
                f"this dtype"
            )
        if t.device.type == "meta":
            raise TypeError(f"cannot store the meta tensor at '{where}': it has no data")
        t = t.detach()
        if not self.copy:
            copy = t
        elif t.device.type == "cpu" and t.is_contiguous() and not t.is_conj() and not t.is_neg():
            copy = t.clone()  # private storage, byte-for-byte
        else:
            copy = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            copy.copy_(t)
        key = self._tensor_key(path)
        self.tensors[key] = copy
        return {_TENSOR: key}

    def _pairs(self, d: dict, path: tuple[str, ...]) -> list:
        return [
            [self.key(k, path), self.value(v, path + (_key_text(k),))] for k, v in d.items()
        ]

    def key(self, key, path: tuple[str, ...]):
        """A dict key: any encodable, hashable value except tensors."""
        if isinstance(key, torch.Tensor):
            raise TypeError(f"cannot store a dict keyed by a tensor at '{_show(path)}'")
        return self.value(key, path + (f"<key {_key_text(key)}>",))

    def value(self, obj, path: tuple[str, ...]):
        t = type(obj)
        if obj is None or t is bool or t is int or t is str:
            return obj
        if t is float:
            return obj if math.isfinite(obj) else {_FLOAT: float_to_text(obj)}
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path)
        if t is torch.dtype:
            return {_DTYPE: str(obj).removeprefix("torch.")}
        if t in (list, tuple, dict, collections.OrderedDict):
            if id(obj) in self._active:
                raise TypeError(f"cannot store the {t.__name__} at '{_show(path)}': it contains itself")
            self._active.add(id(obj))
            try:
                if t is list:
                    return [self.value(v, path + (str(i),)) for i, v in enumerate(obj)]
                if t is tuple:
                    return {_TUPLE: [self.value(v, path + (str(i),)) for i, v in enumerate(obj)]}
                if t is collections.OrderedDict:
                    return {_ODICT: self._pairs(obj, path)}
                if all(type(k) is str and not _is_marker_like(k) for k in obj):
                    return {k: self.value(v, path + (k,)) for k, v in obj.items()}
                return {_DICT: self._pairs(obj, path)}
            finally:
                self._active.discard(id(obj))
        hint = ""
        if t.__module__ == "numpy":
            hint = " (convert numpy values to torch tensors or Python scalars first)"
        raise TypeError(
            f"cannot store a value of type {t.__module__}.{t.__qualname__} at '{_show(path)}': "
            f"the run store holds dict, list, tuple, int, float, bool, str, None, torch.dtype "
            f"and torch.Tensor only{hint}"
        )


def flatten_state(obj, *, copy: bool = True) -> tuple[object, dict[str, torch.Tensor]]:
    """Split ``obj`` into a JSON-ready skeleton and a dict of tensors (see the module docstring).

    Tensor keys are readable paths (``"model/fc.weight"``, ``"optimizer/state/0/exp_avg"``);
    when two paths collide (a key containing ``/``) the later one gets a ``~N`` suffix.
    Raises TypeError, naming the path, for anything the encoding does not cover.
    With ``copy=False`` the tensors are the state's own (detached, on their device): for
    fingerprinting where they live, not for writing.
    """
    f = _Flattener(copy)
    skeleton = f.value(obj, ())
    return skeleton, f.tensors


# --------------------------------------------------------------------------- unflatten ---


class _Unflattener:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.used: set[str] = set()

    def _fail(self, path: tuple[str, ...], what: str):
        raise ValueError(f"malformed state skeleton at '{_show(path)}': {what}")

    def _pairs(self, pairs, path):
        if type(pairs) is not list:
            self._fail(path, "a dict's pairs must be a list")
        out = []
        for pair in pairs:
            if type(pair) is not list or len(pair) != 2:
                self._fail(path, "each dict entry must be a [key, value] pair")
            key = self.value(pair[0], path + ("<key>",))
            try:
                hash(key)
            except TypeError:
                self._fail(path, f"unhashable dict key {key!r}")
            if isinstance(key, torch.Tensor):
                self._fail(path, "a dict key is a tensor")
            out.append((key, self.value(pair[1], path + (_key_text(key),))))
        if len({k for k, _ in out}) != len(out):
            self._fail(path, "duplicate dict keys")
        return out

    def _marker(self, name: str, arg, path):
        if name == _TENSOR:
            if type(arg) is not str or arg not in self.tensors:
                self._fail(path, f"tensor {arg!r} is not in the tensor file")
            if arg in self.used:
                self._fail(path, f"tensor {arg!r} is referenced twice")
            self.used.add(arg)
            return self.tensors[arg]
        if name == _TUPLE:
            if type(arg) is not list:
                self._fail(path, "__tuple__ must hold a list")
            return tuple(self.value(v, path + (str(i),)) for i, v in enumerate(arg))
        if name == _DICT:
            return dict(self._pairs(arg, path))
        if name == _ODICT:
            return collections.OrderedDict(self._pairs(arg, path))
        if name == _FLOAT:
            try:
                return float_from_text(arg)
            except ValueError as e:
                self._fail(path, str(e))
        if name == _DTYPE:
            if type(arg) is not str or arg not in _DTYPES_BY_NAME:
                self._fail(path, f"unknown dtype {arg!r}")
            return _DTYPES_BY_NAME[arg]
        self._fail(path, f"unknown marker {name!r}")

    def value(self, node, path: tuple[str, ...]):
        t = type(node)
        if node is None or t is bool or t is int or t is str:
            return node
        if t is float:
            if not math.isfinite(node):
                self._fail(path, "a non-finite float outside __float__")
            return node
        if t is list:
            return [self.value(v, path + (str(i),)) for i, v in enumerate(node)]
        if t is dict:
            if len(node) == 1:
                (k, v), = node.items()
                if type(k) is str and _is_marker_like(k):
                    return self._marker(k, v, path)
            out = {}
            for k, v in node.items():
                if type(k) is not str or _is_marker_like(k):
                    self._fail(path, f"unexpected key {k!r} in a plain dict")
                out[k] = self.value(v, path + (k,))
            return out
        self._fail(path, f"unexpected {t.__name__} in a skeleton")


def unflatten_state(skeleton, tensors: dict[str, torch.Tensor]):
    """Rebuild the structure ``flatten_state`` split, with the given tensors put back in place.

    Raises ValueError, naming the path, if the skeleton is not one ``flatten_state`` writes, a
    referenced tensor is missing, or a tensor in ``tensors`` is not referenced.
    """
    u = _Unflattener(tensors)
    obj = u.value(skeleton, ())
    unused = sorted(set(tensors) - u.used)
    if unused:
        shown = ", ".join(repr(k) for k in unused[:5]) + (" ..." if len(unused) > 5 else "")
        raise ValueError(f"tensors not referenced by the state skeleton: {shown}")
    return obj
