"""The knowledge cache: a teacher's knowledge about every training sample, on disk.

A teacher's output for a sample does not change between epochs, jobs or students, so a job can
keep what its teachers computed and serve later epochs, later jobs and other students from disk
with no teacher at all. The cache is keyed by a content hash of everything the knowledge depends
on (``cache_key``): the teacher's files (weights, config, tokenizer), the knowledge contract (which
layers, top-k, inference dtype) and the tokenised training rows. Change any of them and the key,
so the cache, is new.

Layout of ``<root>/``::

    <key>.plan.npz        the samples a cache of that key holds (``CachePlan``): each training sample's id
                          and the hash of its input ids, written by the feeder for the cache's writer
    <key>/shard-00000.bin records: u32 length + one record (``encode_record``): the sample's id, the hash
          ...             of its input ids, the cache key, and its wire-encoded 1-sample Knowledge, trimmed
                          to the sample's real tokens (so it pads into any batch of any epoch)
    <key>/index.npz       sample id -> (shard, offset, length) and each record's SHA-256
    <key>/manifest.json   the key's parts, the record count and a digest over every record's id and
                          SHA-256 (the seal); written last, so its presence means complete

What makes a cache trustworthy, since later jobs read it with no teacher to compare against:

- the writer keeps only knowledge of the plan's samples, computed from the plan's input ids
  (a message about another sample, or about a window of a sample's tokens, is refused, not counted);
- opening a sealed cache checks its seal: the key, the record count and the digest over the index;
- reading a record checks its SHA-256 against the index, then that it names the sample asked for,
  this cache's key, and the input ids of the batch it is served into.

A failed check raises ``CacheError`` naming the sample and the folder to delete: a cache that is
not what the teacher produced is never served, and never quietly patched up either.

A cache is written into ``<key>.partial-<pid>/`` and renamed into place once every sample is in
it; a crash leaves a partial folder that is never read. Writing holds one open shard and the
index (a few integers and a digest a sample) in memory, whatever the size of the data.

Which parts of a batch belong to a sample, and how records join into a batch again, follows from
the wire declaration (storage/schema.py), so every field of ``wire.Knowledge`` is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from polydistill.storage import schema, wire
from polydistill.storage.wire_codec import WireCodec
from polydistill.storage.masking import IGNORE

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INDEX = "index.npz"
PLAN_SUFFIX = ".plan.npz"
SHARD_BYTES = 256 * 1024 * 1024
_LENGTH = struct.Struct("<I")
CACHE_FORMAT = 2  # 2: records carry their sample, input hash and key; the seal a digest
INPUT_HASH_BYTES = 16
RECORD_DIGEST_BYTES = 32  # SHA-256
# The batch fields a record has no use for: which job, epoch and batch its sample was first seen in.
_RECORD_JOB_ID = "cache"
# Rejections logged one by one; beyond these the writer's summary counts them.
_REJECTIONS_LOGGED = 20


class CacheError(RuntimeError):
    """A cache on disk does not fit the batch it was asked for, or is not what its teacher produced."""


@dataclass(frozen=True)
class CacheKey:
    teacher: str  # content hash of the teacher's files
    contract: str  # what ships per sample, as canonical JSON
    data: str  # hash of the tokenised training rows

    @property
    def digest(self) -> str:
        parts = json.dumps({"format": CACHE_FORMAT, "wire": wire.SCHEMA_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(parts.encode()).hexdigest()[:32]


def hash_files(folder: Path) -> str:
    """Content hash of every file under ``folder`` (names and bytes, in a stable order)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def hash_rows(sample_ids: np.ndarray, token_ids: list[np.ndarray]) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(sample_ids, dtype=np.int64).tobytes())
    for row in token_ids:
        digest.update(np.ascontiguousarray(row, dtype=np.int32).tobytes())
        digest.update(b"\xff\xff\xff\xff")  # row separator: [1, 2][3] must differ from [1][2, 3]
    return digest.hexdigest()


def input_hash(token_ids: np.ndarray) -> bytes:
    """Hash of one sample's real input ids: what its knowledge was computed from."""
    tokens = np.ascontiguousarray(token_ids, dtype="<i4").tobytes()
    return hashlib.blake2b(tokens, digest_size=INPUT_HASH_BYTES).digest()


def contract_fingerprint(request: object, top_k: int | None, inference_dtype: str, codec: WireCodec) -> str:
    """What the cached knowledge depends on besides the teacher and the rows: the records hold it as the
    teachers sent it, packed by the job's codec."""
    return json.dumps({"request": asdict(request), "top_k": top_k, "dtype": inference_dtype,
                       "codec": asdict(codec)}, sort_keys=True)


# -- the plan: which samples a cache holds ------------------------------------------------------

@dataclass(frozen=True, eq=False)
class CachePlan:
    """The samples a cache of one key holds: their ids, ascending, and the hash of each one's input ids."""

    sample_ids: np.ndarray  # int64 [n], ascending, no repeats
    input_hashes: np.ndarray  # uint8 [n, INPUT_HASH_BYTES]

    def __post_init__(self) -> None:
        ids = self.sample_ids
        if ids.ndim != 1 or (ids.size > 1 and not (np.diff(ids) > 0).all()):
            raise ValueError("a cache plan's sample ids must be one ascending list without repeats")
        if self.input_hashes.shape != (len(ids), INPUT_HASH_BYTES):
            raise ValueError(f"a cache plan needs one {INPUT_HASH_BYTES}-byte input hash per sample")

    @classmethod
    def of_rows(cls, sample_ids: np.ndarray, token_ids: list[np.ndarray]) -> CachePlan:
        """The plan of a training split: each row's sample id and real input ids."""
        order = np.argsort(sample_ids, kind="stable")
        ids = np.asarray(sample_ids, dtype=np.int64)[order]
        if ids.size > 1 and not (np.diff(ids) > 0).all():
            raise ValueError("the training rows repeat a sample id; the knowledge cache keeps one record per sample")
        hashes = np.frombuffer(b"".join(input_hash(token_ids[i]) for i in order.tolist()), dtype=np.uint8)
        return cls(ids, hashes.reshape(len(ids), INPUT_HASH_BYTES))

    def __len__(self) -> int:
        return len(self.sample_ids)

    def input_hash_of(self, sample_id: int) -> bytes | None:
        """The hash of the sample's input ids; None when the sample is not in the plan."""
        at = int(np.searchsorted(self.sample_ids, sample_id))
        if at == len(self.sample_ids) or int(self.sample_ids[at]) != sample_id:
            return None
        return self.input_hashes[at].tobytes()

    def save(self, path: Path) -> None:
        """Writes the plan next to the cache, replacing any earlier copy in one rename."""
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        with partial.open("wb") as handle:
            np.savez(handle, sample_ids=self.sample_ids, input_hashes=self.input_hashes)
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> CachePlan:
        try:
            with np.load(path) as saved:
                return cls(saved["sample_ids"], saved["input_hashes"])
        except FileNotFoundError:
            raise CacheError(f"no cache plan at {path}: the feeder writes it (Feeder.cache_state) before the "
                             "cache writer starts") from None


def plan_path(root: Path, key: CacheKey) -> Path:
    return Path(root) / f"{key.digest}{PLAN_SUFFIX}"


# -- records ------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Record:
    """One sample's entry in the cache: whose knowledge it is, from which input ids, for which key."""

    sample_id: int
    input_hash: bytes
    key: str  # the cache key's digest
    knowledge: wire.Knowledge  # of this one sample, cut to its real tokens


def encode_record(record: Record) -> bytes:
    return msgpack.packb({"sample": record.sample_id, "input": record.input_hash, "key": record.key,
                          "knowledge": wire.encode(record.knowledge)}, use_bin_type=True)


def decode_record(data: bytes) -> Record:
    """The record in ``data``; CacheError when it is not one."""
    try:
        body = msgpack.unpackb(data, raw=False)
        knowledge = wire.decode(body["knowledge"])
        record = Record(int(body["sample"]), bytes(body["input"]), str(body["key"]), knowledge)
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        raise CacheError(f"not a cache record ({type(exc).__name__}: {exc})") from None
    if not isinstance(record.knowledge, wire.Knowledge):
        raise CacheError("not a cache record (its knowledge is a work batch)")
    return record


def _records_digest(sample_ids: np.ndarray, digests: np.ndarray) -> str:
    """The seal's digest: over every record's sample id (8 bytes, little-endian) and SHA-256, in the
    index's order."""
    ids = np.ascontiguousarray(sample_ids, dtype="<i8").view(np.uint8).reshape(-1, 8)
    return hashlib.sha256(np.concatenate([ids, np.asarray(digests, dtype=np.uint8)], axis=1).tobytes()).hexdigest()


# -- splitting and joining batches --------------------------------------------------------------
#
# Every field of a message holds the batch's rows on its first axis (storage/schema.py), so a sample is
# its row of each. A record keeps that row cut to the sample's real tokens along the axes that run
# along the input's tokens, and a batch pads them back to its own length. The declaration marks those
# axes for arrays that run along the tokens on their second axis (``per_token_ndim``); two facts of
# wire.Knowledge it does not record are named here: attention maps [n, heads, L, L] run along the
# tokens twice, and with decoder targets (``target_ids``) the per-token soft labels run along the
# target, not along the input, so they and the targets keep their width and pad to the widest
# (targets with IGNORE, "no token", as the wire defines them).

_KNOWLEDGE_SPECS = dict(schema.declared_fields(wire.Knowledge))
_ATTENTION_SPEC = _KNOWLEDGE_SPECS["attentions"]
_ATTENTION_TOKEN_AXES = (2, 3)
_TARGET_SPEC = _KNOWLEDGE_SPECS["target_ids"]


def _input_token_axes(spec: schema.Spec, array: np.ndarray, along_input: bool) -> tuple[int, ...]:
    if spec is _ATTENTION_SPEC:
        return _ATTENTION_TOKEN_AXES
    return (1,) if along_input and spec.runs_along_tokens(array) else ()


def _runs_along_input(knowledge: wire.Knowledge, spec: schema.Spec) -> bool:
    """Whether a nested message of ``knowledge`` runs along the input (not the soft labels of a decoder)."""
    return not (spec.message is wire.SoftLabels and knowledge.target_ids is not None)


def split_samples(knowledge: wire.Knowledge) -> list[tuple[int, wire.Knowledge]]:
    """One 1-sample Knowledge per sample of a batch, cut to the sample's real tokens."""
    work = knowledge.work
    lengths = work.attention_mask.sum(axis=1).tolist()
    out = []
    for row, sample_id in enumerate(work.sample_ids.tolist()):
        fields = {name: _sample_value(getattr(knowledge, name), spec, row, int(lengths[row]),
                                      _runs_along_input(knowledge, spec))
                  for name, spec in schema.declared_fields(wire.Knowledge)}
        # Alignment targets come from the live work batch a cached batch is joined to, never from a record.
        fields["work"] = dataclasses.replace(fields["work"], job_id=_RECORD_JOB_ID, epoch=0, batch_id=0,
                                             align_targets=None, align_found=None)
        out.append((sample_id, wire.Knowledge(**{**fields, "teacher_seconds": 0.0})))
    return out


def _sample_fields(message: Any, row: int, length: int, along_input: bool) -> dict:
    return {name: _sample_value(getattr(message, name), spec, row, length, along_input)
            for name, spec in schema.declared_fields(type(message))}


def _sample_value(value: Any, spec: schema.Spec, row: int, length: int, along_input: bool) -> Any:
    kind = spec.kind
    if value is None or kind in schema.SHARED_KINDS:
        return value
    if kind is schema.Kind.MESSAGE:
        return type(value)(**_sample_fields(value, row, length, along_input))
    if kind is schema.Kind.MESSAGES:
        return tuple(type(item)(**_sample_fields(item, row, length, along_input)) for item in value)
    if kind is schema.Kind.TEXTS:
        return value[row : row + 1]
    if kind is schema.Kind.LAYERS:
        return {layer: _sample_array(array, spec, row, length, along_input) for layer, array in value.items()}
    return _sample_array(value, spec, row, length, along_input)


def _sample_array(array: np.ndarray, spec: schema.Spec, row: int, length: int, along_input: bool) -> np.ndarray:
    token_axes = _input_token_axes(spec, array, along_input)
    cut = tuple(slice(0, length) if axis in token_axes else slice(None) for axis in range(1, array.ndim))
    return array[(slice(row, row + 1), *cut)]


def join_samples(work: wire.WorkBatch, samples: list[wire.Knowledge], teacher_id: str = "cache") -> wire.Knowledge:
    """The batch's knowledge from its samples' records, padded to the batch's length.

    CacheError when a record was computed for other tokens than the batch holds, or when the records
    disagree on what they carry (which layers, which soft labels, which teachers)."""
    lengths = work.attention_mask.sum(axis=1).tolist()
    for i, sample in enumerate(samples):
        length = int(lengths[i])
        if sample.work.seq_len != length or not np.array_equal(sample.work.input_ids[0], work.input_ids[i, :length]):
            raise CacheError(f"the cached knowledge of sample {int(work.sample_ids[i])} was computed for other "
                             "tokens than this batch holds")
    first = samples[0]
    fields: dict[str, Any] = {"work": work, "teacher_id": teacher_id}
    for name, spec in schema.declared_fields(wire.Knowledge):
        if name in fields or spec.kind in schema.SHARED_KINDS:
            continue  # the batch's own work batch; numbers describe a batch, not its samples
        fields[name] = _join_value([getattr(sample, name) for sample in samples], spec, work.seq_len,
                                   _runs_along_input(first, spec), f"Knowledge.{name}")
    return wire.Knowledge(**fields)


def _join_value(values: list, spec: schema.Spec, width: int, along_input: bool, where: str) -> Any:
    kind, first = spec.kind, values[0]
    if kind in schema.SHARED_KINDS:
        _require_alike(values, where)
        return first
    if any(value is None for value in values):
        _require_alike([value is None for value in values], f"{where} (present or not)")
        return None
    if kind is schema.Kind.MESSAGE:
        return _join_message(values, width, along_input, where)
    if kind is schema.Kind.MESSAGES:
        _require_alike([len(value) for value in values], f"{where} (how many)")
        return tuple(_join_message(list(items), width, along_input, f"{where}[{position}]")
                     for position, items in enumerate(zip(*values)))
    if kind is schema.Kind.TEXTS:
        return tuple(text for value in values for text in value)
    if kind is schema.Kind.LAYERS:
        _require_alike([list(value) for value in values], f"{where} (which layers)")
        return {layer: _stack([value[layer] for value in values], spec, width, along_input, f"{where}[{layer}]")
                for layer in first}
    return _stack(values, spec, width, along_input, where)


def _join_message(messages: list, width: int, along_input: bool, where: str) -> Any:
    return type(messages[0])(**{name: _join_value([getattr(message, name) for message in messages], spec, width,
                                                  along_input, f"{where}.{name}")
                                for name, spec in schema.declared_fields(type(messages[0]))})


def _stack(rows: list[np.ndarray], spec: schema.Spec, width: int, along_input: bool, where: str) -> np.ndarray:
    """The records' rows as one array: axes along the input padded to the batch's width (positions its
    attention mask hides), any other axis that differs padded to the widest."""
    first = rows[0]
    _require_alike([(row.ndim, row.dtype.str) for row in rows], f"{where} (dtype and axes)")
    token_axes = _input_token_axes(spec, first, along_input)
    shape = [len(rows)] + [width if axis in token_axes else max(row.shape[axis] for row in rows)
                           for axis in range(1, first.ndim)]
    out = np.full(shape, IGNORE if spec is _TARGET_SPEC else 0, dtype=first.dtype)
    for i, row in enumerate(rows):
        out[(i, *(slice(0, size) for size in row.shape[1:]))] = row[0]
    return out


def _require_alike(values: list, where: str) -> None:
    for value in values[1:]:
        if value != values[0]:
            raise CacheError(f"the cached records of one batch disagree on {where}: {values[0]!r} and {value!r}")


# -- writing ------------------------------------------------------------------------------------

class CacheWriter:
    """Appends the records of the plan's samples to shards; ``seal`` publishes the cache once every
    sample of the plan is in."""

    def __init__(self, root: Path, key: CacheKey, plan: CachePlan):
        self.final = Path(root) / key.digest
        self.folder = Path(root) / f"{key.digest}.partial-{os.getpid()}"
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.key = key
        self.plan = plan
        self.index: dict[int, tuple[int, int, int, bytes]] = {}  # sample id -> shard, offset, length, SHA-256
        self.rejected = 0
        self.shard_no = 0
        self.offset = 0
        self.bytes_written = 0
        self.handle = self._open_shard()

    def _open_shard(self):
        return (self.folder / f"shard-{self.shard_no:05d}.bin").open("wb")

    @property
    def complete(self) -> bool:
        return len(self.index) == len(self.plan)

    def add(self, knowledge: wire.Knowledge) -> int:
        """Writes the batch's samples not written yet; returns how many were new. Knowledge of a sample
        outside the plan, or computed from other input ids than the plan's, is refused (logged, counted
        in ``rejected``): the first knowledge of a sample that the plan vouches for is the one kept."""
        new = 0
        for sample_id, sample in split_samples(knowledge):
            if sample_id in self.index:
                continue  # a re-fed or re-published batch
            tokens = input_hash(sample.work.input_ids[0])
            refusal = self._refusal(sample_id, tokens, sample)
            if refusal is not None:
                self._reject(sample_id, refusal, knowledge.teacher_id)
                continue
            self._write(sample_id, encode_record(Record(sample_id, tokens, self.key.digest, sample)))
            new += 1
        return new

    def _refusal(self, sample_id: int, tokens: bytes, sample: wire.Knowledge) -> str | None:
        planned = self.plan.input_hash_of(sample_id)
        if planned is None:
            return "it is not one of the training samples this cache is for"
        if planned != tokens:
            return (f"its knowledge was computed from {sample.work.seq_len} input tokens that are not the sample's "
                    "in the training data (a window of its tokens, or another text)")
        return None

    def _reject(self, sample_id: int, refusal: str, teacher_id: str) -> None:
        self.rejected += 1
        if self.rejected <= _REJECTIONS_LOGGED:
            log.warning("knowledge cache: not keeping the knowledge of sample %d from %s: %s%s", sample_id,
                        teacher_id, refusal, "" if self.rejected < _REJECTIONS_LOGGED else
                        " (further refusals are counted in the cache writer's records_rejected, not logged)")

    def _write(self, sample_id: int, record: bytes) -> None:
        if self.offset and self.offset + _LENGTH.size + len(record) > SHARD_BYTES:
            self.handle.close()
            self.shard_no, self.offset = self.shard_no + 1, 0
            self.handle = self._open_shard()
        self.handle.write(_LENGTH.pack(len(record)))
        self.handle.write(record)
        self.index[sample_id] = (self.shard_no, self.offset + _LENGTH.size, len(record),
                                 hashlib.sha256(record).digest())
        self.offset += _LENGTH.size + len(record)
        self.bytes_written += _LENGTH.size + len(record)

    def seal(self) -> Path:
        """Index, manifest (the seal: record count and digest), then one rename: readers see a complete
        cache or none."""
        self.handle.close()
        ids = np.array(sorted(self.index), dtype=np.int64)
        places = np.array([self.index[i][:3] for i in ids.tolist()], dtype=np.int64).reshape(-1, 3)
        digests = np.frombuffer(b"".join(self.index[i][3] for i in ids.tolist()), dtype=np.uint8)
        digests = digests.reshape(len(ids), RECORD_DIGEST_BYTES)
        np.savez(self.folder / INDEX, sample_ids=ids, places=places, digests=digests)
        manifest = {"format": CACHE_FORMAT, "key": self.key.digest, "parts": asdict(self.key),
                    "records": len(ids), "records_digest": _records_digest(ids, digests),
                    "bytes": self.bytes_written, "shards": self.shard_no + 1}
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        try:
            self.folder.rename(self.final)
        except OSError:
            if not is_complete(self.final):  # another job sealed the same key first: theirs is as good
                raise
            shutil.rmtree(self.folder, ignore_errors=True)
        return self.final

    def abandon(self) -> None:
        self.handle.close()
        shutil.rmtree(self.folder, ignore_errors=True)


# -- reading ------------------------------------------------------------------------------------

def is_complete(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


class CacheReader:
    """Serves a batch's knowledge from a complete cache of ``key``, checking its seal on opening and each
    record on reading (module docstring)."""

    def __init__(self, folder: Path, key: CacheKey):
        self.folder = Path(folder)
        self.key = key
        if not is_complete(self.folder):
            raise CacheError(f"{self.folder} is not a complete knowledge cache (no {MANIFEST})")
        try:
            self.manifest = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
            with np.load(self.folder / INDEX) as index:
                ids, places, digests = index["sample_ids"], index["places"], index["digests"]
        except (OSError, ValueError, KeyError) as exc:
            raise self._damaged(f"its manifest or index cannot be read ({exc})") from None
        if self.manifest.get("format") != CACHE_FORMAT or self.manifest.get("key") != key.digest:
            raise self._damaged(f"its manifest is for key {self.manifest.get('key')!r} (format "
                                f"{self.manifest.get('format')!r}), not this job's {key.digest!r}")
        if len(ids) != self.manifest.get("records") or _records_digest(ids, digests) != self.manifest.get(
                "records_digest"):
            raise self._damaged(f"its index ({len(ids)} records) does not match its seal "
                                f"({self.manifest.get('records')!r} records and their digest)")
        self.places = {int(i): (tuple(int(v) for v in place), digest.tobytes())
                       for i, place, digest in zip(ids, places, digests)}
        self._maps: dict[int, mmap.mmap] = {}

    def _damaged(self, what: str) -> CacheError:
        return CacheError(
            f"knowledge cache {self.folder}: {what}. It is not what this job's teacher produced (changed or "
            f"damaged on disk), so it is not used: delete the folder {self.folder} and run the job again, which "
            "then computes the knowledge with its teacher and writes a new cache"
        )

    def _shard(self, number: int) -> mmap.mmap:
        if number not in self._maps:
            with (self.folder / f"shard-{number:05d}.bin").open("rb") as handle:
                self._maps[number] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[number]

    def record(self, sample_id: int) -> Record:
        """The sample's record, checked against the index's digest, the sample id and the key."""
        try:
            (shard, offset, length), digest = self.places[sample_id]
        except KeyError:
            raise CacheError(f"sample {sample_id} is not in the knowledge cache {self.folder}") from None
        try:
            data = bytes(self._shard(shard)[offset : offset + length])
        except (OSError, ValueError) as exc:
            raise self._damaged(f"the record of sample {sample_id} cannot be read ({exc})") from None
        if hashlib.sha256(data).digest() != digest:
            raise self._damaged(f"the record of sample {sample_id} does not match its digest in the index")
        try:
            record = decode_record(data)
        except CacheError as exc:
            raise self._damaged(f"the record of sample {sample_id} is {exc}") from None
        if record.sample_id != sample_id or record.key != self.key.digest:
            raise self._damaged(f"the record filed under sample {sample_id} is sample {record.sample_id}'s of "
                                f"key {record.key!r}")
        return record

    def sample(self, sample_id: int) -> wire.Knowledge:
        return self.record(sample_id).knowledge

    def knowledge_for(self, work: wire.WorkBatch) -> wire.Knowledge:
        """The batch's knowledge from its samples' records, each checked against the batch's input ids."""
        lengths = work.attention_mask.sum(axis=1).tolist()
        samples = []
        for row, sample_id in enumerate(work.sample_ids.tolist()):
            record = self.record(sample_id)
            if record.input_hash != input_hash(work.input_ids[row, : int(lengths[row])]):
                raise self._damaged(f"the record of sample {sample_id} was computed from other input ids than the "
                                    "sample has in this job's data")
            samples.append(record.knowledge)
        try:
            return join_samples(work, samples)
        except CacheError as exc:
            raise self._damaged(str(exc)) from None

    def close(self) -> None:
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()
