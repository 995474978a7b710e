"""Causal-LM distillation: a random GPT-2 teacher ships per-token top-k soft labels, a smaller decoder
learns them (forward KL, reverse KL or generalised JSD) plus next-token cross-entropy on the text;
evaluated by perplexity per language. Knowledge over the message limit travels in chunks that the
student gathers into one step, with the accounting exact."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from polydistill.actors.teacher import TeacherReplica
from polydistill.cluster.config import ConfigError, load_config
from polydistill.cluster.driver import reset_job_streams, run_job
from polydistill.cluster.prepare import prepare_student, prepare_teacher
from polydistill.storage import wire
from polydistill.storage.chunking import chunk_tag
from polydistill.storage.job_data import load_job_split, pad_rows, pad_token_id, tokenize_split
from polydistill.student.contract import ContractError
from polydistill.student.trainer import StudentTrainer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_causal_lm.yaml"


def lm_config(tmp_path: Path, redis_url: str = "redis://127.0.0.1:1/0", *overrides: str):
    return load_config(EXAMPLE, [f"transport.redis_url={redis_url}", *overrides], output_dir=str(tmp_path))


# --------------------------------------------------------------------------- the whole job


def test_example_distils_in_chunks_with_exact_accounting(tmp_path, redis_server, local_ray):
    """The example, smaller, under a message limit below one batch's knowledge (about 5 KB of a ~200 KB
    batch): short batches travel as row ranges, long rows as token windows; every sample counts once."""
    config = lm_config(tmp_path / "out", redis_server.url, "data.languages=[eng_Latn, swh_Latn]",
                       "data.limit_per_language=96", "training.epochs=2", "evaluation.latency=false",
                       "distill.knowledge_message_bytes=6000")
    report = run_job(config, show_progress=False)

    assert report["samples_distilled"] == report["samples_expected"] == 2 * 2 * 96
    assert report["batches_applied"] == report["batches_expected"] == report["student_steps"] == 2 * 6
    assert report["duplicates_dropped"] == 0 and report["batches_missing"] == 0 and report["dead_letters"] == 0
    teachers = report["teachers"]
    assert sum(t["batches"] for t in teachers) == 12
    assert sum(t["messages"] for t in teachers) > 5 * 12  # every batch in several messages
    # Decoded, per token: 16 float32 logits, 16 int32 ids and a float32 log-sum-exp (132 bytes) beside the token's
    # id and mask (5 bytes; plus an 8-byte sample id a sample). On the wire the soft labels are packed
    # (distill.value_bits 16: 2 bytes a value, ids in as few bits as the vocabulary needs), framing included.
    parts = report["wire_bytes_per_sample_by_part"]
    assert parts["soft"] == pytest.approx(132 * (parts["work"] - 8) / 5, rel=1e-3)
    assert parts["work"] < report["wire_bytes_per_sample"] < parts["soft"] + parts["work"]
    assert {"soft", "hard"} <= set(report["loss_history"][-1])

    assert report["metric"] == "next-token accuracy"
    vocabulary = AutoTokenizer.from_pretrained(report["teacher_path"]).__len__()
    for language in ("eng_Latn", "swh_Latn"):
        row = report["per_language"][language]
        for model in ("teacher", "student"):
            scores = row[model]
            assert scores["n"] == 96 and scores["tokens"] > 96 * 5
            assert scores["perplexity"] == pytest.approx(np.exp(scores["nll"]))
            assert 0 <= scores["accuracy"] <= 1 and 0 <= scores["agreement"] <= 1
        assert row["teacher"]["agreement"] == 1.0
        # A random teacher is close to uniform over its vocabulary.
        assert 0.5 * vocabulary < row["teacher"]["perplexity"] < 2 * vocabulary
        assert row["student"]["perplexity"] < 2 * vocabulary
    student = AutoModelForCausalLM.from_pretrained(report["student_path"])
    assert isinstance(student, GPT2LMHeadModel) and student.config.n_layer == 1 and student.config.n_embd == 32
    assert student.config.vocab_size == vocabulary


def test_a_student_with_another_vocabulary_is_refused_before_anything_starts(tmp_path, redis_server):
    other = tmp_path / "other-student"
    GPT2LMHeadModel(GPT2Config(vocab_size=321, n_layer=1, n_embd=32, n_head=2, n_positions=64)).save_pretrained(other)
    config = lm_config(tmp_path / "out", redis_server.url, f"student.model={other}",
                       "data.languages=[eng_Latn]", "data.limit_per_language=20")
    with pytest.raises(ContractError, match=r"321 pieces.*student\.model.*tokenizer"):
        run_job(config, show_progress=False)  # the contract fails before any actor starts


def test_config_needs_top_k_and_refuses_what_causal_lm_cannot_use(tmp_path):
    with pytest.raises(ConfigError, match="needs distill.top_k"):
        lm_config(tmp_path, "redis://127.0.0.1:1/0", "distill.top_k=null")
    lm_config(tmp_path, "redis://127.0.0.1:1/0", "distill.top_k=null", "distill.soft_weight=0")  # nothing shipped
    for override, field in [("student.trim_vocabulary=true", "student.trim_vocabulary"),
                            ("data.label_column=category", "data.label_column"),
                            ("distill.hidden_layers=uniform", "distill.hidden_weight"),
                            ("evaluation.ablation=true", "evaluation.ablation"),
                            ("knowledge_cache.enabled=true", "knowledge_cache.enabled")]:
        extra = ["distill.hidden_weight=1"] if field == "distill.hidden_weight" else []
        with pytest.raises(ConfigError, match=f"{field} to 0/false/null"):
            lm_config(tmp_path, "redis://127.0.0.1:1/0", override, *extra)
    with pytest.raises(ConfigError, match="gjs_beta"):
        lm_config(tmp_path, "redis://127.0.0.1:1/0", "distill.lm_loss=gjs", "distill.gjs_beta=1.0")
    with pytest.raises(ConfigError, match="data.parallel"):
        lm_config(tmp_path, "redis://127.0.0.1:1/0", "data.parallel=true")


# --------------------------------------------------------------------------- teacher and student, no Ray


@pytest.fixture(scope="module")
def lm_models(tmp_path_factory):
    """A peaked random teacher (large initial weights: its next-token distributions are far from uniform,
    so there is something to learn) and the example's student, built as the driver builds them."""
    out = tmp_path_factory.mktemp("lm")
    config = lm_config(out, "redis://127.0.0.1:1/0", "data.languages=[eng_Latn, fra_Latn]",
                       "data.limit_per_language=16", "teacher.config.initializer_range=0.3")
    train = load_job_split(config.data, config.data.train_split)
    teacher_dir = prepare_teacher(config, out, train)
    init_dir, _ = prepare_student(config, teacher_dir, out, train)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    rows = tokenize_split(train.dataset, tokenizer, config.data.max_length)
    input_ids, attention_mask = pad_rows(rows.token_ids[:12], pad_token_id(tokenizer))
    work = wire.WorkBatch(job_id="lm-unit", epoch=0, batch_id=0, sample_ids=rows.sample_ids[:12],
                          languages=tuple(rows.languages[:12]), input_ids=input_ids, attention_mask=attention_mask)
    return out, teacher_dir, init_dir, work


def replica_and_student(out: Path, teacher_dir: Path, init_dir: Path, redis_url: str, *overrides: str, batches: int = 1):
    config = lm_config(out / "job", redis_url, "data.languages=[eng_Latn, fra_Latn]", "job_id=lm-unit",
                       "training.epochs=1", *overrides)
    teacher = TeacherReplica("teacher-0", config, str(teacher_dir), redis_url)
    student = StudentTrainer(config, str(init_dir), batches, redis_url, str(out / "student"))
    return config, teacher, student


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "gjs"])
def test_each_lm_loss_trains_the_student_towards_the_teacher(lm_models, loss):
    out, teacher_dir, init_dir, work = lm_models
    _, teacher, student = replica_and_student(out, teacher_dir, init_dir, "redis://127.0.0.1:1/0",
                                              f"distill.lm_loss={loss}", "distill.gjs_beta=0.3", batches=20)
    knowledge = teacher.compute(work)
    assert knowledge.soft.per_token and knowledge.soft.topk_values.shape == (*work.input_ids.shape, 16)
    first = student.step(knowledge)
    for _ in range(5):
        last = student.step(knowledge)
    assert {"soft", "hard", "total", "loss"} <= set(first)
    assert np.isfinite(first["loss"]) and first["soft"] > 0
    assert last["soft"] < first["soft"]


def test_a_batch_in_chunks_is_one_step_acknowledged_when_complete(lm_models, redis_server):
    out, teacher_dir, init_dir, work = lm_models
    config, teacher, student = replica_and_student(out, teacher_dir, init_dir, redis_server.url,
                                                   "distill.knowledge_message_bytes=4096")
    payloads = teacher.encode(teacher.compute(work))
    tags = [chunk_tag(wire.decode(payload)) for payload in payloads]
    assert len(payloads) > work.n_samples  # rows too long for 4 KB travel as token windows
    assert [tag.index for tag in tags] == list(range(1, len(payloads) + 1))

    keys, streams = reset_job_streams(config, redis_server.url)
    for payload in payloads:
        streams.add(keys.knowledge_stream, payload)
    entries = streams.read(keys.knowledge_stream, student.group, student.name, count=len(payloads), block_ms=0)
    random.Random(0).shuffle(entries)
    for position, (entry_id, payload) in enumerate(entries[:-1]):
        assert student.apply(entry_id, payload) is False
        if position == 0:  # delivered again (the student's own pending list): no effect
            assert student.apply(entry_id, payload) is False
        # Nothing acknowledged before the batch is complete: a student dying now leaves every chunk pending.
        assert streams.backlog(keys.knowledge_stream) == len(payloads)
    assert student.state.step == 0 and student.ledger.batches_applied == 0
    assert student.apply(*entries[-1]) is True
    assert student.state.step == 1 and student.ledger.samples_applied == work.n_samples
    assert student.ledger.complete and student.ledger.duplicates_dropped == 0
    assert streams.backlog(keys.knowledge_stream) == 0
    assert student.state.wire_bytes == sum(len(payload) for payload in payloads)
    # A late copy of a chunk of the applied batch is a duplicate, dropped.
    entry = streams.add(keys.knowledge_stream, payloads[0])
    assert student.apply(entry.encode(), payloads[0]) is False
    assert student.ledger.duplicates_dropped == 1 and student.state.step == 1
    streams.delete_job_keys()
