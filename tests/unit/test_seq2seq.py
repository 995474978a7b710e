"""Sequence-to-sequence pieces: the decoder targets built from references and from generated output,
the wire's target_ids (soft labels run along the target, not the source), chunking that keeps them,
the config's refusals, and what a translator's latency times."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from polydistill.cluster.config import ConfigError, validate_config
from polydistill.storage import wire
from polydistill.storage.chunking import knowledge_messages, merge_chunks
from polydistill.student.seq2seq import IGNORE, generated_targets, reference_targets

CLS, SEP, PAD = 2, 3, 0


def test_reference_targets_drop_the_decoder_start_and_mask_padding():
    pair = np.array([[CLS, 10, 11, SEP, PAD], [CLS, 12, SEP, PAD, PAD]])
    mask = (pair != PAD).astype(np.uint8)
    labels = reference_targets(pair, mask, decoder_start_id=CLS)
    np.testing.assert_array_equal(labels, [[10, 11, SEP], [12, SEP, IGNORE]])  # the all-padding column goes
    assert labels.flags.c_contiguous  # torch views it as labels.view(-1)
    # A tokenizer without a leading start token (T5, Marian) keeps every token.
    np.testing.assert_array_equal(reference_targets(np.array([[10, SEP]]), np.ones((1, 2)), CLS), [[10, SEP]])


def test_generated_targets_stop_after_the_first_end_token():
    generated = np.array([[CLS, 7, SEP, 9, 9], [CLS, 8, 8, 8, SEP], [CLS, 5, PAD, PAD, PAD]])
    labels = generated_targets(generated, decoder_start_id=CLS, eos_id=SEP, pad_id=PAD)
    np.testing.assert_array_equal(labels, [[7, SEP, IGNORE, IGNORE], [8, 8, 8, SEP], [5, IGNORE, IGNORE, IGNORE]])


def seq2seq_knowledge(n=6, source=5, target=3, k=4) -> wire.Knowledge:
    rng = np.random.default_rng(0)
    work = wire.WorkBatch(job_id="j", epoch=0, batch_id=1, sample_ids=np.arange(n), languages=("fra",) * n,
                          input_ids=rng.integers(5, 50, (n, source)).astype(np.int32),
                          attention_mask=np.ones((n, source), np.uint8),
                          pair_input_ids=rng.integers(5, 50, (n, target + 1)).astype(np.int32),
                          pair_attention_mask=np.ones((n, target + 1), np.uint8))
    soft = wire.SoftLabels(topk_values=rng.standard_normal((n, target, k)).astype(np.float32),
                           topk_indices=rng.integers(0, 50, (n, target, k)).astype(np.int32),
                           topk_logsumexp=rng.standard_normal((n, target)).astype(np.float32))
    return wire.Knowledge(work=work, teacher_id="teacher-0", soft=soft,
                          target_ids=rng.integers(5, 50, (n, target)).astype(np.int32))


def test_soft_labels_run_along_the_target():
    knowledge = seq2seq_knowledge()
    decoded = wire.decode(wire.encode(knowledge))
    np.testing.assert_array_equal(decoded.target_ids, knowledge.target_ids)
    with pytest.raises(wire.WireError, match="does not match the work batch"):
        wire.Knowledge(work=knowledge.work, teacher_id="t", soft=knowledge.soft)  # no target: source length 5


def test_chunks_of_a_translation_batch_keep_their_targets():
    knowledge = seq2seq_knowledge()
    messages = knowledge_messages(knowledge, limit=2400)
    assert len(messages) > 1
    merged = merge_chunks([wire.decode(message) for message in messages])
    np.testing.assert_array_equal(merged.target_ids, knowledge.target_ids)
    np.testing.assert_array_equal(merged.soft.topk_values, knowledge.soft.topk_values)


BASE = {"task": "seq2seq", "teacher": {"model": "random", "config": {"model_type": "bart"}},
        "data": {"path": "/t", "parallel": True, "label_column": None}, "distill": {"top_k": 8}}


@pytest.mark.parametrize("changes, message", [
    ({"distill": {"top_k": None}}, "needs distill.top_k"),
    ({"distill": {"top_k": 8, "soft_weight": 0, "hard_weight": 1}}, "learns from the data alone"),
    ({"student": {"trim_vocabulary": True}}, "student.trim_vocabulary"),
    ({"data": {"path": "/t", "label_column": None}}, "data.parallel: true, or neither"),
    ({"task": "sequence-classification", "data": {"path": "/t", "source_prefix": "<2{language}> "}},
     "data.source_prefix"),
])
def test_seq2seq_settings_are_checked(changes, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({**BASE, **changes})


def test_sequence_level_distillation_needs_no_soft_labels():
    config = validate_config({**BASE, "distill": {"soft_weight": 0, "hard_weight": 1, "seq2seq_target": "teacher"}})
    assert config.distill.seq2seq_target == "teacher"


def test_a_translators_latency_work_times_each_sampled_sentence_alone_and_32_of_them_in_one_call(tmp_path):
    from datasets import Dataset

    from polydistill.cluster.config import load_config
    from polydistill.storage.job_data import JobSplit
    from polydistill.student.task_kinds.base import HeldOut, ModelUnderTest
    from polydistill.student.task_kinds.seq2seq import evaluate_translations
    from tests.unit.test_translation_eval import EchoSeq2Seq, build_wordpiece_tokenizer

    config = load_config(Path(__file__).parents[2] / "examples" / "tiny_seq2seq.yaml")
    sources = [f"{word} {word}" for word in ("alpha", "beta", "gamma", "delta", "epsilon")]
    split = JobSplit(Dataset.from_dict({"sample_id": list(range(5)), "text": sources, "pair": sources,
                                        "language": ["fra", "fra", "deu", "deu", "deu"]}), [], {})
    model, folder = EchoSeq2Seq(), tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"x" * 10)
    tokenizer = build_wordpiece_tokenizer(tmp_path / "wordpiece")
    _, costs = evaluate_translations(HeldOut(config, split, []), ModelUnderTest(model, tokenizer, folder), None, True)

    assert costs.sizes["disk_bytes"] == 10 and costs.sizes["params"] == 1
    model.calls.clear()
    costs.latency_work["latency_ms_batch1"].run()
    assert [call["rows"] for call in model.calls] == [1] * 5  # every row of a 5-row split, alone
    assert costs.latency_work["latency_ms_batch1"].units == 5
    model.calls.clear()
    costs.latency_work["latency_ms_batch32"].run()
    assert [call["rows"] for call in model.calls] == [32]  # the 5 rows cycled to a batch of 32
