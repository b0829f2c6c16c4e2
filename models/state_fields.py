"""Explicit state schemas: what a model object's snapshot holds, and the checks made when one is read.

Snapshots travel through Kafka topics that other clients may be able to write, so they are never
pickles: a model object gives its state as a plain tree (dicts with string keys, lists, strings,
numbers, booleans, None and numpy arrays of plain numeric dtypes), and is rebuilt from such a tree
by its own ``from_state``, which names every field it reads and checks its type. Reading a tree can
build nothing but those plain values (see :mod:`infogap.stream.snapshots` for the bytes), and a tree
that does not fit the schema is refused with :class:`StateError` saying which field is wrong.

A schema maps each field name to what it must be: a numpy dtype (an array of that dtype, of any
shape unless :class:`Array` gives the number of dimensions), or a Python type (``float`` accepts
ints and the non-finite floats written as strings; ``int`` refuses bools).

>>> import numpy as np
>>> class Box:
...     STATE = {"name": str, "hits": np.int64, "at": float}
>>> b = Box(); b.name, b.hits, b.at = "x", np.arange(3), float("-inf")
>>> tree = take(b, Box.STATE); tree["at"]
'-inf'
>>> c = put(Box.__new__(Box), tree, Box.STATE, "box"); c.hits.tolist(), c.at
([0, 1, 2], -inf)
>>> put(Box.__new__(Box), {**tree, "hits": "rm -rf /"}, Box.STATE, "box")
Traceback (most recent call last):
...
infogap.models.state_fields.StateError: box: field 'hits' must be an array of int64, not str
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: dtypes an array in a snapshot may have: plain numbers and booleans, never objects
ARRAY_DTYPES = frozenset(np.dtype(t) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
                                                np.uint16, np.uint32, np.uint64, np.float32, np.float64))
_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


class StateError(ValueError):
    """A snapshot's state that cannot be read: it names the object, the field and what is wrong."""


@dataclass(frozen=True)
class Array:
    """An array field of ``dtype`` with ``ndim`` dimensions."""

    dtype: np.dtype
    ndim: int


def encode_float(x: float) -> float | str:
    """``x`` as a snapshot holds it: the non-finite values as strings (JSON has none)."""
    return x if math.isfinite(x) else ("nan" if x != x else ("inf" if x > 0 else "-inf"))


def decode_float(v, where: str) -> float:
    """A float field read back (see :func:`encode_float`)."""
    if isinstance(v, str) and v in _NON_FINITE:
        return _NON_FINITE[v]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise StateError(f"{where} must be a number, not {type(v).__name__}")


def take(obj, schema: Mapping[str, object]) -> dict:
    """The fields of ``schema`` read off ``obj`` as a plain tree."""
    out = {}
    for name, kind in schema.items():
        v = getattr(obj, name)
        if kind is float or kind == (float, type(None)):
            v = None if v is None else encode_float(float(v))
        elif isinstance(v, np.generic):
            v = v.item()
        out[name] = v
    return out


def check(state, schema: Mapping[str, object], where: str, arrays: Sequence[np.ndarray] = ()) -> dict:
    """``state`` checked against ``schema``: a dict with every field, each of its kind (floats decoded,
    arrays looked up in ``arrays`` where the tree holds ``{"$nd": index}``, see :mod:`infogap.stream.snapshots`)."""
    if not isinstance(state, Mapping):
        raise StateError(f"{where}: expected an object, not {type(state).__name__}")
    missing = [k for k in schema if k not in state]
    if missing:
        raise StateError(f"{where}: fields {missing} missing (written by another version of infogap?)")
    out = {}
    for name, kind in schema.items():
        out[name] = _checked(state[name], kind, f"{where}: field {name!r}", arrays)
    return out


def put(obj, state, schema: Mapping[str, object], where: str, arrays: Sequence[np.ndarray] = ()):
    """Set the fields of ``schema`` on ``obj`` from ``state`` (checked); returns ``obj``."""
    for name, v in check(state, schema, where, arrays).items():
        setattr(obj, name, v)
    return obj


def array(v, arrays: Sequence[np.ndarray]):
    """``v`` itself, or the array it refers to when it is ``{"$nd": index}``."""
    if type(v) is dict and len(v) == 1 and type(v.get("$nd")) is int:
        k = v["$nd"]
        if not 0 <= k < len(arrays):
            raise StateError(f"array {k} of {len(arrays)} does not exist")
        return arrays[k]
    return v


def _checked(v, kind, where: str, arrays: Sequence[np.ndarray] = ()):
    if isinstance(kind, tuple):  # one of several kinds, e.g. (float, NoneType)
        if v is None and type(None) in kind:
            return None
        kind = kind[0]
    if isinstance(kind, Array) or isinstance(kind, np.dtype) or (isinstance(kind, type)
                                                                 and issubclass(kind, np.generic)):
        dtype, ndim = (kind.dtype, kind.ndim) if isinstance(kind, Array) else (np.dtype(kind), None)
        v = array(v, arrays)
        if not isinstance(v, np.ndarray) or v.dtype != dtype:
            got = f"an array of {v.dtype}" if isinstance(v, np.ndarray) else type(v).__name__
            raise StateError(f"{where} must be an array of {dtype}, not {got}")
        if ndim is not None and v.ndim != ndim:
            raise StateError(f"{where} must have {ndim} dimensions, not {v.ndim}")
        return v
    if kind is float:
        return decode_float(v, where)
    if kind is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise StateError(f"{where} must be an integer, not {type(v).__name__}")
        return v
    if not isinstance(v, kind):
        raise StateError(f"{where} must be {kind.__name__}, not {type(v).__name__}")
    return v
