"""How a wire message declares its fields once, and the codec, checks and byte counts derived from it.

A message is a frozen dataclass whose every field is declared with one of the helpers below, which
record on the field what it is on the wire::

    sample_ids: np.ndarray = integers(np.int64)                    # [n]
    input_ids: np.ndarray = integers(np.int32, per_token_ndim=2)   # [n, L]
    soft: SoftLabels | None = nested(SoftLabels, optional=True)

From that declaration alone come ``write_body``/``read_body`` (the msgpack map of a message),
``check_fields`` (the type and dtype of every field, run first by each message's ``__post_init__``,
which then checks the shapes that tie fields together), ``arrays`` and ``nbytes_by_part`` (payload
bytes), and the chunking in ``storage/chunking.py``; a field that is not declared is refused the
first time its class is used. Rules the declaration relies on:

- Every array, tuple of strings and layer map holds one entry per sample of the batch along its
  first axis, so a batch splits into chunks of rows by slicing that axis. Text, counts and numbers
  describe the batch as a whole and are the same in every chunk.
- ``per_token_ndim``: an array of that many axes runs along the input's tokens on its second axis
  ([n, L, ...]), so a single sample can also split into windows of tokens. (Soft labels come per
  sample [n, C] or per token [n, L, C]: only the second form runs along the tokens.)
- ``optional`` fields may be None and travel as nil; every declared key is on the wire, except the
  fields of a ``variant`` (SoftLabels: "full" or "topk"), which travel only in that variant,
  named under the key ``kind``, and fields declared ``added`` (optional fields that later builds
  added to a schema version): those are left out when None (an added tuple of messages: when empty)
  and read as None (or an empty tuple) when absent, so a
  payload written before them still decodes and today's encoder writes it byte for byte.
- Layer maps travel as [layer, array] pairs: integer map keys would force readers to turn off
  msgpack's strict_map_key hash-flooding guard.

Arrays travel as ``{dtype, shape, raw}`` with little-endian raw bytes and are decoded with
``np.frombuffer``: a decoded array is a read-only view of the unpacked message, not a copy.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

# Only plain numeric dtypes may cross the wire: an object dtype would be an
# invitation to smuggle Python objects, and np.frombuffer refuses it anyway.
_WIRE_DTYPES = frozenset(
    {
        "bool",
        "int8", "int16", "int32", "int64",
        "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64",
    }
)  # fmt: skip

HALF = (np.float16,)
SINGLE = (np.float32,)
HALF_OR_SINGLE = (np.float16, np.float32)

VARIANT_KEY = "kind"
# No declared field has more axes (attention maps: [n, heads, L, L]); numpy refuses more than 64.
_MAX_ARRAY_AXES = 8
_MAX_AXIS_LENGTH = 2**31 - 1
_MAX_ELEMENTS_BESIDE_EMPTY = 2**40


class WireError(ValueError):
    """The peer sent a message this build cannot accept; dead-letter it."""


class WireVersionError(WireError):
    """The message was written by a newer schema version than this build reads."""


# --------------------------------------------------------------------------- #
# The declaration
# --------------------------------------------------------------------------- #


class Kind(enum.Enum):
    TEXT = "text"
    COUNT = "count"  # a non-negative integer
    NUMBER = "number"  # a non-negative float
    TEXTS = "texts"  # one string per sample
    INTEGERS = "integers"  # an integer array
    FLOATS = "floats"  # a floating-point array
    LAYERS = "layers"  # {teacher layer index: float array}
    MESSAGE = "message"
    MESSAGES = "messages"  # a tuple of messages of one class


# The same in every chunk of a batch; everything else holds one entry per sample.
SHARED_KINDS = frozenset({Kind.TEXT, Kind.COUNT, Kind.NUMBER})
_WIRE_TYPES: dict[Kind, type | tuple[type, ...]] = {
    Kind.TEXT: str, Kind.COUNT: int, Kind.NUMBER: (int, float), Kind.TEXTS: list, Kind.INTEGERS: dict,
    Kind.FLOATS: dict, Kind.LAYERS: list, Kind.MESSAGE: dict, Kind.MESSAGES: list,
}


@dataclass(frozen=True)
class Spec:
    """What one field is on the wire (see the module docstring)."""

    kind: Kind
    optional: bool = False
    key: str | None = None  # the wire key, when it is not the attribute's name
    dtype: np.dtype | None = None  # integer arrays: the dtype every value is cast to, refusing values that wrap
    floats: tuple[type, ...] = ()  # float arrays: dtypes kept as they are; any other is cast to the last one
    allow_bool: bool = False  # integer arrays that may be given as booleans (masks)
    per_token_ndim: int | None = None  # arrays of this many axes run along the input's tokens on axis 1
    message: type | None = None  # nested messages: their class
    variant: str | None = None
    part: str | None = None  # the part of ``nbytes_by_part`` this field counts in, when not its own name
    added: bool = False  # optional, added within the schema version: left off the wire when None

    def runs_along_tokens(self, array: np.ndarray) -> bool:
        return self.per_token_ndim is not None and array.ndim == self.per_token_ndim


def _declare(spec: Spec, **default: Any) -> Any:
    return dataclasses.field(metadata={"wire": spec}, **default)


def _optional_default(optional: bool) -> dict[str, Any]:
    return {"default": None} if optional else {}


def text(*, optional: bool = False) -> Any:
    return _declare(Spec(Kind.TEXT, optional=optional), **_optional_default(optional))


def count() -> Any:
    return _declare(Spec(Kind.COUNT))


def number(*, default: float) -> Any:
    return _declare(Spec(Kind.NUMBER), default=default)


def texts() -> Any:
    return _declare(Spec(Kind.TEXTS))


def integers(dtype: type, *, optional: bool = False, allow_bool: bool = False, per_token_ndim: int | None = None,
             key: str | None = None, variant: str | None = None, added: bool = False) -> Any:
    optional = optional or added
    spec = Spec(Kind.INTEGERS, optional=optional, dtype=np.dtype(dtype), allow_bool=allow_bool,
                per_token_ndim=per_token_ndim, key=key, variant=variant, added=added)
    return _declare(spec, **_optional_default(optional))


def floats(allowed: tuple[type, ...], *, optional: bool = False, per_token_ndim: int | None = None,
           key: str | None = None, variant: str | None = None, added: bool = False) -> Any:
    optional = optional or added
    spec = Spec(Kind.FLOATS, optional=optional, floats=allowed, per_token_ndim=per_token_ndim, key=key,
                variant=variant, added=added)
    return _declare(spec, **_optional_default(optional))


def layers(allowed: tuple[type, ...], *, per_token_ndim: int | None = None) -> Any:
    return _declare(Spec(Kind.LAYERS, floats=allowed, per_token_ndim=per_token_ndim), default_factory=dict)


def nested(message: type, *, optional: bool = False) -> Any:
    return _declare(Spec(Kind.MESSAGE, optional=optional, message=message), **_optional_default(optional))


def nested_tuple(message: type, *, part: str | None = None, added: bool = False) -> Any:
    return _declare(Spec(Kind.MESSAGES, message=message, part=part, added=added), default=())


@functools.cache
def declared_fields(cls: type) -> tuple[tuple[str, Spec], ...]:
    """(attribute name, spec) of every field of a message class, in declaration order."""
    declared = []
    for field in dataclasses.fields(cls):
        spec = field.metadata.get("wire")
        if spec is None:
            raise TypeError(f"{cls.__name__}.{field.name} has no wire declaration: declare it with one of "
                            "text, count, number, texts, integers, floats, layers, nested, nested_tuple "
                            "(storage/schema.py)")
        declared.append((field.name, spec))
    return tuple(declared)


# --------------------------------------------------------------------------- #
# Checking a message's fields: types and dtypes (shapes are each class's own)
# --------------------------------------------------------------------------- #


def check_fields(message: Any) -> None:
    """Check every declared field's type and cast its arrays to their wire dtypes, in place."""
    owner = type(message).__name__
    for name, spec in declared_fields(type(message)):
        value = getattr(message, name)
        if value is None and spec.optional:
            continue
        # Frozen dataclasses may still normalise their own fields during __post_init__.
        object.__setattr__(message, name, _checked(value, spec, f"{owner}.{name}"))


def _checked(value: Any, spec: Spec, where: str) -> Any:
    kind = spec.kind
    if kind is Kind.TEXT:
        return require_str(value, where)
    if kind is Kind.COUNT:
        return require_count(value, where)
    if kind is Kind.NUMBER:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not value >= 0:
            raise WireError(f"{where}: expected a non-negative number, got {value!r}")
        return float(value)
    if kind is Kind.TEXTS:
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise WireError(f"{where}: expected one string per sample (a language code)")
        return tuple(value)
    if kind is Kind.INTEGERS:
        return as_integer_array(value, where, spec.dtype, allow_bool=spec.allow_bool)
    if kind is Kind.FLOATS:
        return as_float_array(value, where, spec.floats)
    if kind is Kind.LAYERS:
        return _checked_layers(value, spec, where)
    if kind is Kind.MESSAGE:
        _require_instance(value, spec, where)
        return value
    items = tuple(value)  # Kind.MESSAGES
    for position, item in enumerate(items):
        _require_instance(item, spec, f"{where}[{position}]")
    return items


def _require_instance(value: Any, spec: Spec, where: str) -> None:
    if not isinstance(value, spec.message):
        wanted = spec.message.__name__ + (" or None" if spec.optional else "")
        raise WireError(f"{where}: expected a {wanted}, got {type(value).__name__}")


def _checked_layers(value: Any, spec: Spec, where: str) -> dict[int, np.ndarray]:
    if not isinstance(value, Mapping):
        raise WireError(f"{where}: expected a mapping of teacher layer index to array, got {type(value).__name__}")
    checked: dict[int, np.ndarray] = {}
    for layer, array in value.items():
        name = f"{where}[{layer!r}]"
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
            raise WireError(f"{name}: keys must be non-negative teacher layer indices, not negative offsets")
        checked[int(layer)] = as_float_array(array, name, spec.floats)
    return dict(sorted(checked.items()))


def as_integer_array(value: Any, where: str, target: np.dtype, *, allow_bool: bool = False) -> np.ndarray:
    """Cast an integer array to the canonical dtype, refusing values that would wrap."""
    array = np.asarray(value)
    kind_ok = np.issubdtype(array.dtype, np.integer) or (allow_bool and array.dtype == np.bool_)
    if not kind_ok:
        raise WireError(f"{where}: expected an integer array, got dtype {array.dtype}")
    target = np.dtype(target)
    if array.dtype == target:
        return array
    if array.size and array.dtype != np.bool_ and not np.can_cast(array.dtype, target, casting="safe"):
        limits = np.iinfo(target)
        low, high = int(array.min()), int(array.max())
        if low < limits.min or high > limits.max:
            raise WireError(f"{where}: values span [{low}, {high}], which does not fit {target.name}")
    return array.astype(target)


def as_float_array(value: Any, where: str, allowed: tuple[type, ...]) -> np.ndarray:
    """Keep an allowed float dtype as is; cast any other float dtype to the last allowed one."""
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise WireError(f"{where}: expected a floating-point array, got dtype {array.dtype}")
    if array.dtype.type in allowed:
        return array
    return array.astype(allowed[-1])


def require_shape(array: np.ndarray, where: str, expected: tuple[Any, ...], meaning: str) -> None:
    """Check ``array.shape`` against ``expected``, where ``None`` matches any length."""
    matches = array.ndim == len(expected) and all(
        want is None or have == want for have, want in zip(array.shape, expected)
    )
    if not matches:
        pretty = ", ".join("?" if want is None else str(want) for want in expected)
        raise WireError(f"{where}: expected shape [{pretty}] ({meaning}), got {list(array.shape)}")


def require_str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise WireError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def require_count(value: Any, where: str) -> int:
    # bool is an int subclass; True as an epoch number is always a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise WireError(f"{where}: expected a non-negative integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- #
# Payload bytes
# --------------------------------------------------------------------------- #


def leaves(message: Any) -> Iterator[tuple[Spec, Any]]:
    """(spec, value) of every per-sample value a message carries, its nested messages' included: each
    array (a layer map's one by one) and each tuple of strings."""
    for name, spec in declared_fields(type(message)):
        yield from _field_leaves(getattr(message, name), spec)


def _field_leaves(value: Any, spec: Spec) -> Iterator[tuple[Spec, Any]]:
    if value is None or spec.kind in SHARED_KINDS:
        return
    if spec.kind is Kind.LAYERS:
        yield from ((spec, array) for array in value.values())
    elif spec.kind is Kind.MESSAGE:
        yield from leaves(value)
    elif spec.kind is Kind.MESSAGES:
        for item in value:
            yield from leaves(item)
    else:
        yield spec, value


def arrays(message: Any) -> Iterator[np.ndarray]:
    """Every array a message carries, its nested messages' included."""
    return (value for spec, value in leaves(message) if spec.kind is not Kind.TEXTS)


def nbytes_by_part(message: Any) -> dict[str, int]:
    """Payload bytes of a message's arrays by top-level field (or the ``part`` it declares); every
    field that can carry arrays has its key, 0 when it carries none."""
    parts: dict[str, int] = {}
    for name, spec in declared_fields(type(message)):
        if spec.kind in SHARED_KINDS or spec.kind is Kind.TEXTS:
            continue
        part = spec.part or name
        field_leaves = _field_leaves(getattr(message, name), spec)
        nbytes = sum(value.nbytes for leaf, value in field_leaves if leaf.kind is not Kind.TEXTS)
        parts[part] = parts.get(part, 0) + nbytes
    return parts


# --------------------------------------------------------------------------- #
# Encoding
# --------------------------------------------------------------------------- #


class ArrayWriter:
    """How arrays are written into a message's map. This one (schema version 1) puts each array's bytes
    in the map itself; ``storage/frame.py`` writes version 2, with the bytes after the map."""

    def array(self, array: np.ndarray) -> dict[str, Any]:
        return pack_array(array)

    def features(self, array: np.ndarray) -> dict[str, Any]:
        """An array of a layer map (hidden states, attention maps)."""
        return self.array(array)

    def packed_variant(self, message: Any, variant: str) -> tuple[str, dict[str, Any]] | None:
        """(wire variant, map) of a message variant this writer packs in a form of its own, or None."""
        return None


class ArrayReader:
    """How arrays are read from a message's map: the counterpart of ``ArrayWriter``."""

    def array(self, packed: Any, where: str) -> np.ndarray:
        return unpack_array(packed, where)

    def packed_variant(self, cls: type, variant: str, body: dict, where: str) -> tuple[str, dict[str, Any]] | None:
        """(declared variant, field values) of a packed variant's map, or None if this reader knows none."""
        return None


INLINE_WRITER = ArrayWriter()
INLINE_READER = ArrayReader()


def write_body(message: Any, writer: ArrayWriter = INLINE_WRITER) -> dict[str, Any]:
    """The msgpack map of a message: its declared fields under their wire keys."""
    declared = declared_fields(type(message))
    body: dict[str, Any] = {}
    variant = _variant_of(message, declared)
    packed = writer.packed_variant(message, variant) if variant is not None else None
    if packed is not None:
        variant, body = packed[0], dict(packed[1])
    if variant is not None:
        body[VARIANT_KEY] = variant
    for name, spec in declared:
        value = getattr(message, name)
        if spec.variant is not None and (packed is not None or spec.variant != variant):
            continue
        if not (spec.added and (value is None or (spec.kind is Kind.MESSAGES and len(value) == 0))):
            body[spec.key or name] = _write_value(value, spec, writer)
    return body


def _variant_of(message: Any, declared: tuple[tuple[str, Spec], ...]) -> str | None:
    used = {spec.variant for name, spec in declared if spec.variant and getattr(message, name) is not None}
    if len(used) > 1:  # each class's own checks allow one variant at a time
        raise AssertionError(f"{type(message).__name__} holds fields of variants {sorted(used)} at once")
    return next(iter(used), None)


def _write_value(value: Any, spec: Spec, writer: ArrayWriter) -> Any:
    if value is None or spec.kind in SHARED_KINDS:
        return value
    if spec.kind is Kind.TEXTS:
        return list(value)
    if spec.kind is Kind.LAYERS:
        return [[layer, writer.features(array)] for layer, array in value.items()]
    if spec.kind is Kind.MESSAGE:
        return write_body(value, writer)
    if spec.kind is Kind.MESSAGES:
        return [write_body(item, writer) for item in value]
    return writer.array(value)


@functools.cache
def little_endian(dtype: np.dtype) -> tuple[np.dtype, str]:
    """(the little-endian form of a dtype, its wire name); cached: numpy's dtype names cost microseconds,
    and a message has a dozen arrays."""
    little = dtype.newbyteorder("<")
    return little, little.name


@functools.cache
def _wire_dtype(name: str) -> np.dtype:
    return np.dtype(name).newbyteorder("<")


def wire_array(array: np.ndarray) -> tuple[np.ndarray, str]:
    """The array as it travels (little-endian, C-contiguous; on x86/ARM hosts usually itself) and its dtype's
    wire name."""
    little, name = little_endian(array.dtype)
    if array.dtype != little:
        array = array.astype(little)
    return np.ascontiguousarray(array), name


def pack_array(array: np.ndarray) -> dict[str, Any]:
    contiguous, name = wire_array(array)
    # msgpack packs any C-contiguous buffer directly, avoiding a tobytes() copy.
    return {
        "dtype": name,
        "shape": list(contiguous.shape),
        "raw": memoryview(contiguous),
    }


# --------------------------------------------------------------------------- #
# Decoding
# --------------------------------------------------------------------------- #


def read_body(cls: type, body: dict, where: str, reader: ArrayReader = INLINE_READER) -> Any:
    """The message of class ``cls`` in a msgpack map; keys it does not declare are ignored."""
    declared = declared_fields(cls)
    variants = sorted({spec.variant for _, spec in declared if spec.variant})
    variant, values = None, {}
    if variants:
        variant = get(body, VARIANT_KEY, str, where)
        packed = None if variant in variants else reader.packed_variant(cls, variant, body, where)
        if packed is not None:
            variant, values = packed
        elif variant not in variants:
            raise WireError(f"{where}.{VARIANT_KEY}: unknown {cls.__name__} kind {variant!r} "
                            f"(expected {' or '.join(repr(known) for known in variants)})")
    for name, spec in declared:
        if spec.variant is None or (spec.variant == variant and name not in values):
            values[name] = _read_value(body, spec.key or name, spec, where, reader)
    return cls(**values)


def _read_value(body: dict, key: str, spec: Spec, where: str, reader: ArrayReader) -> Any:
    kind = spec.kind
    if spec.added and key not in body:
        return () if kind is Kind.MESSAGES else None
    # Only nested tuples may be nil without being optional: nil reads as none.
    value = get(body, key, _WIRE_TYPES[kind], where, optional=spec.optional or kind is Kind.MESSAGES)
    if value is None:
        return () if kind is Kind.MESSAGES else None
    if kind in SHARED_KINDS:
        return value
    if kind is Kind.TEXTS:
        return tuple(value)
    if kind is Kind.LAYERS:
        return _read_layers(value, f"{where}.{key}", reader)
    if kind is Kind.MESSAGE:
        return read_body(spec.message, value, f"{where}.{key}", reader)
    if kind is Kind.MESSAGES:
        return tuple(_read_item(spec.message, item, f"{where}.{key}[{position}]", reader)
                     for position, item in enumerate(value))
    return reader.array(value, f"{where}.{key}")


def _read_item(cls: type, item: Any, where: str, reader: ArrayReader) -> Any:
    if not isinstance(item, dict):
        raise WireError(f"{where}: expected a map, got {type(item).__name__}")
    return read_body(cls, item, where, reader)


def _read_layers(pairs: list, where: str, reader: ArrayReader) -> dict[int, np.ndarray]:
    layers: dict[int, np.ndarray] = {}
    for position, pair in enumerate(pairs):
        name = f"{where}[{position}]"
        is_pair = isinstance(pair, list) and len(pair) == 2
        if not (is_pair and isinstance(pair[0], int) and not isinstance(pair[0], bool)):
            raise WireError(f"{name}: expected a [layer index, array] pair")
        if pair[0] in layers:
            raise WireError(f"{name}: layer {pair[0]} appears twice")
        layers[pair[0]] = reader.array(pair[1], name)
    return layers


_MISSING = object()


def get(body: dict, key: str, types: type | tuple[type, ...], where: str, *, optional: bool = False) -> Any:
    value = body.get(key, _MISSING)
    if value is _MISSING:
        raise WireError(f"{where}.{key}: missing")
    if value is None and optional:
        return None
    allowed = types if isinstance(types, tuple) else (types,)
    # msgpack yields bool for true/false; keep it out of integer fields.
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise WireError(f"{where}.{key}: expected {names}, got {type(value).__name__}")
    return value


def array_layout(packed: Any, where: str) -> tuple[np.dtype, list[int], int]:
    """(little-endian dtype, shape, byte count) of an array map; the caller checks the bytes, then ``check_axes``."""
    if not isinstance(packed, dict):
        raise WireError(f"{where}: expected an array map, got {type(packed).__name__}")
    dtype_name = get(packed, "dtype", str, where)
    shape = get(packed, "shape", list, where)
    if dtype_name not in _WIRE_DTYPES:
        raise WireError(f"{where}.dtype: {dtype_name!r} is not a wire dtype (allowed: {sorted(_WIRE_DTYPES)})")
    if len(shape) > _MAX_ARRAY_AXES:  # before anything walks the list: a header may carry millions of axes
        raise WireError(f"{where}.shape: {len(shape)} axes, more than the {_MAX_ARRAY_AXES} any message field has")
    if not all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape):
        raise WireError(f"{where}.shape: expected non-negative integers, got {shape!r}")
    dtype = _wire_dtype(dtype_name)
    # Python integers: np.prod in int64 wraps (a shape of [2**32, 2**32] multiplies to 0), so a tiny
    # payload could claim an empty array of an absurd shape and fail later, outside the wire's errors.
    return dtype, shape, math.prod(shape) * dtype.itemsize


def check_axes(shape: list[int], where: str) -> None:
    """Refuse shapes numpy would refuse, once the bytes are known to match them."""
    if len(shape) > _MAX_ARRAY_AXES:
        raise WireError(f"{where}.shape: {len(shape)} axes, more than the {_MAX_ARRAY_AXES} any message field has")
    if max(shape, default=0) > _MAX_AXIS_LENGTH:
        # Beside an axis of length 0 the bytes match whatever the others claim; numpy refuses such shapes.
        raise WireError(f"{where}.shape: {shape} has an axis longer than {_MAX_AXIS_LENGTH:,}")
    if math.prod(max(dim, 1) for dim in shape) > _MAX_ELEMENTS_BESIDE_EMPTY:
        # numpy sizes an empty array as if its zero axes were 1, and refuses it when that is too big.
        raise WireError(f"{where}.shape: {shape} is too large an array, even empty")


def unpack_array(packed: Any, where: str) -> np.ndarray:
    """An array whose bytes travel in its map (``raw``), as version 1 writes it."""
    dtype, shape, expected_bytes = array_layout(packed, where)
    raw = get(packed, "raw", bytes, where)
    if len(raw) != expected_bytes:
        raise WireError(
            f"{where}.raw: {len(raw)} bytes, but shape {shape} of {dtype.name} needs {expected_bytes} (truncated?)"
        )
    check_axes(shape, where)
    # A read-only view on the unpacked bytes: no copy of the payload.
    return np.frombuffer(raw, dtype=dtype).reshape(shape)
