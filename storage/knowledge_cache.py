"""The knowledge cache: a teacher's knowledge about every training sample, on disk.

A teacher's output for a sample does not change between epochs, jobs or students, so a job can
keep what its teachers computed and serve later epochs, later jobs and other students from disk
with no teacher at all. The cache is keyed by a content hash of everything the knowledge depends
on (``cache_key``): the teacher's files (weights, config, tokenizer), the knowledge contract (which
layers, top-k, inference dtype) and the tokenised training rows. Change any of them and the key,
so the cache, is new.

Layout of ``<root>/<key>/``::

    shard-00000.bin ...   records: u32 length + one wire-encoded 1-sample Knowledge, trimmed to
                          the sample's real tokens (so it pads into any batch of any epoch)
    index.npz             sample id -> (shard, offset, length)
    manifest.json         the key's parts and counts; written last, so its presence means complete

A cache is written into ``<key>.partial-<pid>/`` and renamed into place once every sample is in
it; a crash leaves a partial folder that is never read. Writing holds one open shard and the
index (three integers a sample) in memory, whatever the size of the data.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from polydistill.storage import wire

MANIFEST = "manifest.json"
INDEX = "index.npz"
SHARD_BYTES = 256 * 1024 * 1024
_LENGTH = struct.Struct("<I")
CACHE_FORMAT = 1


class CacheError(RuntimeError):
    """A cache on disk does not fit the batch it was asked for."""


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


def contract_fingerprint(request: object, top_k: int | None, inference_dtype: str) -> str:
    return json.dumps({"request": asdict(request), "top_k": top_k, "dtype": inference_dtype}, sort_keys=True)


# -- splitting and joining batches --------------------------------------------------------------

def split_samples(knowledge: wire.Knowledge) -> list[tuple[int, wire.Knowledge]]:
    """One 1-sample Knowledge per sample of a batch, cut to the sample's real tokens."""
    work = knowledge.work
    out = []
    for i, sample_id in enumerate(work.sample_ids.tolist()):
        length = int(work.attention_mask[i].sum())
        soft = knowledge.soft
        if soft is not None:
            soft = _slice_soft(soft, i, length)
        one = wire.WorkBatch(
            job_id="cache", epoch=0, batch_id=0, sample_ids=work.sample_ids[i : i + 1],
            languages=work.languages[i : i + 1], input_ids=work.input_ids[i : i + 1, :length],
            attention_mask=work.attention_mask[i : i + 1, :length],
        )
        out.append((sample_id, wire.Knowledge(
            work=one, teacher_id=knowledge.teacher_id, soft=soft,
            hidden_states={layer: array[i : i + 1, :length] for layer, array in knowledge.hidden_states.items()},
            attentions={layer: array[i : i + 1, :, :length, :length] for layer, array in knowledge.attentions.items()},
            embeddings=None if knowledge.embeddings is None else knowledge.embeddings[i : i + 1],
        )))
    return out


def _slice_soft(soft: wire.SoftLabels, i: int, length: int) -> wire.SoftLabels:
    cut = (slice(i, i + 1), slice(0, length)) if soft.per_token else (slice(i, i + 1),)
    if soft.logits is not None:
        return wire.SoftLabels(logits=soft.logits[cut])
    return wire.SoftLabels(topk_values=soft.topk_values[cut], topk_indices=soft.topk_indices[cut],
                           topk_logsumexp=soft.topk_logsumexp[cut])


def join_samples(work: wire.WorkBatch, samples: list[wire.Knowledge], teacher_id: str = "cache") -> wire.Knowledge:
    """The batch's knowledge from its samples' records, padded to the batch's length."""
    n, width = work.n_samples, work.seq_len
    for i, sample in enumerate(samples):
        length = int(work.attention_mask[i].sum())
        if sample.work.seq_len != length or not np.array_equal(sample.work.input_ids[0], work.input_ids[i, :length]):
            raise CacheError(
                f"cached knowledge of sample {int(work.sample_ids[i])} was computed for other tokens than this "
                "batch holds: the cache does not match this job's data (delete the cache folder)"
            )
    first = samples[0]
    soft = None if first.soft is None else _join_soft([s.soft for s in samples], n, width)
    hidden = {layer: _pad_rows([s.hidden_states[layer][0] for s in samples], (width,)) for layer in first.hidden_states}
    attentions = {layer: _pad_rows([s.attentions[layer][0] for s in samples], (None, width, width))
                  for layer in first.attentions}
    embeddings = None if first.embeddings is None else np.concatenate([s.embeddings for s in samples])
    return wire.Knowledge(work=work, teacher_id=teacher_id, soft=soft, hidden_states=hidden, attentions=attentions,
                          embeddings=embeddings)


def _pad_rows(rows: list[np.ndarray], shape: tuple) -> np.ndarray:
    """Stacks per-sample arrays, zero-padding the token axes (positions the attention mask hides)."""
    first = rows[0]
    target = [len(rows)]
    for axis, size in enumerate(first.shape):
        wanted = shape[axis] if axis < len(shape) and shape[axis] is not None else size
        target.append(wanted)
    out = np.zeros(target, dtype=first.dtype)
    for i, row in enumerate(rows):
        out[(i, *(slice(0, s) for s in row.shape))] = row
    return out


def _join_soft(parts: list[wire.SoftLabels], n: int, width: int) -> wire.SoftLabels:
    if not parts[0].per_token:
        if parts[0].logits is not None:
            return wire.SoftLabels(logits=np.concatenate([p.logits for p in parts]))
        return wire.SoftLabels(topk_values=np.concatenate([p.topk_values for p in parts]),
                               topk_indices=np.concatenate([p.topk_indices for p in parts]),
                               topk_logsumexp=np.concatenate([p.topk_logsumexp for p in parts]))
    if parts[0].logits is not None:
        return wire.SoftLabels(logits=_pad_rows([p.logits[0] for p in parts], (width,)))
    return wire.SoftLabels(topk_values=_pad_rows([p.topk_values[0] for p in parts], (width,)),
                           topk_indices=_pad_rows([p.topk_indices[0] for p in parts], (width,)),
                           topk_logsumexp=_pad_rows([p.topk_logsumexp[0] for p in parts], (width,)))


# -- writing ------------------------------------------------------------------------------------

class CacheWriter:
    """Appends sample records to shards; ``seal`` publishes the cache once every sample is in."""

    def __init__(self, root: Path, key: CacheKey, expected_samples: int):
        self.final = Path(root) / key.digest
        self.folder = Path(root) / f"{key.digest}.partial-{os.getpid()}"
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.key = key
        self.expected = expected_samples
        self.index: dict[int, tuple[int, int, int]] = {}
        self.shard_no = 0
        self.offset = 0
        self.bytes_written = 0
        self.handle = self._open_shard()

    def _open_shard(self):
        return (self.folder / f"shard-{self.shard_no:05d}.bin").open("wb")

    @property
    def complete(self) -> bool:
        return len(self.index) >= self.expected

    def add(self, knowledge: wire.Knowledge) -> int:
        """Writes the batch's samples not written yet; returns how many were new."""
        new = 0
        for sample_id, sample in split_samples(knowledge):
            if sample_id in self.index:
                continue  # a re-fed or re-published batch
            record = wire.encode(sample)
            if self.offset and self.offset + _LENGTH.size + len(record) > SHARD_BYTES:
                self.handle.close()
                self.shard_no, self.offset = self.shard_no + 1, 0
                self.handle = self._open_shard()
            self.handle.write(_LENGTH.pack(len(record)))
            self.handle.write(record)
            self.index[sample_id] = (self.shard_no, self.offset + _LENGTH.size, len(record))
            self.offset += _LENGTH.size + len(record)
            self.bytes_written += _LENGTH.size + len(record)
            new += 1
        return new

    def seal(self) -> Path:
        """Index, manifest, then one rename: readers see a complete cache or none."""
        self.handle.close()
        ids = np.fromiter(self.index, dtype=np.int64, count=len(self.index))
        places = np.array([self.index[i] for i in ids.tolist()], dtype=np.int64).reshape(-1, 3)
        np.savez(self.folder / INDEX, sample_ids=ids, places=places)
        manifest = {"format": CACHE_FORMAT, "key": self.key.digest, "parts": asdict(self.key),
                    "samples": len(ids), "bytes": self.bytes_written, "shards": self.shard_no + 1}
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
    """Serves a batch's knowledge from a complete cache."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not is_complete(self.folder):
            raise CacheError(f"{self.folder} is not a complete knowledge cache (no {MANIFEST})")
        self.manifest = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        with np.load(self.folder / INDEX) as index:
            ids, places = index["sample_ids"], index["places"]
        self.places = {int(i): tuple(int(v) for v in place) for i, place in zip(ids, places)}
        self._maps: dict[int, mmap.mmap] = {}

    def _shard(self, number: int) -> mmap.mmap:
        if number not in self._maps:
            with (self.folder / f"shard-{number:05d}.bin").open("rb") as handle:
                self._maps[number] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[number]

    def sample(self, sample_id: int) -> wire.Knowledge:
        try:
            shard, offset, length = self.places[sample_id]
        except KeyError:
            raise CacheError(f"sample {sample_id} is not in the knowledge cache {self.folder}") from None
        knowledge = wire.decode(bytes(self._shard(shard)[offset : offset + length]))
        assert isinstance(knowledge, wire.Knowledge)
        return knowledge

    def knowledge_for(self, work: wire.WorkBatch) -> wire.Knowledge:
        return join_samples(work, [self.sample(int(i)) for i in work.sample_ids])

    def close(self) -> None:
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()
