"""The one versioned wire schema between feeder, teachers and students.

Every message is a msgpack map carrying ``v`` (the schema version) and ``kind``
("work" or "knowledge"); arrays travel as ``{dtype, shape, raw}`` with little-endian
raw bytes and are decoded with ``np.frombuffer``, so a decoded array is a read-only
view of the unpacked message rather than a copy. Nothing here uses pickle: a
message is data, never code.

Compatibility rules:
- A reader accepts every version up to its own ``SCHEMA_VERSION`` and rejects newer
  ones with ``WireVersionError`` (upgrade the reading side).
- Adding an optional field does not need a version bump: readers ignore keys they
  do not know. Renaming, removing or re-typing a field does.

Two kinds of error, kept apart on purpose (see DESIGN.md, "protocol logic"):
``WireError`` means the peer sent garbage, and the message is dead-lettered;
anything else raised while decoding would be a bug in this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

import msgpack
import numpy as np

SCHEMA_VERSION = 1
# One message must stay far below Redis' 512 MB bulk-string limit and fit comfortably in a
# consumer's memory; a batch of hidden states that needs more should be split or reduced.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

KIND_WORK = "work"
KIND_KNOWLEDGE = "knowledge"

SOFT_FULL = "full"
SOFT_TOPK = "topk"

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

_FLOAT_PAYLOAD_DTYPES = (np.float16, np.float32)


class WireError(ValueError):
    """The peer sent a message this build cannot accept; dead-letter it."""


class WireVersionError(WireError):
    """The message was written by a newer schema version than this build reads."""


# --------------------------------------------------------------------------- #
# Array validation shared by the message classes
# --------------------------------------------------------------------------- #


def _as_integer_array(
    value: Any, field_name: str, target: np.dtype, *, allow_bool: bool = False
) -> np.ndarray:
    """Cast an integer array to the canonical dtype, refusing values that would wrap."""
    array = np.asarray(value)
    kind_ok = np.issubdtype(array.dtype, np.integer) or (allow_bool and array.dtype == np.bool_)
    if not kind_ok:
        raise WireError(f"{field_name}: expected an integer array, got dtype {array.dtype}")
    target = np.dtype(target)
    if array.dtype == target:
        return array
    if array.size and array.dtype != np.bool_ and not np.can_cast(array.dtype, target, casting="safe"):
        limits = np.iinfo(target)
        low, high = int(array.min()), int(array.max())
        if low < limits.min or high > limits.max:
            raise WireError(
                f"{field_name}: values span [{low}, {high}], which does not fit {target.name}"
            )
    return array.astype(target)


def _as_float_array(
    value: Any,
    field_name: str,
    *,
    allowed: tuple[type, ...] = _FLOAT_PAYLOAD_DTYPES,
    fallback: type = np.float32,
) -> np.ndarray:
    """Keep an allowed float dtype as is; narrow any other float dtype to ``fallback``."""
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise WireError(f"{field_name}: expected a floating-point array, got dtype {array.dtype}")
    if array.dtype.type in allowed:
        return array
    return array.astype(fallback)


def _require_shape(
    array: np.ndarray, field_name: str, expected: tuple[Any, ...], meaning: str
) -> None:
    """Check ``array.shape`` against ``expected``, where ``None`` matches any length."""
    matches = array.ndim == len(expected) and all(
        want is None or have == want for have, want in zip(array.shape, expected)
    )
    if not matches:
        pretty = ", ".join("?" if want is None else str(want) for want in expected)
        raise WireError(f"{field_name}: expected shape [{pretty}] ({meaning}), got {list(array.shape)}")


def _require_str(value: Any, field_name: str) -> str:
    if not isinstance(value, str) or not value:
        raise WireError(f"{field_name}: expected a non-empty string, got {value!r}")
    return value


def _require_count(value: Any, field_name: str) -> int:
    # bool is an int subclass; True as an epoch number is always a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise WireError(f"{field_name}: expected a non-negative integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- #
# Messages
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, eq=False)
class WorkBatch:
    """One batch of tokenised samples for a teacher, self-contained.

    ``eq=False``: element-wise array comparison has no single truth value, so
    equality would be misleading; compare fields explicitly.
    """

    job_id: str
    epoch: int
    batch_id: int
    sample_ids: np.ndarray  # int64 [n]
    languages: tuple[str, ...]  # [n]
    input_ids: np.ndarray  # int32 [n, L]
    attention_mask: np.ndarray  # uint8 [n, L], 1 = real token
    labels: np.ndarray | None = None  # int64 [n]
    # A second text per sample that only the student reads (parallel data: the translation), in the
    # same tokenizer's ids as input_ids; [n, L2] and its mask.
    pair_input_ids: np.ndarray | None = None
    pair_attention_mask: np.ndarray | None = None
    # Per-token labels, int64 [n, L], -100 where none (masked LM: the original ids of masked positions).
    token_labels: np.ndarray | None = None
    # The same texts in the student's own tokenizer, when it has one (student.tokenizer); [n, L3].
    student_input_ids: np.ndarray | None = None
    student_attention_mask: np.ndarray | None = None
    # Multi-task jobs (extra_tasks): which of the job's tasks this batch belongs to; None is the main task.
    task: str | None = None

    def __post_init__(self) -> None:
        _require_str(self.job_id, "WorkBatch.job_id")
        if self.task is not None:
            _require_str(self.task, "WorkBatch.task")
        _set(self, "epoch", _require_count(self.epoch, "WorkBatch.epoch"))
        _set(self, "batch_id", _require_count(self.batch_id, "WorkBatch.batch_id"))

        sample_ids = _as_integer_array(self.sample_ids, "WorkBatch.sample_ids", np.int64)
        _require_shape(sample_ids, "WorkBatch.sample_ids", (None,), "n samples")
        n = sample_ids.shape[0]
        _set(self, "sample_ids", sample_ids)

        languages = self.languages
        if not isinstance(languages, (list, tuple)) or not all(isinstance(lang, str) for lang in languages):
            raise WireError("WorkBatch.languages: expected one language code (str) per sample")
        languages = tuple(languages)
        if len(languages) != n:
            raise WireError(
                f"WorkBatch.languages: expected {n} entries (one per sample), got {len(languages)}"
            )
        _set(self, "languages", languages)

        input_ids = _as_integer_array(self.input_ids, "WorkBatch.input_ids", np.int32)
        _require_shape(input_ids, "WorkBatch.input_ids", (n, None), "n samples x sequence length")
        _set(self, "input_ids", input_ids)

        mask = _as_integer_array(
            self.attention_mask, "WorkBatch.attention_mask", np.uint8, allow_bool=True
        )
        _require_shape(mask, "WorkBatch.attention_mask", input_ids.shape, "same as input_ids")
        if mask.size and mask.max() > 1:
            raise WireError("WorkBatch.attention_mask: expected only 0 (padding) and 1 (token)")
        _set(self, "attention_mask", mask)

        if self.labels is not None:
            labels = _as_integer_array(self.labels, "WorkBatch.labels", np.int64)
            _require_shape(labels, "WorkBatch.labels", (n,), "one label per sample")
            _set(self, "labels", labels)

        if self.token_labels is not None:
            token_labels = _as_integer_array(self.token_labels, "WorkBatch.token_labels", np.int64)
            _require_shape(token_labels, "WorkBatch.token_labels", input_ids.shape, "same as input_ids")
            _set(self, "token_labels", token_labels)

        for prefix in ("pair", "student"):
            ids_name, mask_name = f"{prefix}_input_ids", f"{prefix}_attention_mask"
            ids, mask = getattr(self, ids_name), getattr(self, mask_name)
            if (ids is None) != (mask is None):
                raise WireError(f"WorkBatch.{ids_name} and {mask_name} come together or not at all")
            if ids is None:
                continue
            ids = _as_integer_array(ids, f"WorkBatch.{ids_name}", np.int32)
            _require_shape(ids, f"WorkBatch.{ids_name}", (n, None), "n samples x its own length")
            mask = _as_integer_array(mask, f"WorkBatch.{mask_name}", np.uint8, allow_bool=True)
            _require_shape(mask, f"WorkBatch.{mask_name}", ids.shape, f"same as {ids_name}")
            _set(self, ids_name, ids)
            _set(self, mask_name, mask)

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

    logits: np.ndarray | None = None  # float16/32 [n, C] or [n, L, C]
    topk_values: np.ndarray | None = None  # float16/32 [..., k], descending
    topk_indices: np.ndarray | None = None  # int32 [..., k]
    topk_logsumexp: np.ndarray | None = None  # float32 [...]

    def __post_init__(self) -> None:
        topk_parts = (self.topk_values, self.topk_indices, self.topk_logsumexp)
        has_full = self.logits is not None
        has_topk = any(part is not None for part in topk_parts)
        if has_full == has_topk:
            raise WireError(
                "SoftLabels: give either logits or topk_values/topk_indices/topk_logsumexp, "
                "not both or neither"
            )
        if has_full:
            logits = _as_float_array(self.logits, "SoftLabels.logits")
            if logits.ndim not in (2, 3):
                raise WireError(
                    f"SoftLabels.logits: expected shape [n, C] or [n, L, C], got {list(logits.shape)}"
                )
            _set(self, "logits", logits)
            return
        if any(part is None for part in topk_parts):
            raise WireError(
                "SoftLabels: top-k needs all three of topk_values, topk_indices and topk_logsumexp"
            )
        values = _as_float_array(self.topk_values, "SoftLabels.topk_values")
        if values.ndim not in (2, 3):
            raise WireError(
                f"SoftLabels.topk_values: expected shape [n, k] or [n, L, k], got {list(values.shape)}"
            )
        indices = _as_integer_array(self.topk_indices, "SoftLabels.topk_indices", np.int32)
        _require_shape(indices, "SoftLabels.topk_indices", values.shape, "same as topk_values")
        logsumexp = _as_float_array(self.topk_logsumexp, "SoftLabels.topk_logsumexp", allowed=(np.float32,))
        _require_shape(
            logsumexp, "SoftLabels.topk_logsumexp", values.shape[:-1], "topk_values without the k axis"
        )
        _set(self, "topk_values", values)
        _set(self, "topk_indices", indices)
        _set(self, "topk_logsumexp", logsumexp)

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

    teacher: str
    logits: np.ndarray  # float32 [n, C]
    served: np.ndarray  # uint8 [n], 1 = this teacher labelled the row

    def __post_init__(self) -> None:
        _require_str(self.teacher, "TeacherVote.teacher")
        logits = _as_float_array(self.logits, "TeacherVote.logits", allowed=(np.float32,), fallback=np.float32)
        if logits.ndim != 2:
            raise WireError(f"TeacherVote.logits: expected shape [n, C], got {list(logits.shape)}")
        served = _as_integer_array(self.served, "TeacherVote.served", np.uint8)
        _require_shape(served, "TeacherVote.served", (logits.shape[0],), "n")
        _set(self, "logits", logits)
        _set(self, "served", served)


@dataclass(frozen=True, eq=False)
class Knowledge:
    """What the teachers learned about one work batch; carries the batch itself."""

    work: WorkBatch
    teacher_id: str
    soft: SoftLabels | None = None
    hidden_states: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> fp16 [n, L, H]
    attentions: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> fp16 [n, heads, L, L]
    embeddings: np.ndarray | None = None  # float16/32 [n, H]
    teacher_seconds: float = 0.0
    # Several teachers (extra_teachers): each one's logits, in the order the batch passed them.
    ensemble: tuple[TeacherVote, ...] = ()
    # Sequence-to-sequence: the decoder's target tokens, which the soft labels run along (int32 [n, T],
    # -100 after the end): the reference translation, or the teacher's own beam-search output.
    target_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.work, WorkBatch):
            raise WireError(f"Knowledge.work: expected a WorkBatch, got {type(self.work).__name__}")
        _require_str(self.teacher_id, "Knowledge.teacher_id")
        n, seq_len = self.work.n_samples, self.work.seq_len
        if self.target_ids is not None:
            targets = _as_integer_array(self.target_ids, "Knowledge.target_ids", np.int32)
            _require_shape(targets, "Knowledge.target_ids", (n, None), "n x target length")
            _set(self, "target_ids", targets)
        self._check_soft(n, self._soft_length(seq_len))

        hidden = _layer_arrays(
            self.hidden_states, "Knowledge.hidden_states", (n, seq_len, None), "n x L x hidden"
        )
        attentions = _layer_arrays(
            self.attentions, "Knowledge.attentions", (n, None, seq_len, seq_len), "n x heads x L x L"
        )
        _set(self, "hidden_states", hidden)
        _set(self, "attentions", attentions)

        if self.embeddings is not None:
            embeddings = _as_float_array(self.embeddings, "Knowledge.embeddings")
            _require_shape(embeddings, "Knowledge.embeddings", (n, None), "n x hidden")
            _set(self, "embeddings", embeddings)

        votes = tuple(self.ensemble)
        for position, vote in enumerate(votes):
            if not isinstance(vote, TeacherVote):
                raise WireError(f"Knowledge.ensemble[{position}]: expected a TeacherVote, got {type(vote).__name__}")
            if vote.logits.shape[0] != n:
                raise WireError(f"Knowledge.ensemble[{position}]: {vote.logits.shape[0]} rows for a batch of {n}")
        if len({vote.teacher for vote in votes}) != len(votes):
            raise WireError(f"Knowledge.ensemble: a teacher appears twice in {[vote.teacher for vote in votes]}")
        _set(self, "ensemble", votes)

        seconds = self.teacher_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise WireError(f"Knowledge.teacher_seconds: expected a non-negative number, got {seconds!r}")
        _set(self, "teacher_seconds", float(seconds))

    def _soft_length(self, seq_len: int) -> int:
        """Per-token soft labels run along the input, or for a decoder along its target (target_ids)."""
        return seq_len if self.target_ids is None else int(self.target_ids.shape[1])

    def _check_soft(self, n: int, seq_len: int) -> None:
        if self.soft is None:
            return
        if not isinstance(self.soft, SoftLabels):
            raise WireError(f"Knowledge.soft: expected SoftLabels or None, got {type(self.soft).__name__}")
        expected = (n, seq_len) if self.soft.per_token else (n,)
        leading = tuple(self.soft._leading.shape[: len(expected)])
        if leading != expected:
            meaning = "n samples x sequence length" if self.soft.per_token else "n samples"
            raise WireError(
                f"Knowledge.soft: leading shape {list(leading)} does not match the work batch "
                f"(expected {list(expected)}, {meaning})"
            )


def _layer_arrays(
    value: Any, field_name: str, shape: tuple[Any, ...], meaning: str
) -> dict[int, np.ndarray]:
    """Validate a {teacher layer index: array} map; features travel as float16."""
    if not isinstance(value, Mapping):
        raise WireError(
            f"{field_name}: expected a mapping of teacher layer index to array, got {type(value).__name__}"
        )
    checked: dict[int, np.ndarray] = {}
    for layer, raw_array in value.items():
        name = f"{field_name}[{layer!r}]"
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
            raise WireError(f"{name}: keys must be non-negative teacher layer indices, not negative offsets")
        array = _as_float_array(raw_array, name, allowed=(np.float16,), fallback=np.float16)
        _require_shape(array, name, shape, meaning)
        checked[int(layer)] = array
    return dict(sorted(checked.items()))


def _set(instance: object, name: str, value: Any) -> None:
    # Frozen dataclasses may still normalise their own fields during __post_init__.
    object.__setattr__(instance, name, value)


# --------------------------------------------------------------------------- #
# Encoding
# --------------------------------------------------------------------------- #

Message = Union[WorkBatch, Knowledge]


def encode(msg: Message) -> bytes:
    if isinstance(msg, WorkBatch):
        body = {"kind": KIND_WORK, **_work_body(msg)}
    elif isinstance(msg, Knowledge):
        body = {"kind": KIND_KNOWLEDGE, **_knowledge_body(msg)}
    else:
        raise TypeError(f"encode() takes a WorkBatch or Knowledge, got {type(msg).__name__}")
    data = msgpack.packb({"v": SCHEMA_VERSION, **body}, use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError(
            f"a {body['kind']} message of {len(data):,} bytes exceeds the limit of {MAX_MESSAGE_BYTES:,} bytes: "
            "use smaller batches (training.batch_size), fewer hidden/attention layers, or top-k soft labels "
            "(distill.top_k)"
        )
    return data


def _pack_array(array: np.ndarray) -> dict[str, Any]:
    # The wire is little-endian; on x86/ARM hosts this is a no-op.
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    contiguous = np.ascontiguousarray(little)
    # msgpack packs any C-contiguous buffer directly, avoiding a tobytes() copy.
    return {
        "dtype": contiguous.dtype.name,
        "shape": list(contiguous.shape),
        "raw": memoryview(contiguous),
    }


def _pack_optional(array: np.ndarray | None) -> dict[str, Any] | None:
    return None if array is None else _pack_array(array)


def _work_body(work: WorkBatch) -> dict[str, Any]:
    return {
        "job_id": work.job_id,
        "epoch": work.epoch,
        "batch_id": work.batch_id,
        "sample_ids": _pack_array(work.sample_ids),
        "languages": list(work.languages),
        "input_ids": _pack_array(work.input_ids),
        "attention_mask": _pack_array(work.attention_mask),
        "labels": _pack_optional(work.labels),
        "pair_input_ids": _pack_optional(work.pair_input_ids),
        "pair_attention_mask": _pack_optional(work.pair_attention_mask),
        "token_labels": _pack_optional(work.token_labels),
        "student_input_ids": _pack_optional(work.student_input_ids),
        "student_attention_mask": _pack_optional(work.student_attention_mask),
        "task": work.task,
    }


def _soft_body(soft: SoftLabels | None) -> dict[str, Any] | None:
    if soft is None:
        return None
    if soft.kind == SOFT_FULL:
        return {"kind": SOFT_FULL, "logits": _pack_array(soft.logits)}
    return {
        "kind": SOFT_TOPK,
        "values": _pack_array(soft.topk_values),
        "indices": _pack_array(soft.topk_indices),
        "logsumexp": _pack_array(soft.topk_logsumexp),
    }


def _knowledge_body(knowledge: Knowledge) -> dict[str, Any]:
    # Layer maps travel as [layer, array] pairs: integer map keys would force
    # readers to turn off msgpack's strict_map_key hash-flooding guard.
    return {
        "work": _work_body(knowledge.work),
        "teacher_id": knowledge.teacher_id,
        "soft": _soft_body(knowledge.soft),
        "hidden_states": [[layer, _pack_array(a)] for layer, a in knowledge.hidden_states.items()],
        "attentions": [[layer, _pack_array(a)] for layer, a in knowledge.attentions.items()],
        "embeddings": _pack_optional(knowledge.embeddings),
        "teacher_seconds": knowledge.teacher_seconds,
        "target_ids": _pack_optional(knowledge.target_ids),
        "ensemble": [{"teacher": vote.teacher, "logits": _pack_array(vote.logits), "served": _pack_array(vote.served)}
                     for vote in knowledge.ensemble],
    }


# --------------------------------------------------------------------------- #
# Decoding
# --------------------------------------------------------------------------- #


def decode(data: bytes) -> Message:
    """Decode one message; raise WireError (dead-letter it) if it is not valid."""
    if len(data) > MAX_MESSAGE_BYTES:
        # Checked before unpacking, so a hostile or broken peer cannot make us allocate without bound.
        raise WireError(f"message of {len(data):,} bytes exceeds the limit of {MAX_MESSAGE_BYTES:,} bytes")
    try:
        top = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # ValueError covers ExtraData, FormatError, StackError and bad UTF-8.
        raise WireError(f"not a msgpack message ({type(exc).__name__}: {exc})") from exc
    if not isinstance(top, dict):
        raise WireError(f"expected a msgpack map at the top level, got {type(top).__name__}")

    version = _get(top, "v", int, "message")
    if version > SCHEMA_VERSION:
        raise WireVersionError(
            f"message uses wire schema version {version}, but this build of polydistill reads "
            f"versions up to {SCHEMA_VERSION}; upgrade polydistill on the reading side"
        )
    if version < 1:
        raise WireError(f"message.v: expected a schema version >= 1, got {version}")

    kind = _get(top, "kind", str, "message")
    reader = _READERS.get(kind)
    if reader is None:
        raise WireError(f"message.kind: unknown kind {kind!r} (expected one of {sorted(_READERS)})")
    return reader(top, kind)


_MISSING = object()


def _get(
    body: dict, key: str, types: type | tuple[type, ...], where: str, *, optional: bool = False
) -> Any:
    value = body.get(key, _MISSING)
    if value is _MISSING:
        raise WireError(f"{where}.{key}: missing")
    if value is None and optional:
        return None
    # msgpack yields bool for true/false; keep it out of integer fields.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise WireError(f"{where}.{key}: expected {_type_names(types)}, got {type(value).__name__}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(types))


def _get_array(body: dict, key: str, where: str, *, optional: bool = False) -> np.ndarray | None:
    packed = _get(body, key, dict, where, optional=optional)
    return None if packed is None else _unpack_array(packed, f"{where}.{key}")


def _unpack_array(packed: Any, where: str) -> np.ndarray:
    if not isinstance(packed, dict):
        raise WireError(f"{where}: expected an array map, got {type(packed).__name__}")
    dtype_name = _get(packed, "dtype", str, where)
    shape = _get(packed, "shape", list, where)
    raw = _get(packed, "raw", bytes, where)
    if dtype_name not in _WIRE_DTYPES:
        raise WireError(
            f"{where}.dtype: {dtype_name!r} is not a wire dtype (allowed: {sorted(_WIRE_DTYPES)})"
        )
    if not all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape):
        raise WireError(f"{where}.shape: expected non-negative integers, got {shape!r}")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected_bytes:
        raise WireError(
            f"{where}.raw: {len(raw)} bytes, but shape {shape} of {dtype_name} needs "
            f"{expected_bytes} (truncated?)"
        )
    # A read-only view on the unpacked bytes: no copy of the payload.
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _read_work_body(body: dict, where: str) -> WorkBatch:
    languages = _get(body, "languages", list, where)
    return WorkBatch(
        job_id=_get(body, "job_id", str, where),
        epoch=_get(body, "epoch", int, where),
        batch_id=_get(body, "batch_id", int, where),
        sample_ids=_get_array(body, "sample_ids", where),
        languages=tuple(languages),
        input_ids=_get_array(body, "input_ids", where),
        attention_mask=_get_array(body, "attention_mask", where),
        labels=_get_array(body, "labels", where, optional=True),
        pair_input_ids=_get_array(body, "pair_input_ids", where, optional=True),
        pair_attention_mask=_get_array(body, "pair_attention_mask", where, optional=True),
        token_labels=_get_array(body, "token_labels", where, optional=True),
        student_input_ids=_get_array(body, "student_input_ids", where, optional=True),
        student_attention_mask=_get_array(body, "student_attention_mask", where, optional=True),
        task=_get(body, "task", str, where, optional=True),
    )


def _read_work(top: dict, kind: str) -> WorkBatch:
    return _read_work_body(top, kind)


def _read_soft(body: dict, where: str) -> SoftLabels | None:
    soft = _get(body, "soft", dict, where, optional=True)
    if soft is None:
        return None
    where = f"{where}.soft"
    soft_kind = _get(soft, "kind", str, where)
    if soft_kind == SOFT_FULL:
        return SoftLabels(logits=_get_array(soft, "logits", where))
    if soft_kind == SOFT_TOPK:
        return SoftLabels(
            topk_values=_get_array(soft, "values", where),
            topk_indices=_get_array(soft, "indices", where),
            topk_logsumexp=_get_array(soft, "logsumexp", where),
        )
    raise WireError(
        f"{where}.kind: unknown soft-label kind {soft_kind!r} (expected '{SOFT_FULL}' or '{SOFT_TOPK}')"
    )


def _read_layers(body: dict, key: str, where: str) -> dict[int, np.ndarray]:
    pairs = _get(body, key, list, where)
    layers: dict[int, np.ndarray] = {}
    for position, pair in enumerate(pairs):
        name = f"{where}.{key}[{position}]"
        is_pair = isinstance(pair, list) and len(pair) == 2
        if not (is_pair and isinstance(pair[0], int) and not isinstance(pair[0], bool)):
            raise WireError(f"{name}: expected a [layer index, array] pair")
        if pair[0] in layers:
            raise WireError(f"{name}: layer {pair[0]} appears twice")
        layers[pair[0]] = _unpack_array(pair[1], name)
    return layers


def _read_knowledge(top: dict, kind: str) -> Knowledge:
    return Knowledge(
        work=_read_work_body(_get(top, "work", dict, kind), f"{kind}.work"),
        teacher_id=_get(top, "teacher_id", str, kind),
        soft=_read_soft(top, kind),
        hidden_states=_read_layers(top, "hidden_states", kind),
        attentions=_read_layers(top, "attentions", kind),
        embeddings=_get_array(top, "embeddings", kind, optional=True),
        teacher_seconds=_get(top, "teacher_seconds", (int, float), kind),
        ensemble=_read_votes(top, kind),
        target_ids=_get_array(top, "target_ids", kind, optional=True),
    )


def _read_votes(top: dict, kind: str) -> tuple[TeacherVote, ...]:
    votes = _get(top, "ensemble", list, kind, optional=True) or []
    read = []
    for position, vote in enumerate(votes):
        where = f"{kind}.ensemble[{position}]"
        if not isinstance(vote, dict):
            raise WireError(f"{where}: expected a map, got {type(vote).__name__}")
        read.append(TeacherVote(teacher=_get(vote, "teacher", str, where), logits=_get_array(vote, "logits", where),
                                served=_get_array(vote, "served", where)))
    return tuple(read)


_READERS: dict[str, Callable[[dict, str], Message]] = {
    KIND_WORK: _read_work,
    KIND_KNOWLEDGE: _read_knowledge,
}
