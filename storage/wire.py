"""The one versioned wire schema between feeder, teachers and students.

Every message is a msgpack map carrying ``v`` (the schema version) and ``kind``
("work" or "knowledge"). Each message class below declares its fields once, on the
dataclass itself (``storage/schema.py`` says how): encoding, decoding, the type and
dtype checks, byte counts and chunking (``storage/chunking.py``) all follow from
that declaration, so a new field is added in one place. Nothing here uses pickle: a
message is data, never code.

Two framings of that map:
- version 1: arrays travel inside the map as ``{dtype, shape, raw}`` (``encode(msg)``);
- version 2: the map is a header followed by the arrays' bytes (``storage/frame.py``),
  which the decoder reads in place, and knowledge may be packed as a ``WireCodec`` asks
  (``storage/knowledge_codec.py``: top-k soft labels in 8 or 16 bits a value and
  bit-packed class ids, features in int8). Every sender of a job writes version 2
  (``encode(msg, codec)``, the codec from ``distill.value_bits``/``feature_bits``).
Either way, decoded arrays are read-only ``np.frombuffer`` views of the received bytes,
except packed ones, which are rebuilt.

Compatibility rules:
- A reader accepts every version up to its own ``SCHEMA_VERSION`` and rejects newer
  ones with ``WireVersionError`` (upgrade the reading side).
- Adding an optional field does not need a version bump: readers ignore keys they
  do not know. Renaming, removing or re-typing a field does.
- tests/unit/test_wire_compat.py keeps payloads written by version 1, which must decode,
  and ``encode(msg)`` still writes version 1.

Two kinds of error, kept apart on purpose (see DESIGN.md, "protocol logic"):
``WireError`` means the peer sent garbage, and the message is dead-lettered;
anything else raised while decoding would be a bug in this module.

The message classes are frozen dataclasses with ``eq=False``: element-wise array
comparison has no single truth value, so equality would be misleading; compare
fields explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import msgpack
import numpy as np

from polydistill.storage.frame import encode_frame, is_frame, split_frame
from polydistill.storage.wire_codec import WireCodec
from polydistill.storage.schema import (
    HALF,
    INLINE_READER,
    HALF_OR_SINGLE,
    SINGLE,
    WireError,
    WireVersionError,
    check_fields,
    count,
    floats,
    get,
    integers,
    layers,
    nbytes_by_part,
    nested,
    nested_tuple,
    number,
    read_body,
    require_shape,
    text,
    texts,
    write_body,
)

__all__ = [
    "KIND_KNOWLEDGE", "KIND_WORK", "MAX_MESSAGE_BYTES", "SCHEMA_VERSION", "SOFT_FULL", "SOFT_TOPK", "Knowledge",
    "Message", "SoftLabels", "StudentTokens", "TeacherVote", "WireCodec", "WireError", "WireVersionError",
    "WorkBatch", "decode", "encode", "knowledge_nbytes", "topk_soft_labels",
]

SCHEMA_VERSION = 2
# One message must stay far below Redis' 512 MB bulk-string limit and fit comfortably in a
# consumer's memory; a batch of hidden states that needs more should be split or reduced.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

KIND_WORK = "work"
KIND_KNOWLEDGE = "knowledge"

SOFT_FULL = "full"
SOFT_TOPK = "topk"


# --------------------------------------------------------------------------- #
# Messages
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, eq=False)
class StudentTokens:
    """The batch's texts in one student tokenizer's ids, for the students that read that tokenizer
    (``student/token_inputs.py``: a trimmed vocabulary, or ``student.tokenizer``). ``source`` names the
    tokenizer as ``token_inputs.token_source`` does, so that each student finds its own."""

    source: str = text()
    input_ids: np.ndarray = integers(np.int32)  # [n, L], the tokenizer's own length
    attention_mask: np.ndarray = integers(np.uint8, allow_bool=True)  # [n, L], 1 = real token

    def __post_init__(self) -> None:
        check_fields(self)
        require_shape(self.input_ids, f"StudentTokens[{self.source!r}].input_ids", (None, None),
                      "n samples x its own length")
        require_shape(self.attention_mask, f"StudentTokens[{self.source!r}].attention_mask", self.input_ids.shape,
                      "same as input_ids")


@dataclass(frozen=True, eq=False)
class WorkBatch:
    """One batch of tokenised samples for a teacher, self-contained."""

    job_id: str = text()
    epoch: int = count()
    batch_id: int = count()
    sample_ids: np.ndarray = integers(np.int64)  # [n]
    languages: tuple[str, ...] = texts()  # [n]
    input_ids: np.ndarray = integers(np.int32, per_token_ndim=2)  # [n, L]
    attention_mask: np.ndarray = integers(np.uint8, allow_bool=True, per_token_ndim=2)  # [n, L], 1 = real token
    labels: np.ndarray | None = integers(np.int64, optional=True)  # [n]
    # A second text per sample that only the student reads (parallel data: the translation), in the
    # same tokenizer's ids as input_ids; [n, L2] and its mask.
    pair_input_ids: np.ndarray | None = integers(np.int32, optional=True)
    pair_attention_mask: np.ndarray | None = integers(np.uint8, optional=True, allow_bool=True)
    # Per-token labels, [n, L], -100 where none (masked LM: the original ids of masked positions).
    token_labels: np.ndarray | None = integers(np.int64, optional=True, per_token_ndim=2)
    # The same texts in one student tokenizer's ids, [n, L3]: how batches written before student_tokens
    # carried the one tokenization all students shared. Read still; the feeder writes student_tokens.
    student_input_ids: np.ndarray | None = integers(np.int32, optional=True)
    student_attention_mask: np.ndarray | None = integers(np.uint8, optional=True, allow_bool=True)
    # The same texts in each tokenizer that some student of the job reads instead of the teacher's.
    student_tokens: tuple[StudentTokens, ...] = nested_tuple(StudentTokens, added=True)
    # Multi-task jobs (extra_tasks): which of the job's tasks this batch belongs to; None is the main task.
    task: str | None = text(optional=True)
    # distill.align_language: the teacher's embedding of each sample's sentence in that language [n, d], and
    # whether the sample has one [n] (storage/alignment.py).
    align_targets: np.ndarray | None = floats(HALF_OR_SINGLE, added=True)
    align_found: np.ndarray | None = integers(np.uint8, added=True, allow_bool=True)

    def __post_init__(self) -> None:
        check_fields(self)
        require_shape(self.sample_ids, "WorkBatch.sample_ids", (None,), "n samples")
        n = self.n_samples
        if len(self.languages) != n:
            raise WireError(
                f"WorkBatch.languages: expected {n} entries (one per sample), got {len(self.languages)}"
            )
        require_shape(self.input_ids, "WorkBatch.input_ids", (n, None), "n samples x sequence length")
        require_shape(self.attention_mask, "WorkBatch.attention_mask", self.input_ids.shape, "same as input_ids")
        if self.attention_mask.size and self.attention_mask.max() > 1:
            raise WireError("WorkBatch.attention_mask: expected only 0 (padding) and 1 (token)")
        if self.labels is not None:
            require_shape(self.labels, "WorkBatch.labels", (n,), "one label per sample")
        if self.token_labels is not None:
            require_shape(self.token_labels, "WorkBatch.token_labels", self.input_ids.shape, "same as input_ids")
        for prefix in ("pair", "student"):
            ids_name, mask_name = f"{prefix}_input_ids", f"{prefix}_attention_mask"
            ids, mask = getattr(self, ids_name), getattr(self, mask_name)
            if (ids is None) != (mask is None):
                raise WireError(f"WorkBatch.{ids_name} and {mask_name} come together or not at all")
            if ids is not None:
                require_shape(ids, f"WorkBatch.{ids_name}", (n, None), "n samples x its own length")
                require_shape(mask, f"WorkBatch.{mask_name}", ids.shape, f"same as {ids_name}")
        sources = [tokens.source for tokens in self.student_tokens]
        if len(set(sources)) != len(sources):
            raise WireError(f"WorkBatch.student_tokens: each tokenizer once, got {sources}")
        for tokens in self.student_tokens:
            require_shape(tokens.input_ids, f"WorkBatch.student_tokens[{tokens.source!r}].input_ids", (n, None),
                          "n samples x its own length")
        if (self.align_targets is None) != (self.align_found is None):
            raise WireError("WorkBatch.align_targets and align_found come together or not at all")
        if self.align_targets is not None:
            require_shape(self.align_targets, "WorkBatch.align_targets", (n, None), "n samples x embedding width")
            require_shape(self.align_found, "WorkBatch.align_found", (n,), "one flag per sample")

    @property
    def n_samples(self) -> int:
        return int(self.sample_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass(frozen=True, eq=False)
class SoftLabels:
    """A teacher's output distribution: full logits, or the top-k of them.

    The top-k form keeps ``topk_logsumexp`` (log-sum-exp of the *full* logits at
    temperature 1, float32), so ``topk_values - topk_logsumexp[..., None]`` are the
    exact teacher log-probs of the kept classes and ``1 - exp(...).sum(-1)`` the
    probability mass of the dropped tail, from which a student can rebuild
    log-probs at any temperature it chooses.
    """

    # [n, C], or per token [n, L, C]
    logits: np.ndarray | None = floats(HALF_OR_SINGLE, optional=True, per_token_ndim=3, variant=SOFT_FULL)
    # [..., k], descending
    topk_values: np.ndarray | None = floats(HALF_OR_SINGLE, optional=True, per_token_ndim=3, variant=SOFT_TOPK,
                                            key="values")
    topk_indices: np.ndarray | None = integers(np.int32, optional=True, per_token_ndim=3, variant=SOFT_TOPK,
                                               key="indices")  # [..., k]
    topk_logsumexp: np.ndarray | None = floats(SINGLE, optional=True, per_token_ndim=2, variant=SOFT_TOPK,
                                               key="logsumexp")  # [...]

    def __post_init__(self) -> None:
        topk_parts = (self.topk_values, self.topk_indices, self.topk_logsumexp)
        has_full = self.logits is not None
        has_topk = any(part is not None for part in topk_parts)
        if has_full == has_topk:
            raise WireError(
                "SoftLabels: give either logits or topk_values/topk_indices/topk_logsumexp, "
                "not both or neither"
            )
        check_fields(self)
        if has_full:
            if self.logits.ndim not in (2, 3):
                raise WireError(
                    f"SoftLabels.logits: expected shape [n, C] or [n, L, C], got {list(self.logits.shape)}"
                )
            return
        if any(part is None for part in topk_parts):
            raise WireError(
                "SoftLabels: top-k needs all three of topk_values, topk_indices and topk_logsumexp"
            )
        values = self.topk_values
        if values.ndim not in (2, 3):
            raise WireError(
                f"SoftLabels.topk_values: expected shape [n, k] or [n, L, k], got {list(values.shape)}"
            )
        require_shape(self.topk_indices, "SoftLabels.topk_indices", values.shape, "same as topk_values")
        require_shape(
            self.topk_logsumexp, "SoftLabels.topk_logsumexp", values.shape[:-1], "topk_values without the k axis"
        )

    @classmethod
    def full(cls, logits: np.ndarray) -> SoftLabels:
        return cls(logits=logits)

    @property
    def kind(self) -> str:
        return SOFT_FULL if self.logits is not None else SOFT_TOPK

    @property
    def _leading(self) -> np.ndarray:
        return self.logits if self.logits is not None else self.topk_values

    @property
    def n_samples(self) -> int:
        return int(self._leading.shape[0])

    @property
    def per_token(self) -> bool:
        """True for [n, L, ...] (language modelling), False for [n, ...] (sequence classes)."""
        return self._leading.ndim == 3


def topk_soft_labels(logits: np.ndarray, k: int) -> SoftLabels:
    """Keep the k largest logits per row (descending) plus the full log-sum-exp."""
    logits = np.asarray(logits)
    if not np.issubdtype(logits.dtype, np.floating):
        raise WireError(f"topk_soft_labels: expected float logits, got dtype {logits.dtype}")
    n_classes = logits.shape[-1] if logits.ndim else 0
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_classes:
        raise WireError(f"topk_soft_labels: k must be between 1 and the {n_classes} classes, got {k!r}")
    # argpartition is O(C) per row; only the k survivors get sorted.
    unordered = np.argpartition(logits, -k, axis=-1)[..., -k:]
    unordered_values = np.take_along_axis(logits, unordered, axis=-1)
    order = np.argsort(-unordered_values, axis=-1, kind="stable")
    indices = np.take_along_axis(unordered, order, axis=-1)
    values = np.take_along_axis(unordered_values, order, axis=-1)
    return SoftLabels(
        topk_values=values,
        topk_indices=indices.astype(np.int32),
        topk_logsumexp=_logsumexp(logits),
    )


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    # Computed in float32 at least: float16 sums of exp overflow at ~11 nats.
    work = logits.astype(np.promote_types(logits.dtype, np.float32))
    peak = work.max(axis=-1, keepdims=True)
    total = np.log(np.exp(work - peak).sum(axis=-1)) + peak[..., 0]
    return total.astype(np.float32)


@dataclass(frozen=True, eq=False)
class TeacherVote:
    """One teacher's class logits in a job with several teachers, for the rows routed to it.

    Rows it did not serve (``served`` 0) hold zeros; the student mixes, per row, the softened
    distributions of the teachers that served it, with the weights of the job's config.
    """

    teacher: str = text()
    logits: np.ndarray = floats(SINGLE)  # [n, C]
    served: np.ndarray = integers(np.uint8)  # [n], 1 = this teacher labelled the row

    def __post_init__(self) -> None:
        check_fields(self)
        if self.logits.ndim != 2:
            raise WireError(f"TeacherVote.logits: expected shape [n, C], got {list(self.logits.shape)}")
        require_shape(self.served, "TeacherVote.served", (self.logits.shape[0],), "n")


@dataclass(frozen=True, eq=False)
class Knowledge:
    """What the teachers learned about one work batch; carries the batch itself."""

    work: WorkBatch = nested(WorkBatch)
    teacher_id: str = text()
    soft: SoftLabels | None = nested(SoftLabels, optional=True)
    hidden_states: dict[int, np.ndarray] = layers(HALF, per_token_ndim=3)  # layer -> [n, L, H]
    attentions: dict[int, np.ndarray] = layers(HALF)  # layer -> [n, heads, L, L]
    embeddings: np.ndarray | None = floats(HALF_OR_SINGLE, optional=True)  # [n, H]
    teacher_seconds: float = number(default=0.0)
    # Several teachers (extra_teachers): each one's logits, in the order the batch passed them. They
    # stand in for the soft labels, and count as such in ``knowledge_nbytes``.
    ensemble: tuple[TeacherVote, ...] = nested_tuple(TeacherVote, part="soft")
    # Sequence-to-sequence: the decoder's target tokens, which the soft labels run along ([n, T],
    # -100 after the end): the reference translation, or the teacher's own beam-search output.
    target_ids: np.ndarray | None = integers(np.int32, optional=True)

    def __post_init__(self) -> None:
        check_fields(self)
        n, seq_len = self.work.n_samples, self.work.seq_len
        if self.target_ids is not None:
            require_shape(self.target_ids, "Knowledge.target_ids", (n, None), "n x target length")
        self._check_soft(n, self._soft_length(seq_len))
        for layer, array in self.hidden_states.items():
            require_shape(array, f"Knowledge.hidden_states[{layer!r}]", (n, seq_len, None), "n x L x hidden")
        for layer, array in self.attentions.items():
            require_shape(array, f"Knowledge.attentions[{layer!r}]", (n, None, seq_len, seq_len),
                          "n x heads x L x L")
        if self.embeddings is not None:
            require_shape(self.embeddings, "Knowledge.embeddings", (n, None), "n x hidden")
        for position, vote in enumerate(self.ensemble):
            if vote.logits.shape[0] != n:
                raise WireError(f"Knowledge.ensemble[{position}]: {vote.logits.shape[0]} rows for a batch of {n}")
        teachers = [vote.teacher for vote in self.ensemble]
        if len(set(teachers)) != len(teachers):
            raise WireError(f"Knowledge.ensemble: a teacher appears twice in {teachers}")

    def _soft_length(self, seq_len: int) -> int:
        """Per-token soft labels run along the input, or for a decoder along its target (target_ids)."""
        return seq_len if self.target_ids is None else int(self.target_ids.shape[1])

    def _check_soft(self, n: int, seq_len: int) -> None:
        if self.soft is None:
            return
        expected = (n, seq_len) if self.soft.per_token else (n,)
        leading = tuple(self.soft._leading.shape[: len(expected)])
        if leading != expected:
            meaning = "n samples x sequence length" if self.soft.per_token else "n samples"
            raise WireError(
                f"Knowledge.soft: leading shape {list(leading)} does not match the work batch "
                f"(expected {list(expected)}, {meaning})"
            )


def knowledge_nbytes(knowledge: Knowledge) -> dict[str, int]:
    """Payload bytes of a knowledge message by part, as decoded (packed parts take fewer on the wire):
    "work" (every array of the work batch), "soft" (soft labels and several teachers' votes),
    "hidden_states", "attentions", "embeddings" and "target_ids"; each key is there, 0 when empty.

    Counted once per message and kept on it (messages are immutable): a student's reading thread
    counts while it decodes, so the training loop only looks the figures up."""
    counted = knowledge.__dict__.get(_NBYTES)
    if counted is None:
        counted = nbytes_by_part(knowledge)
        object.__setattr__(knowledge, _NBYTES, counted)
    return dict(counted)


_NBYTES = "_nbytes_by_part"


# --------------------------------------------------------------------------- #
# Encoding and decoding
# --------------------------------------------------------------------------- #

Message = Union[WorkBatch, Knowledge]
_CLASSES: dict[str, type] = {KIND_WORK: WorkBatch, KIND_KNOWLEDGE: Knowledge}
_KINDS = {cls: kind for kind, cls in _CLASSES.items()}


def encode(msg: Message, codec: WireCodec | None = None) -> bytes | bytearray:
    """The message's bytes: version 2 (``storage/frame.py``) packed as ``codec`` says, or with no codec
    version 1, which every reader since the first one decodes."""
    kind = _KINDS.get(type(msg))
    if kind is None:
        raise TypeError(f"encode() takes a WorkBatch or Knowledge, got {type(msg).__name__}")
    if codec is None:
        data = msgpack.packb({"v": 1, "kind": kind, **write_body(msg)}, use_bin_type=True)
    else:
        data = encode_frame({"v": SCHEMA_VERSION, "kind": kind}, msg, codec)
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError(
            f"a {kind} message of {len(data):,} bytes exceeds the limit of {MAX_MESSAGE_BYTES:,} bytes: "
            "use smaller batches (training.batch_size), fewer hidden/attention layers, or top-k soft labels "
            "(distill.top_k)"
        )
    return data


def decode(data: bytes) -> Message:
    """Decode one message; raise WireError (dead-letter it) if it is not valid."""
    if len(data) > MAX_MESSAGE_BYTES:
        # Checked before unpacking, so a hostile or broken peer cannot make us allocate without bound.
        raise WireError(f"message of {len(data):,} bytes exceeds the limit of {MAX_MESSAGE_BYTES:,} bytes")
    if is_frame(data):
        top, reader = split_frame(data)
        lowest = 2
    else:
        try:
            top = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            # ValueError covers ExtraData, FormatError, StackError and bad UTF-8.
            raise WireError(f"not a msgpack message ({type(exc).__name__}: {exc})") from exc
        reader, lowest = INLINE_READER, 1
    if not isinstance(top, dict):
        raise WireError(f"expected a msgpack map at the top level, got {type(top).__name__}")

    version = get(top, "v", int, "message")
    if version > SCHEMA_VERSION:
        raise WireVersionError(
            f"message uses wire schema version {version}, but this build of polydistill reads "
            f"versions up to {SCHEMA_VERSION}; upgrade polydistill on the reading side"
        )
    if version < lowest:
        raise WireError(f"message.v: expected a schema version >= {lowest} in this framing, got {version}")

    kind = get(top, "kind", str, "message")
    cls = _CLASSES.get(kind)
    if cls is None:
        raise WireError(f"message.kind: unknown kind {kind!r} (expected one of {sorted(_CLASSES)})")
    return read_body(cls, top, kind, reader)
