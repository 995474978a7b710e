"""One batch's knowledge in several messages, when one message would exceed the size limit.

A causal-LM teacher ships top-k soft labels for every token: ``n × L × (8k + 4)`` bytes a batch,
which long sequences push past the transport's message limit (``wire.MAX_MESSAGE_BYTES``, or the
smaller ``distill.knowledge_message_bytes``). The teacher then publishes the batch as K chunks,
each a valid ``wire.Knowledge`` of its own:

- split by samples: consecutive runs of the batch's rows, as evenly sized as the limit allows;
- a single sample still too large is split along the sequence into token windows, which needs
  knowledge that is per token only (no attention maps, pooled embeddings, per-sample soft labels or
  votes, decoder targets, parallel pairs or the student's own token ids); otherwise ``ChunkError``
  says what to reduce.

What splits how, and how chunks join again, follows from the wire declaration (``storage/schema.py``),
so every field of a message, present or future, travels in its chunks and comes back whole.

Which chunk of how many a message is travels in its teacher id (``"teacher-0 chunk 2/3"``, see
``chunk_teacher_id``), so the wire schema is unchanged and log lines name the chunk. (An optional
field of ``wire.Knowledge`` would be the more formal carrier; the tag keeps the schema as it is.)

Accounting. The teacher publishes all K chunks and acknowledges the work batch in ONE Redis
transaction, so a batch is in the knowledge stream whole or not at all. The student gathers a
batch's chunks (``student/consumer.py`` holds them) and acknowledges none of them until the last one is in; then it
reassembles the batch (``merge_chunks``: bit-identical to the unchunked knowledge), takes one
step on it and records the batch in its ledger once, exactly as for an unchunked message. So
steps, ledger batches and samples keep their meaning (a resumed checkpoint still has steps ==
batches), a student that dies mid-batch leaves every chunk pending for redelivery, the driver
never sees an empty stream while a student holds half a batch, and copies are harmless: the same
entry read again (own pending) is ignored, a second copy of a chunk is dropped and counted as a
duplicate, and chunks of a batch already applied are dropped like any duplicate.

``transport.max_knowledge_backlog`` counts messages, so chunks too: a teacher waits for room before
it takes a batch, and with batches of more chunks than that limit it runs at most one batch ahead
of the students (raise the limit to keep it further ahead). Data-parallel students
(``student.workers`` > 1) read messages one by one through their own loop, which does not gather
chunks: keep their batches under the limit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import numpy as np

from polydistill.storage import schema, wire


_TAG = re.compile(r"^(?P<teacher>.+) chunk (?P<index>[0-9]+)/(?P<count>[0-9]+)$")

# Per message: msgpack keys, array headers (dtype, shape), job id, teacher id, numbers: about 500 bytes
# for a causal-LM message, counted generously.
MESSAGE_FRAMING_BYTES = 1024
ARRAY_FRAMING_BYTES = 64


class ChunkError(ValueError):
    """Knowledge that cannot be split to fit the message limit; the message says what to reduce."""


@dataclass(frozen=True)
class ChunkTag:
    teacher_id: str  # the replica's own id
    index: int  # 1-based
    count: int


def chunk_teacher_id(teacher_id: str, index: int, count: int) -> str:
    """The teacher id of chunk ``index`` (1-based) of ``count``."""
    return f"{teacher_id} chunk {index}/{count}"


def is_chunk(knowledge: wire.Knowledge) -> bool:
    """True when this message is one chunk of a batch (``chunk_tag`` then reads and checks the tag)."""
    return _TAG.match(knowledge.teacher_id) is not None


def chunk_tag(knowledge: wire.Knowledge) -> ChunkTag | None:
    """Which chunk of its batch this message is; None for a batch in one message."""
    match = _TAG.match(knowledge.teacher_id)
    if match is None:
        return None
    index, count = int(match["index"]), int(match["count"])
    if not 1 <= index <= count:
        raise wire.WireError(f"Knowledge.teacher_id {knowledge.teacher_id!r}: chunk {index} of {count} is impossible")
    return ChunkTag(match["teacher"], index, count)


# -- planning (pure) ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """The part of a batch one chunk carries: rows ``samples``, and of those the tokens ``tokens``."""

    samples: slice
    tokens: slice


def plan_chunks(n_samples: int, bytes_per_sample: int, limit: int) -> list[slice]:
    """Consecutive row ranges covering ``0..n_samples`` once, each of at most ``limit`` bytes, as few
    and as evenly sized as possible. Every range holds at least one row, even one over the limit
    (the caller splits such a row along the sequence)."""
    if n_samples < 1 or bytes_per_sample < 1 or limit < 1:
        raise ValueError(f"plan_chunks needs positive sizes, got n_samples={n_samples}, "
                         f"bytes_per_sample={bytes_per_sample}, limit={limit}")
    per_chunk = max(1, limit // bytes_per_sample)
    count = math.ceil(n_samples / per_chunk)
    bounds = [round(i * n_samples / count) for i in range(count + 1)]  # sizes differ by at most one
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]


def plan_token_windows(seq_len: int, bytes_per_token: int, limit: int) -> list[slice]:
    """Consecutive token ranges covering ``0..seq_len`` once, each of at most ``limit`` bytes."""
    if bytes_per_token > limit:
        raise ChunkError(f"the knowledge of a single token takes {bytes_per_token:,} bytes, more than the message "
                         f"limit of {limit:,}: lower distill.top_k or raise distill.knowledge_message_bytes")
    return plan_chunks(seq_len, bytes_per_token, limit)


def plan_pieces(n_samples: int, seq_len: int, bytes_per_sample: int, limit: int, *,
                windowable: bool = True) -> list[Piece]:
    """The chunks of a batch: the whole batch when it fits, else row ranges, and token windows of
    any single row that alone exceeds ``limit``. Sizes in bytes are payload estimates; ``limit``
    is what is left of the message limit after framing."""
    every_token = slice(0, seq_len)
    if n_samples * bytes_per_sample <= limit:
        return [Piece(slice(0, n_samples), every_token)]
    if bytes_per_sample <= limit:
        return [Piece(rows, every_token) for rows in plan_chunks(n_samples, bytes_per_sample, limit)]
    if not windowable:
        raise ChunkError(
            f"the knowledge of a single sample takes about {bytes_per_sample:,} bytes, more than the message limit of "
            f"{limit:,}, and this knowledge (attention maps, pooled embeddings, per-sample soft labels or votes, "
            "decoder targets, parallel pairs or the student's own token ids) cannot be split along the sequence: lower "
            "data.max_length, raise distill.knowledge_message_bytes, or ask for fewer features"
        )
    windows = plan_token_windows(seq_len, math.ceil(bytes_per_sample / seq_len), limit)
    return [Piece(slice(row, row + 1), window) for row in range(n_samples) for window in windows]


# -- splitting (teacher side) ---------------------------------------------------------------------
#
# How each part splits comes from the wire declaration (storage/schema.py): every array, tuple of
# language codes and layer map holds the batch's rows on its first axis; arrays that run along the
# input's tokens also split into windows on their second axis, while a row's other entries (its id,
# its label) travel in each of its windows; text and numbers are the same in every chunk. A new wire
# field follows chunks without a change here.


def bytes_per_sample(knowledge: wire.Knowledge) -> int:
    """Encoded payload bytes one sample adds to a message: its share of every array (they all have
    the batch's rows as their first axis) and its strings (language codes)."""
    array_bytes, string_bytes = 0, 0
    for spec, value in schema.leaves(knowledge):
        if spec.kind is schema.Kind.TEXTS:
            string_bytes += max(len(string.encode()) for string in value) + 5  # msgpack str header
        else:
            array_bytes += value.nbytes
    return math.ceil(array_bytes / knowledge.work.n_samples) + string_bytes


def windowable(knowledge: wire.Knowledge) -> bool:
    """Whether every per-sample part of this knowledge splits along the input's tokens: arrays that run
    along them, and one value per row (ids, labels) that each window repeats. Attention maps, pooled
    embeddings, per-sample soft labels, votes, decoder targets and rows of their own length (parallel
    pairs, the student's own token ids) do not."""
    return all(spec.kind is schema.Kind.TEXTS or spec.runs_along_tokens(value) or value.ndim == 1
               for spec, value in schema.leaves(knowledge))


def slice_knowledge(knowledge: wire.Knowledge, piece: Piece, teacher_id: str, teacher_seconds: float) -> wire.Knowledge:
    """The part of ``knowledge`` that ``piece`` covers, as a valid message of its own."""
    # Whole rows are cut on the sample axis alone: a decoder's per-token soft labels run along its
    # target, not along the input.
    tokens = None if piece.tokens == slice(0, knowledge.work.seq_len) else piece.tokens
    part = _taken_fields(knowledge, piece.samples, tokens)
    return wire.Knowledge(**{**part, "teacher_id": teacher_id, "teacher_seconds": teacher_seconds})


def _taken_fields(message, rows: slice, tokens: slice | None) -> dict:
    return {name: _take(getattr(message, name), spec, rows, tokens)
            for name, spec in schema.declared_fields(type(message))}


def _take(value, spec: schema.Spec, rows: slice, tokens: slice | None):
    kind = spec.kind
    if value is None or kind in schema.SHARED_KINDS:
        return value
    if kind is schema.Kind.MESSAGE:
        return type(value)(**_taken_fields(value, rows, tokens))
    if kind is schema.Kind.MESSAGES:
        return tuple(type(item)(**_taken_fields(item, rows, tokens)) for item in value)
    if kind is schema.Kind.LAYERS:
        return {layer: _take_array(array, spec, rows, tokens) for layer, array in value.items()}
    if kind is schema.Kind.TEXTS:
        return value[rows]
    return _take_array(value, spec, rows, tokens)


def _take_array(array: np.ndarray, spec: schema.Spec, rows: slice, tokens: slice | None) -> np.ndarray:
    return array[rows, tokens] if tokens is not None and spec.runs_along_tokens(array) else array[rows]


def knowledge_messages(knowledge: wire.Knowledge, limit: int = wire.MAX_MESSAGE_BYTES,
                       codec: wire.WireCodec | None = None) -> list[bytes]:
    """The encoded message(s) of one batch's knowledge, each at most ``limit`` bytes: one message
    when it fits, else chunks tagged ``chunk i/K`` in order (see the module docstring). ``codec``: as for
    ``wire.encode``; the sizes planned are those of version 1, which no codec exceeds (int8 features
    fall back to float16 for rows too short to gain)."""
    if limit > wire.MAX_MESSAGE_BYTES:
        raise ValueError(f"a message limit of {limit:,} bytes exceeds the wire's {wire.MAX_MESSAGE_BYTES:,}")
    n_arrays = sum(1 for _ in schema.arrays(knowledge))
    framing = MESSAGE_FRAMING_BYTES + ARRAY_FRAMING_BYTES * n_arrays + len(knowledge.teacher_id)
    budget = limit - framing
    if budget < 1:
        raise ChunkError(f"a message limit of {limit:,} bytes leaves no room for the {framing:,} bytes of framing: "
                         "raise distill.knowledge_message_bytes")
    work = knowledge.work
    pieces = plan_pieces(work.n_samples, work.seq_len, bytes_per_sample(knowledge), budget,
                         windowable=windowable(knowledge))
    if len(pieces) == 1:
        payloads = [wire.encode(knowledge, codec)]
    elif is_chunk(knowledge):
        # Tags do not nest: a chunk of a chunk would be gathered as a chunk of its batch, and rows lost.
        raise ChunkError(f"the knowledge of {knowledge.teacher_id!r} is one chunk of a batch already and would "
                         f"need {len(pieces)} messages of its own (a later teacher of a several-teacher job added "
                         "to it): raise distill.knowledge_message_bytes")
    else:
        seconds = knowledge.teacher_seconds / len(pieces)
        payloads = [
            wire.encode(slice_knowledge(knowledge, piece, chunk_teacher_id(knowledge.teacher_id, i, len(pieces)),
                                        seconds), codec)
            for i, piece in enumerate(pieces, start=1)
        ]
    too_big = max(len(payload) for payload in payloads)
    if too_big > limit:  # the estimate above is an upper bound; this guards against a change that breaks it
        raise ChunkError(f"a knowledge message of {too_big:,} bytes exceeds the limit of {limit:,} bytes")
    return payloads


# -- gathering (student side) ---------------------------------------------------------------------

def merge_chunks(chunks: list[wire.Knowledge]) -> wire.Knowledge:
    """The batch's knowledge from all its chunks, in chunk order: token windows of one row are
    joined along the sequence, then row ranges stacked."""
    tags = [chunk_tag(chunk) for chunk in chunks]
    if any(tag is None for tag in tags) or [tag.index for tag in tags] != list(range(1, len(chunks) + 1)) or any(
            tag.count != len(chunks) for tag in tags):
        raise wire.WireError(f"merge_chunks needs chunks 1..K of one batch in order, got "
                             f"{[chunk.teacher_id for chunk in chunks]}")
    # The chunks differ in their teacher ids (the tags) and seconds (each its share); all else must agree.
    alike = [dataclasses.replace(chunk, teacher_id=tags[0].teacher_id, teacher_seconds=0.0) for chunk in chunks]
    rows: list[list[wire.Knowledge]] = []
    for chunk in alike:
        if rows and np.array_equal(rows[-1][0].work.sample_ids, chunk.work.sample_ids):
            rows[-1].append(chunk)  # the next token window of the same row
        else:
            rows.append([chunk])
    whole = _join([_join(windows, along_tokens=True) for windows in rows], along_tokens=False)
    return dataclasses.replace(whole, teacher_seconds=sum(chunk.teacher_seconds for chunk in chunks))


def _join(parts: list, along_tokens: bool, where: str = "knowledge"):
    """One message from its parts: one row's token windows (``along_tokens``), or consecutive rows."""
    if len(parts) == 1:
        return parts[0]
    return type(parts[0])(**{
        name: _join_field([getattr(part, name) for part in parts], spec, along_tokens, f"{where}.{name}")
        for name, spec in schema.declared_fields(type(parts[0]))
    })


def _join_field(values: list, spec: schema.Spec, along_tokens: bool, where: str):
    kind, first = spec.kind, values[0]
    if kind in schema.SHARED_KINDS:
        _require_agreement(values, where)
        return first
    if any(value is None for value in values):
        _require_agreement([value is None for value in values], f"{where} (present or not)")
        return None
    if kind is schema.Kind.MESSAGE:
        return _join(values, along_tokens, where)
    if kind is schema.Kind.MESSAGES:
        _require_agreement([len(value) for value in values], f"{where} (how many)")
        return tuple(_join(list(items), along_tokens, f"{where}[{position}]")
                     for position, items in enumerate(zip(*values)))
    if kind is schema.Kind.LAYERS:
        _require_agreement([list(value) for value in values], f"{where} (which layers)")
        return {layer: _join_arrays([value[layer] for value in values], spec, along_tokens) for layer in first}
    if kind is schema.Kind.TEXTS:
        return first if along_tokens else tuple(string for value in values for string in value)
    return _join_arrays(values, spec, along_tokens)


def _join_arrays(arrays: list[np.ndarray], spec: schema.Spec, along_tokens: bool) -> np.ndarray:
    if not along_tokens:
        return np.concatenate(arrays, axis=0)
    # One row's windows: what runs along the tokens joins up, the row's other entries are in each window.
    return np.concatenate(arrays, axis=1) if spec.runs_along_tokens(arrays[0]) else arrays[0]


def _require_agreement(values: list, where: str) -> None:
    for value in values[1:]:
        if value != values[0]:
            raise wire.WireError(f"the chunks of one batch disagree on {where}: {values[0]!r} and {value!r}")
