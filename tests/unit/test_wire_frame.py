"""Wire schema version 2's framing: the same messages as version 1, arrays read in place, and a frame
that lies about itself is dead-lettered, not a crash."""

import time

import msgpack
import numpy as np
import pytest

from polydistill.storage import frame, schema, wire
from polydistill.storage.knowledge_codec import WireCodec
from tests.unit.test_wire_compat import every_knowledge_field, every_work_field


def reframe(header: dict, reader: frame.FrameReader) -> bytes:
    """A version-2 frame of an edited header over the same array bytes."""
    head = msgpack.packb(header, use_bin_type=True)
    prefix = frame.MAGIC + len(head).to_bytes(4, "little") + head
    return prefix + b"\0" * (frame._aligned(len(prefix)) - len(prefix)) + bytes(reader.arrays)


def arrays_of(message) -> dict:
    return {str(i): array for i, array in enumerate(schema.arrays(message))}


@pytest.mark.parametrize("build", [every_work_field, every_knowledge_field])
def test_a_version_2_frame_carries_every_field_exactly_with_float32_values(build):
    message = build()
    data = wire.encode(message, WireCodec(value_bits=32))
    assert frame.is_frame(data)
    back = wire.decode(bytes(data))
    v1 = wire.decode(wire.encode(message))
    for (name, want), (_, got) in zip(arrays_of(v1).items(), arrays_of(back).items()):
        assert got.dtype == want.dtype and np.array_equal(got, want), name


def test_decoded_arrays_are_views_into_the_received_bytes():
    hidden = np.random.default_rng(0).normal(size=(8, 64, 384)).astype(np.float16)  # ~400 kB
    knowledge = wire.Knowledge(work=every_work_field().__class__(
        job_id="j", epoch=0, batch_id=0, sample_ids=np.arange(8), languages=("eng",) * 8,
        input_ids=np.zeros((8, 64), np.int32), attention_mask=np.ones((8, 64), np.uint8)),
        teacher_id="t", hidden_states={4: hidden})
    payload = bytes(wire.encode(knowledge, WireCodec()))
    back = wire.decode(payload)
    received = np.frombuffer(payload, np.uint8)
    assert np.shares_memory(back.hidden_states[4], received) and np.shares_memory(back.work.input_ids, received)
    assert np.array_equal(back.hidden_states[4], hidden)
    # Every array starts on a 16-byte boundary of the frame.
    assert back.hidden_states[4].ctypes.data % 16 == received.ctypes.data % 16


def test_int8_features_travel_in_half_the_bytes():
    knowledge = every_knowledge_field()
    wide = wire.Knowledge(work=knowledge.work, teacher_id="t",
                          hidden_states={1: np.random.default_rng(1).normal(size=(2, 3, 256)).astype(np.float16)})
    half = len(wire.encode(wide, WireCodec(feature_bits=16)))
    quarter = len(wire.encode(wide, WireCodec(feature_bits=8)))
    assert half - quarter >= 2 * 3 * 256 - 2 * 3 * 4 - 64
    back = wire.decode(bytes(wire.encode(wide, WireCodec(feature_bits=8))))
    assert back.hidden_states[1].dtype == np.float16
    assert np.abs(back.hidden_states[1].astype(np.float32) - wide.hidden_states[1]).max() < 0.05


def _frame_with(header_change, payload_cut: int = 0) -> bytes:
    data = bytes(wire.encode(every_work_field(), WireCodec()))
    header, reader = frame.split_frame(data)
    header_change(header)
    rebuilt = reframe(header, reader)
    return rebuilt[: len(rebuilt) - payload_cut]


@pytest.mark.parametrize("change, cut, error", [
    (lambda h: None, 8, "run past the message"),
    (lambda h: h["input_ids"].update(at=10**9), 0, "run past the message"),
    (lambda h: h["input_ids"].update(at=-16), 0, "run past the message"),
    (lambda h: h.update(v=1), 0, "expected a schema version >= 2"),
    (lambda h: h["input_ids"].update(dtype="object"), 0, "not a wire dtype"),
    (lambda h: h["input_ids"].update(shape=[2**32, 2**32]), 0, "run past the message"),
])
def test_a_frame_that_lies_about_itself_is_a_wire_error(change, cut, error):
    with pytest.raises(wire.WireError, match=error):
        wire.decode(_frame_with(change, cut))


def test_a_newer_frame_asks_to_upgrade_the_reader():
    with pytest.raises(wire.WireVersionError, match="upgrade polydistill"):
        wire.decode(_frame_with(lambda h: h.update(v=wire.SCHEMA_VERSION + 1)))


def test_a_frame_cut_inside_its_header_is_a_wire_error():
    data = bytes(wire.encode(every_work_field(), WireCodec()))
    for length in (3, 7, 20):
        with pytest.raises(wire.WireError):
            wire.decode(data[:length] if length > 4 else frame.MAGIC + data[4:length])


def test_a_packed_top_k_that_lies_about_its_sizes_is_a_wire_error():
    knowledge = every_knowledge_field()
    data = bytes(wire.encode(knowledge, WireCodec(value_bits=8)))
    header, reader = frame.split_frame(data)
    header["soft"]["index_bits"] = 40
    bad = reframe(header, reader)
    with pytest.raises(wire.WireError, match="index_bits"):
        wire.decode(bad)


def test_version_1_is_still_what_encode_writes_without_a_codec():
    data = wire.encode(every_work_field())
    assert not frame.is_frame(data) and msgpack.unpackb(data)["v"] == 1


def _hidden_frame(layers: list) -> bytes:
    """A knowledge frame whose hidden_states are the given [layer, array map] pairs, over one int8 region."""
    message = wire.Knowledge(work=every_work_field(), teacher_id="t",
                             hidden_states={0: np.ones((2, 3, 64), np.float16)})
    data = bytes(wire.encode(message, WireCodec(feature_bits=8)))
    header, reader = frame.split_frame(data)
    header["hidden_states"] = layers(header["hidden_states"][0][1])
    return reframe(header, reader)


def test_int8_maps_inside_int8_maps_are_refused_not_recursed_into():
    def nested(packed):
        inner = packed
        for _ in range(700):
            inner = {"dtype": "int8", "shape": [2, 3, 64], "int8": inner, "scale": packed["scale"]}
        return [[0, inner]]
    with pytest.raises(wire.WireError, match="travel as they are"):
        wire.decode(_hidden_frame(nested))


def test_int8_layers_sharing_their_bytes_cannot_ask_for_unbounded_memory():
    def many(packed):
        huge = dict(packed, dtype="float64")
        return [[layer, huge] for layer in range(200_000)]
    with pytest.raises(wire.WireError, match="rebuilding the packed arrays"):
        wire.decode(_hidden_frame(many))


@pytest.mark.parametrize("shape", [[0, 2**31 - 1, 2**31 - 1, 2**31 - 1], [2**64 - 1] * 200_000])
def test_absurd_shapes_are_wire_errors_in_both_versions(shape):
    started = time.perf_counter()
    for encode_with in (None, WireCodec()):
        data = bytes(wire.encode(every_work_field(), encode_with))
        if frame.is_frame(data):
            header, reader = frame.split_frame(data)
            header["labels"] = {"dtype": "float64", "shape": shape, "at": 0}
            bad = reframe(header, reader)
        else:
            body = msgpack.unpackb(data)
            body["labels"] = {"dtype": "float64", "shape": shape, "raw": b""}
            bad = msgpack.packb(body, use_bin_type=True)
        with pytest.raises(wire.WireError):
            wire.decode(bad)
    assert time.perf_counter() - started < 5


def test_a_packed_top_k_of_an_absurd_shape_is_a_wire_error():
    data = bytes(wire.encode(every_knowledge_field(), WireCodec(value_bits=8)))
    for shape in ([0, 2**62], [2**62, 0, 4], [2, 2, 0]):
        header, reader = frame.split_frame(data)
        header["soft"]["shape"] = shape
        bad = reframe(header, reader)
        with pytest.raises(wire.WireError):
            wire.decode(bad)
