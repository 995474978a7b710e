"""Wire schema version 2: a small msgpack map followed by the arrays' bytes, read in place.

Version 1 puts every array's bytes inside the msgpack map, so the sender copies them into
msgpack's buffer (and out again) and the receiver copies them out of the message. Version 2
frames a message as::

    b"PDW2" | header length (uint32, little-endian) | header (msgpack map) | padding | arrays

The header is the same map as in version 1 (``storage/schema.py`` writes both), except that an
array is ``{dtype, shape, at}``: its bytes start ``at`` bytes into the array section, each on a
16-byte boundary. The encoder sizes the frame first and writes every array once into one buffer;
the decoder unpacks only the header and returns arrays that are views into the received bytes
(``np.frombuffer``), so decoding costs the same for a 4 MB message as for a 4 kB one.

What a ``WireCodec`` asks for travels in forms of its own (``storage/knowledge_codec.py``): top-k
soft labels as the ``topk_packed`` variant of ``SoftLabels``, int8 features as an array map with
``int8`` and ``scale`` arrays instead of ``at``. A version-2 reader takes both forms and plain
arrays alike, whatever the sender's codec was.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from polydistill.storage.knowledge_codec import (
    dequantise_rows,
    pack_topk,
    quantise_rows,
    unpack_topk,
)
from polydistill.storage.schema import (
    ArrayReader,
    ArrayWriter,
    WireError,
    array_layout,
    check_axes,
    declared_fields,
    get,
    little_endian,
    wire_array,
    write_body,
)
from polydistill.storage.wire_codec import WireCodec

MAGIC = b"PDW2"
_PREFIX = len(MAGIC) + 4
ALIGNMENT = 16

# Unpacking a top-k entry builds about this many bytes of arrays along the way (levels, log-probabilities
# in float64, ids, values).
TOPK_REBUILT_BYTES_PER_ENTRY = 48

TOPK_VARIANT = "topk"
PACKED_TOPK_VARIANT = "topk_packed"
_TOPK_FIELDS = ("topk_values", "topk_indices", "topk_logsumexp")


def is_frame(data: bytes) -> bool:
    return bytes(data[: len(MAGIC)]) == MAGIC


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


class FrameWriter(ArrayWriter):
    """Places arrays in the frame's array section as the header is written."""

    def __init__(self, codec: WireCodec):
        self.codec = codec
        self.segments: list[tuple[int, np.ndarray]] = []
        self.size = 0

    def array(self, array: np.ndarray) -> dict[str, Any]:
        little, name = wire_array(array)
        at = _aligned(self.size)
        self.segments.append((at, little))
        self.size = at + little.nbytes
        return {"dtype": name, "shape": list(little.shape), "at": at}

    def features(self, array: np.ndarray) -> dict[str, Any]:
        # Rows of 4 values or fewer would take more as int8 plus a float32 scale than as they are.
        if self.codec.feature_bits == 16 or array.ndim == 0 or array.shape[-1] <= 4:
            return self.array(array)
        values, scale = quantise_rows(array)
        return {"dtype": little_endian(array.dtype)[1], "shape": list(array.shape), "int8": self.array(values),
                "scale": self.array(scale)}

    def packed_variant(self, message: Any, variant: str) -> tuple[str, dict[str, Any]] | None:
        if variant != TOPK_VARIANT or not self.codec.packs_topk:
            return None
        values, indices, logsumexp = (getattr(message, name) for name in _TOPK_FIELDS)
        packed = pack_topk(values, indices, logsumexp, self.codec.value_bits)
        return PACKED_TOPK_VARIANT, {name: self.array(value) if isinstance(value, np.ndarray) else value
                                     for name, value in packed.items()}

    def frame(self, header: dict[str, Any]) -> bytearray:
        """The whole message: ``header`` (written by ``write_body`` through this writer) and the arrays."""
        head = msgpack.packb(header, use_bin_type=True)
        start = _aligned(_PREFIX + len(head))
        buffer = bytearray(start + self.size)
        buffer[: len(MAGIC)] = MAGIC
        buffer[len(MAGIC): _PREFIX] = len(head).to_bytes(4, "little")
        buffer[_PREFIX: _PREFIX + len(head)] = head
        view = np.frombuffer(buffer, dtype=np.uint8)
        for at, array in self.segments:
            if array.nbytes:
                view[start + at: start + at + array.nbytes] = array.reshape(-1).view(np.uint8)
        return buffer


def encode_frame(top: dict[str, Any], message: Any, codec: WireCodec) -> bytearray:
    writer = FrameWriter(codec)
    body = write_body(message, writer)
    return writer.frame({**top, **body})


# What a frame's packed parts may be rebuilt into, at most: this many times its array bytes (8-bit top-k
# rebuilds about 40 bytes of arrays per 2.5 bytes sent), and never less than REBUILT_FLOOR. Offsets may
# point several arrays at the same bytes (views, free), so without a budget a small frame of int8
# features could ask for any amount of memory.
REBUILT_PER_BYTE = 24
REBUILT_FLOOR = 64 * 1024 * 1024


class FrameReader(ArrayReader):
    """Reads arrays as views into a frame's array section, and rebuilds packed ones within a budget."""

    def __init__(self, arrays: memoryview):
        self.arrays = arrays
        self.rebuild_budget = max(REBUILT_FLOOR, REBUILT_PER_BYTE * len(arrays))

    def _rebuild(self, nbytes: int, where: str) -> None:
        self.rebuild_budget -= nbytes
        if self.rebuild_budget < 0:
            raise WireError(f"{where}: rebuilding the packed arrays would take more than {REBUILT_PER_BYTE} times the "
                            f"message's bytes (a packed array's offsets repeat, or its shape is not what was sent)")

    def array(self, packed: Any, where: str) -> np.ndarray:
        dtype, shape, nbytes = array_layout(packed, where)
        if "int8" in packed:
            check_axes(shape, where)
            self._rebuild(3 * nbytes, where)  # the output and a float32 copy on the way
            return self._int8(packed, dtype, shape, where)
        return self._plain(packed, dtype, shape, nbytes, where)

    def _plain(self, packed: dict, dtype: np.dtype, shape: list[int], nbytes: int, where: str) -> np.ndarray:
        at = get(packed, "at", int, where)
        if at < 0 or at + nbytes > len(self.arrays):
            raise WireError(f"{where}.at: {nbytes} bytes at {at} run past the message's "
                            f"{len(self.arrays)} bytes of arrays (truncated?)")
        check_axes(shape, where)
        if nbytes == 0:
            return np.zeros(shape, dtype)
        return np.frombuffer(self.arrays, dtype=dtype, count=nbytes // dtype.itemsize, offset=at).reshape(shape)

    def _int8(self, packed: dict, dtype: np.dtype, shape: list[int], where: str) -> np.ndarray:
        values = self._inner(get(packed, "int8", dict, where), f"{where}.int8")
        scale = self._inner(get(packed, "scale", dict, where), f"{where}.scale")
        if values.dtype != np.int8 or list(values.shape) != shape:
            raise WireError(f"{where}.int8: expected int8 of shape {shape}, got {values.dtype} {list(values.shape)}")
        if scale.dtype != np.float32 or list(scale.shape) != shape[:-1]:
            raise WireError(f"{where}.scale: expected float32 of shape {shape[:-1]}, got "
                            f"{scale.dtype} {list(scale.shape)}")
        return dequantise_rows(values, scale, dtype)

    def _inner(self, packed: dict, where: str) -> np.ndarray:
        """A plain array inside a packed one: never packed itself."""
        dtype, shape, nbytes = array_layout(packed, where)
        if "int8" in packed:
            raise WireError(f"{where}: the arrays of a packed array travel as they are")
        return self._plain(packed, dtype, shape, nbytes, where)

    def packed_variant(self, cls: type, variant: str, body: dict, where: str) -> tuple[str, dict[str, Any]] | None:
        if variant != PACKED_TOPK_VARIANT or not set(_TOPK_FIELDS) <= {name for name, _ in declared_fields(cls)}:
            return None
        arrays = {name: self._inner(get(body, name, dict, where), f"{where}.{name}")
                  for name in ("indices", "levels", "rest")}
        shape = get(body, "shape", list, where)
        if len(shape) in (2, 3) and all(isinstance(dim, int) for dim in shape):  # else unpack_topk says what is wrong
            self._rebuild(TOPK_REBUILT_BYTES_PER_ENTRY * math.prod(max(dim, 1) for dim in shape), where)
        rebuilt = unpack_topk(shape, get(body, "value_bits", int, where),
                              get(body, "index_bits", int, where), **arrays, where=where)
        return TOPK_VARIANT, dict(zip(_TOPK_FIELDS, rebuilt))


def split_frame(data: bytes) -> tuple[Any, FrameReader]:
    """(header, reader of the arrays) of a version-2 message; WireError when it is not one."""
    if len(data) < _PREFIX:
        raise WireError(f"a {len(data)}-byte message is shorter than a version-2 frame's prefix")
    head_length = int.from_bytes(bytes(data[len(MAGIC): _PREFIX]), "little")
    start = _aligned(_PREFIX + head_length)
    if start > len(data):
        raise WireError(f"the header of {head_length:,} bytes runs past the message's {len(data):,} bytes")
    try:
        header = msgpack.unpackb(memoryview(data)[_PREFIX: _PREFIX + head_length], raw=False, use_list=True,
                                 strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise WireError(f"the header is not msgpack ({type(exc).__name__}: {exc})") from exc
    return header, FrameReader(memoryview(data)[start:])
