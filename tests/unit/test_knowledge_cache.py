"""The knowledge cache: records cut to each sample's tokens, re-padded into any batch; keys that
change with any part of what the knowledge depends on; a partial cache is never read."""

from __future__ import annotations

import numpy as np
import pytest

from polydistill.storage import wire
from polydistill.storage.knowledge_cache import (
    CacheError,
    CacheKey,
    CacheReader,
    CacheWriter,
    hash_files,
    hash_rows,
    is_complete,
    split_samples,
)

LENGTHS = [5, 3, 7, 2]
HIDDEN, HEADS, CLASSES = 6, 2, 4
KEY = CacheKey(teacher="t", contract="c", data="d")


def batch_of(sample_ids: list[int], rng: np.random.Generator, per_token: bool = False) -> wire.Knowledge:
    """A batch with real tokens 1..len for each sample, random features, zeros in the padding."""
    lengths = [LENGTHS[i] for i in sample_ids]
    n, width = len(sample_ids), max(lengths)
    mask = np.zeros((n, width), np.uint8)
    ids = np.zeros((n, width), np.int32)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        ids[row, :length] = np.arange(1, length + 1) + 10 * sample_ids[row]
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
    writer = CacheWriter(tmp_path, KEY, expected_samples=4)
    assert writer.add(first) == 2 and not writer.complete
    assert writer.add(first) == 0  # a re-published batch adds nothing
    writer.add(second)
    assert writer.complete
    folder = writer.seal()
    assert is_complete(folder) and folder.name == KEY.digest

    # Another epoch mixes the samples differently: [3, 0, 2] pads to 7 tokens, not 5 or 7 as before.
    reader = CacheReader(folder)
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
    writer = CacheWriter(tmp_path, KEY, expected_samples=2)
    writer.add(batch_of([0, 1], rng))
    reader = CacheReader(writer.seal())
    other = batch_of([0, 1], rng).work
    other.input_ids[0, 0] += 1
    with pytest.raises(CacheError, match="other tokens"):
        reader.knowledge_for(other)
    with pytest.raises(CacheError, match="sample 3 is not in"):
        reader.sample(3)


def test_an_unsealed_cache_is_never_read(tmp_path):
    writer = CacheWriter(tmp_path, KEY, expected_samples=2)
    writer.add(batch_of([0, 1], np.random.default_rng(2)))
    assert not is_complete(tmp_path / KEY.digest)
    with pytest.raises(CacheError, match="not a complete knowledge cache"):
        CacheReader(writer.folder)
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
