"""The knowledge cache: records cut to each sample's tokens, re-padded into any batch, every field of the
wire declaration kept; keys that change with any part of what the knowledge depends on; a partial cache
is never read; only the plan's samples are kept, and a record or seal changed on disk is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from polydistill.storage import schema, wire
from polydistill.storage.knowledge_cache import (
    INDEX,
    MANIFEST,
    CacheError,
    CacheKey,
    CachePlan,
    CacheReader,
    CacheWriter,
    Record,
    decode_record,
    encode_record,
    hash_files,
    hash_rows,
    input_hash,
    is_complete,
    join_samples,
    plan_path,
    split_samples,
)
from polydistill.storage.masking import IGNORE

LENGTHS = [5, 3, 7, 2]
HIDDEN, HEADS, CLASSES = 6, 2, 4
KEY = CacheKey(teacher="t", contract="c", data="d")


def tokens_of(sample_id: int) -> np.ndarray:
    return (np.arange(1, LENGTHS[sample_id] + 1) + 10 * sample_id).astype(np.int32)


PLAN = CachePlan.of_rows(np.arange(len(LENGTHS)), [tokens_of(i) for i in range(len(LENGTHS))])


def writer_for(root, sample_ids=range(len(LENGTHS))) -> CacheWriter:
    ids = list(sample_ids)
    return CacheWriter(root, KEY, CachePlan.of_rows(np.array(ids), [tokens_of(i) for i in ids]))


def batch_of(sample_ids: list[int], rng: np.random.Generator, per_token: bool = False) -> wire.Knowledge:
    """A batch with real tokens 1..len for each sample, random features, zeros in the padding."""
    lengths = [LENGTHS[i] for i in sample_ids]
    n, width = len(sample_ids), max(lengths)
    mask = np.zeros((n, width), np.uint8)
    ids = np.zeros((n, width), np.int32)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        ids[row, :length] = tokens_of(sample_ids[row])
    work = wire.WorkBatch(job_id="j", epoch=1, batch_id=3, sample_ids=np.array(sample_ids, np.int64),
                          languages=tuple("eng" for _ in sample_ids), input_ids=ids, attention_mask=mask)
    hidden = rng.standard_normal((n, width, HIDDEN)).astype(np.float16) * mask[..., None]
    attention = rng.random((n, HEADS, width, width)).astype(np.float16) * mask[:, None, :, None] * mask[:, None, None, :]
    logits_shape = (n, width, CLASSES) if per_token else (n, CLASSES)
    soft = wire.topk_soft_labels(rng.standard_normal(logits_shape).astype(np.float32), 2)
    if per_token:
        soft = wire.SoftLabels(topk_values=soft.topk_values * mask[..., None], topk_indices=soft.topk_indices * mask[..., None],
                               topk_logsumexp=soft.topk_logsumexp * mask)
    return wire.Knowledge(work=work, teacher_id="teacher-0", soft=soft, hidden_states={2: hidden},
                          attentions={1: attention}, embeddings=rng.standard_normal((n, HIDDEN)).astype(np.float16))


def by_sample(knowledge: wire.Knowledge) -> dict[int, wire.Knowledge]:
    return dict(split_samples(knowledge))


@pytest.mark.parametrize("per_token", [False, True], ids=["per-sequence", "per-token"])
def test_a_cached_epoch_re_pads_into_other_batches_exactly(tmp_path, per_token):
    rng = np.random.default_rng(0)
    first, second = batch_of([0, 1], rng, per_token), batch_of([2, 3], rng, per_token)
    writer = writer_for(tmp_path)
    assert writer.add(first) == 2 and not writer.complete
    assert writer.add(first) == 0  # a re-published batch adds nothing
    writer.add(second)
    assert writer.complete
    folder = writer.seal()
    assert is_complete(folder) and folder.name == KEY.digest

    # Another epoch mixes the samples differently: [3, 0, 2] pads to 7 tokens, not 5 or 7 as before.
    reader = CacheReader(folder, KEY)
    template = batch_of([3, 0, 2], rng, per_token).work
    served = reader.knowledge_for(template)
    expected = {**by_sample(first), **by_sample(second)}
    assert served.work is template and served.teacher_id == "cache"
    for row, sample_id in enumerate([3, 0, 2]):
        length = LENGTHS[sample_id]
        want = expected[sample_id]
        np.testing.assert_array_equal(served.hidden_states[2][row, :length], want.hidden_states[2][0])
        np.testing.assert_array_equal(served.attentions[1][row, :, :length, :length], want.attentions[1][0])
        np.testing.assert_array_equal(served.embeddings[row], want.embeddings[0])
        served_values = served.soft.topk_values[row, :length] if per_token else served.soft.topk_values[row]
        np.testing.assert_array_equal(served_values, want.soft.topk_values[0])
        assert not served.hidden_states[2][row, length:].any()  # padding is zeros, hidden by the mask
    reader.close()


def test_a_batch_with_other_tokens_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    writer = writer_for(tmp_path, [0, 1])
    writer.add(batch_of([0, 1], rng))
    reader = CacheReader(writer.seal(), KEY)
    other = batch_of([0, 1], rng).work
    other.input_ids[0, 0] += 1
    with pytest.raises(CacheError, match="record of sample 0 was computed from other input ids.*delete the folder"):
        reader.knowledge_for(other)
    with pytest.raises(CacheError, match="sample 3 is not in"):
        reader.sample(3)


def test_an_unsealed_cache_is_never_read(tmp_path):
    writer = writer_for(tmp_path, [0, 1])
    writer.add(batch_of([0, 1], np.random.default_rng(2)))
    assert not is_complete(tmp_path / KEY.digest)
    with pytest.raises(CacheError, match="not a complete knowledge cache"):
        CacheReader(writer.folder, KEY)
    writer.abandon()
    assert list(tmp_path.iterdir()) == []


def test_every_part_of_the_key_changes_the_cache(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"weights")
    before = hash_files(tmp_path / "teacher")
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"weightz")
    assert hash_files(tmp_path / "teacher") != before
    rows = [np.array([1, 2]), np.array([3])]
    assert hash_rows(np.arange(2), rows) != hash_rows(np.arange(2), [np.array([1]), np.array([2, 3])])
    assert hash_rows(np.arange(2), rows) != hash_rows(np.array([1, 0]), rows)
    digests = {KEY.digest, CacheKey("t2", "c", "d").digest, CacheKey("t", "c2", "d").digest,
               CacheKey("t", "c", "d2").digest}
    assert len(digests) == 4


# -- every field of the wire declaration --------------------------------------------------------

TARGET_LENGTHS = [4, 2, 3, 1]  # each sample's decoder target, then IGNORE


def full_batch(sample_ids: list[int], rng: np.random.Generator, target_width: int) -> wire.Knowledge:
    """A batch that sets every field wire.Knowledge declares: work extras, decoder targets with soft labels
    along them, several teachers' votes, hidden states, attention maps and embeddings."""
    base = batch_of(sample_ids, rng)
    n, width = base.work.n_samples, base.work.seq_len
    targets = np.full((n, target_width), IGNORE, np.int32)
    for row, sample_id in enumerate(sample_ids):
        targets[row, : TARGET_LENGTHS[sample_id]] = 100 + sample_id
    soft = wire.topk_soft_labels(rng.standard_normal((n, target_width, CLASSES)).astype(np.float32), 2)
    work = wire.WorkBatch(
        job_id="j", epoch=1, batch_id=3, sample_ids=base.work.sample_ids, languages=base.work.languages,
        input_ids=base.work.input_ids, attention_mask=base.work.attention_mask,
        labels=np.array(sample_ids, np.int64), token_labels=np.where(base.work.attention_mask, 7, IGNORE),
        pair_input_ids=np.full((n, 2), 5, np.int32), pair_attention_mask=np.ones((n, 2), np.uint8))
    votes = (wire.TeacherVote("a", rng.standard_normal((n, CLASSES)).astype(np.float32), np.ones(n, np.uint8)),
             wire.TeacherVote("b", rng.standard_normal((n, CLASSES)).astype(np.float32), np.zeros(n, np.uint8)))
    return wire.Knowledge(work=work, teacher_id="teacher-0", soft=soft, hidden_states=base.hidden_states,
                          attentions=base.attentions, embeddings=base.embeddings, ensemble=votes, target_ids=targets)


def test_every_declared_field_survives_a_split_and_a_join_into_another_batch():
    rng = np.random.default_rng(3)
    first, second = full_batch([0, 1], rng, target_width=4), full_batch([2, 3], rng, target_width=3)
    records = {**dict(split_samples(first)), **dict(split_samples(second))}
    record = records[2]  # 7 tokens, a target of 3: the input axes are cut, the target's are not
    assert record.attentions[1].shape == (1, HEADS, 7, 7) and record.hidden_states[2].shape == (1, 7, HIDDEN)
    assert record.target_ids.shape == (1, 3) and record.soft.topk_values.shape == (1, 3, 2)
    assert [vote.teacher for vote in record.ensemble] == ["a", "b"]

    order = [3, 0, 2]
    template = batch_of(order, rng).work  # pads to 7 tokens
    joined = join_samples(template, [records[i] for i in order])
    def carries(message, name):
        value = getattr(message, name)
        return value is not None and (not isinstance(value, (tuple, dict)) or len(value) > 0)

    per_sample = [name for name, spec in schema.declared_fields(wire.Knowledge) if spec.kind not in schema.SHARED_KINDS]
    assert all(carries(first, name) for name in per_sample)  # this batch sets every one of them
    assert all(carries(joined, name) for name in per_sample)
    # The targets pad to the widest (4) with IGNORE, the soft labels along them with zeros.
    assert joined.target_ids.tolist() == [[103, IGNORE, IGNORE, IGNORE], [100] * 4, [102] * 3 + [IGNORE]]
    for row, sample_id in enumerate(order):
        want, length = records[sample_id], LENGTHS[sample_id]
        target = want.target_ids.shape[1]
        np.testing.assert_array_equal(joined.attentions[1][row, :, :length, :length], want.attentions[1][0])
        assert not joined.attentions[1][row, :, length:].any() and not joined.attentions[1][row, :, :, length:].any()
        np.testing.assert_array_equal(joined.soft.topk_values[row, :target], want.soft.topk_values[0])
        assert not joined.soft.topk_values[row, target:].any()
        for vote, wanted in zip(joined.ensemble, want.ensemble):
            np.testing.assert_array_equal(vote.logits[row], wanted.logits[0])
            assert vote.served[row] == wanted.served[0]


def test_records_that_disagree_on_their_parts_are_refused():
    rng = np.random.default_rng(4)
    records = dict(split_samples(batch_of([0, 1], rng)))
    no_attention = dict(split_samples(wire.Knowledge(**{**vars(batch_of([2], rng)), "attentions": {}})))
    with pytest.raises(CacheError, match="disagree on Knowledge.attentions"):
        join_samples(batch_of([0, 2], rng).work, [records[0], no_attention[2]])


# -- integrity: the plan, the records, the seal ------------------------------------------------

def test_knowledge_of_samples_outside_the_plan_is_refused_and_not_counted(tmp_path, caplog):
    rng = np.random.default_rng(5)
    writer = writer_for(tmp_path, [0, 1])
    # Sample 2 is another job's, or a stale message's: it must neither be kept nor complete the cache.
    assert writer.add(batch_of([0, 2], rng)) == 1
    assert writer.rejected == 1 and not writer.complete and sorted(writer.index) == [0]
    assert "sample 2" in caplog.text and "not one of the training samples" in caplog.text
    writer.add(batch_of([1], rng))
    assert writer.complete
    reader = CacheReader(writer.seal(), KEY)
    with pytest.raises(CacheError, match="sample 2 is not in"):
        reader.sample(2)


def test_knowledge_computed_from_other_input_ids_is_refused(tmp_path):
    rng = np.random.default_rng(6)
    writer = writer_for(tmp_path, [0, 1])
    batch = batch_of([0, 1], rng)
    batch.work.input_ids[1, 0] += 1  # a window of the sample, or another text under its id
    assert writer.add(batch) == 1 and writer.rejected == 1 and sorted(writer.index) == [0]
    writer.add(batch_of([1], rng))  # the right knowledge later is kept: the first valid one wins
    assert writer.complete


def sealed_cache(tmp_path):
    writer = writer_for(tmp_path, [0, 1])
    writer.add(batch_of([0, 1], np.random.default_rng(7)))
    return writer.seal()


def test_a_record_changed_on_disk_is_refused_naming_the_sample_and_the_folder(tmp_path):
    folder = sealed_cache(tmp_path)
    shard = folder / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # inside the last record, sample 1's
    shard.write_bytes(bytes(data))
    reader = CacheReader(folder, KEY)  # the seal covers the index; each record is checked when read
    reader.sample(0)
    with pytest.raises(CacheError, match=f"record of sample 1 does not match its digest.*delete the folder {folder}"):
        reader.knowledge_for(batch_of([0, 1], np.random.default_rng(8)).work)


def test_a_record_filed_under_another_sample_is_refused(tmp_path):
    folder = sealed_cache(tmp_path)
    with np.load(folder / INDEX) as index:
        ids, places, digests = index["sample_ids"], index["places"].copy(), index["digests"].copy()
    places[[0, 1]], digests[[0, 1]] = places[[1, 0]], digests[[1, 0]]  # sample 0 served sample 1's record
    np.savez(folder / INDEX, sample_ids=ids, places=places, digests=digests)
    with pytest.raises(CacheError, match="does not match its seal"):
        CacheReader(folder, KEY)


@pytest.mark.parametrize("change, message", [
    (lambda manifest: {**manifest, "records": 3}, "does not match its seal"),
    (lambda manifest: {**manifest, "records_digest": "0" * 64}, "does not match its seal"),
    (lambda manifest: {**manifest, "key": "another"}, "not this job's"),
], ids=["record count", "digest", "key"])
def test_a_seal_that_does_not_hold_is_refused_on_opening(tmp_path, change, message):
    folder = sealed_cache(tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps(change(manifest)))
    with pytest.raises(CacheError, match=f"{message}.*delete the folder"):
        CacheReader(folder, KEY)


def test_a_cache_opened_for_another_key_is_refused(tmp_path):
    folder = sealed_cache(tmp_path)
    with pytest.raises(CacheError, match="not this job's"):
        CacheReader(folder, CacheKey("t", "another contract", "d"))


def test_records_carry_their_sample_input_hash_and_key():
    (sample_id, knowledge), = split_samples(batch_of([2], np.random.default_rng(9)))
    record = decode_record(encode_record(Record(sample_id, input_hash(tokens_of(2)), KEY.digest, knowledge)))
    assert (record.sample_id, record.input_hash, record.key) == (2, input_hash(tokens_of(2)), KEY.digest)
    np.testing.assert_array_equal(record.knowledge.work.input_ids[0], tokens_of(2))
    with pytest.raises(CacheError, match="not a cache record"):
        decode_record(b"\x93\x01\x02\x03")


def test_the_plan_lists_each_sample_once_and_survives_a_save(tmp_path):
    assert PLAN.input_hash_of(2) == input_hash(tokens_of(2)) and PLAN.input_hash_of(9) is None
    PLAN.save(plan_path(tmp_path, KEY))
    loaded = CachePlan.load(plan_path(tmp_path, KEY))
    assert loaded.sample_ids.tolist() == [0, 1, 2, 3] and loaded.input_hash_of(3) == input_hash(tokens_of(3))
    with pytest.raises(ValueError, match="repeat a sample id"):
        CachePlan.of_rows(np.array([1, 1]), [tokens_of(1), tokens_of(1)])
    with pytest.raises(CacheError, match="the feeder writes it"):
        CachePlan.load(tmp_path / "missing.plan.npz")
