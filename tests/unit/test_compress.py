"""The distil → prune → recover → quantise chain on a tiny BERT gives one complete row per stage."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from polydistill.cluster.config import CompressStageConfig, DistillConfig, JobConfig, check_stages
from polydistill.storage import wire
from polydistill.storage.job_data import TokenizedSplit
from polydistill.student.compress import distillation_loss, finetune_with_loss, run_stages
from polydistill.student.scoring import quality
from polydistill.student.losses import soft_label_kl
from polydistill.student.objectives import distillation_losses
from polydistill.student.prune import make_batch
from polydistill.student.quantize import METHOD, METHOD_WITH_EMBEDDINGS, load_quantized

VOCAB, LABELS = 50, 3
ROW_KEYS = {"name", "params", "disk_bytes", "latency_ms_batch1", "latency_ms_batch32", "accuracy", "retention", "per_language"}


def stage(name: str, kind: str, **settings) -> CompressStageConfig:
    return CompressStageConfig(name=name, kind=kind, **settings)


def tiny_rows(n: int, seed: int) -> TokenizedSplit:
    rng = np.random.default_rng(seed)
    token_ids = [rng.integers(1, VOCAB, size=rng.integers(4, 10)).astype(np.int32) for _ in range(n)]
    return TokenizedSplit(
        sample_ids=np.arange(n, dtype=np.int64), token_ids=token_ids,
        labels=rng.integers(0, LABELS, size=n).astype(np.int64), languages=["en", "sw"] * (n // 2),
    )


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=LABELS)
    path = tmp_path_factory.mktemp("student")
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def test_run_stages_reports_every_stage(student_dir, tmp_path):
    train, evaluation = tiny_rows(32, seed=1), tiny_rows(16, seed=2)
    student = AutoModelForSequenceClassification.from_pretrained(student_dir)
    teacher_quality = quality(student, evaluation, 0, LABELS)  # the student as its own "teacher"
    cached_teacher_logits = torch.randn(len(train), LABELS, generator=torch.Generator().manual_seed(3))
    recover_losses = []

    def recover(model):
        recover_losses.extend(finetune_with_loss(
            model, train, 0, distillation_loss(cached_teacher_logits, DistillConfig(temperature=2.0, soft_weight=0.5, hard_weight=0.5)),
            epochs=1, batch_size=8, lr=1e-3, seed=0,
        ))

    stages = [
        stage("distil", "measure"),
        stage("prune", "prune", head_sparsity=0.25, ffn_sparsity=0.5, calibration_batches=2),
        stage("recover", "recover"),
        stage("int8", "quantize"),
    ]
    rows = run_stages(student_dir, stages, out_dir=tmp_path, calibration=train, eval_rows=evaluation, pad_id=0,
                      num_labels=LABELS, teacher_quality=teacher_quality, recover=recover)

    reports = [row.to_dict() for row in rows]
    assert [r["name"] for r in reports] == ["distil", "prune", "recover", "int8"]
    assert all(ROW_KEYS <= set(r) for r in reports)
    assert reports[0]["retention"] == 1.0
    assert set(reports[0]["per_language"]) == {"en", "sw"}
    assert all(lang["retention"] == 1.0 for lang in reports[0]["per_language"].values())
    assert reports[1]["params"] < reports[0]["params"] and reports[1]["disk_bytes"] < reports[0]["disk_bytes"]
    assert sum(reports[1]["details"]["heads_per_layer"]) == 6 and reports[1]["details"]["intermediate_size"] == 32
    assert len(recover_losses) == 4
    assert reports[3]["params"] == reports[2]["params"] and reports[3]["disk_bytes"] < reports[2]["disk_bytes"]
    assert all(r["latency_ms_batch1"] > 0 and r["latency_ms_batch32"] > 0 for r in reports)
    assert load_quantized(tmp_path / "int8") is not None
    assert reports[3]["details"]["method"] == METHOD_WITH_EMBEDDINGS  # embeddings: on by default
    assert reports[3]["details"]["embedding_modules"] == [
        "bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "recover")
    assert quality(reloaded, evaluation, 0, LABELS)["overall"]["accuracy"] == reports[2]["accuracy"]


def test_magnitude_zeros_survive_recovery(student_dir, tmp_path):
    rows = tiny_rows(16, seed=4)
    teacher_quality = quality(AutoModelForSequenceClassification.from_pretrained(student_dir), rows, 0, LABELS)

    def recover(model):
        finetune_with_loss(model, rows, 0, lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                                          labels=b["labels"]).loss,
                           epochs=1, batch_size=8, lr=1e-2, seed=0)

    stages = [stage("sparse", "magnitude", sparsity=0.5), stage("recover", "recover")]
    run_stages(student_dir, stages, out_dir=tmp_path, calibration=rows, eval_rows=rows, pad_id=0,
               num_labels=LABELS, teacher_quality=teacher_quality, recover=recover)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "recover")
    encoder = [m.weight for m in model.bert.encoder.modules() if isinstance(m, torch.nn.Linear)]
    zero_fraction = sum(int((w == 0).sum()) for w in encoder) / sum(w.numel() for w in encoder)
    assert zero_fraction == pytest.approx(0.5, abs=1e-3)


def test_quantize_stage_embeddings_option(student_dir, tmp_path):
    rows = tiny_rows(8, seed=5)
    teacher_quality = quality(AutoModelForSequenceClassification.from_pretrained(student_dir), rows, 0, LABELS)
    measured = {}
    for embeddings in (True, False):
        (row,) = run_stages(student_dir, [stage("int8", "quantize", embeddings=embeddings)],
                            out_dir=tmp_path / str(embeddings), calibration=rows, eval_rows=rows, pad_id=0,
                            num_labels=LABELS, teacher_quality=teacher_quality)
        measured[embeddings] = row
    assert measured[False].details["method"] == METHOD and measured[False].details["embedding_modules"] == []
    assert measured[True].details["method"] == METHOD_WITH_EMBEDDINGS
    # 50 + 32 + 2 rows of 32 floats: 3 bytes saved per weight, 8 bytes of scale and zero point added per row
    expected_saving = 84 * (3 * 32 - 8)
    assert measured[False].disk_bytes - measured[True].disk_bytes == pytest.approx(expected_saving, rel=0.3)
    assert measured[True].params == measured[False].params
    loaded = load_quantized(tmp_path / "False" / "int8")
    assert type(loaded.bert.embeddings.word_embeddings) is torch.nn.Embedding


def test_check_stages_says_what_to_change():
    with pytest.raises(ValueError, match="must be the last stage"):
        check_stages([stage("q", "quantize"), stage("m", "measure")], have_recover=False)
    with pytest.raises(ValueError, match="no recover function"):
        check_stages([stage("r", "recover")], have_recover=False)
    with pytest.raises(ValueError, match="unique"):
        check_stages([stage("a", "measure"), stage("a", "measure")], have_recover=False)


def test_distillation_loss_reads_the_rows_teacher_logits():
    rows = tiny_rows(8, seed=5)
    teacher = torch.randn(len(rows), LABELS)
    student_logits = torch.randn(3, LABELS)

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": student_logits})()

    batch = make_batch(rows, np.array([5, 0, 2]), pad_id=0)
    soft_only = DistillConfig(temperature=2.0, soft_weight=1.0, hard_weight=0.0)
    loss = distillation_loss(teacher, soft_only)(Fixed(), batch)
    torch.testing.assert_close(loss, soft_label_kl(student_logits, teacher[[5, 0, 2]], temperature=2.0))


def test_recovery_and_distillation_give_the_same_loss_for_the_same_logits():
    """One definition of the objective: compression's recovery loss and the trainer's, on the same
    student logits, teacher logits, labels and weights."""
    rows = tiny_rows(8, seed=6)
    teacher = torch.randn(len(rows), LABELS, generator=torch.Generator().manual_seed(7))
    student_logits = torch.randn(4, LABELS, generator=torch.Generator().manual_seed(8))
    index = np.array([1, 6, 3, 0])
    distill = DistillConfig(temperature=3.0, soft_weight=0.7, hard_weight=0.4)

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": student_logits})()

    batch = make_batch(rows, index, pad_id=0)
    recovery = distillation_loss(teacher, distill)(Fixed(), batch)
    knowledge = wire.Knowledge(
        work=wire.WorkBatch(job_id="j", epoch=0, batch_id=0, sample_ids=index.astype(np.int64),
                            languages=("eng",) * 4, input_ids=batch["input_ids"].numpy().astype(np.int32),
                            attention_mask=batch["attention_mask"].numpy().astype(np.int32),
                            labels=batch["labels"].numpy().astype(np.int64)),
        teacher_id="t", soft=wire.SoftLabels(logits=teacher[index].numpy()))
    config = JobConfig.model_validate({"teacher": {"model": "random"}, "data": {"path": "x"},
                                       "distill": distill.model_dump()})
    training, _ = distillation_losses(student_logits, knowledge, config)
    torch.testing.assert_close(recovery, training)
    assert recovery.item() > 0


def test_stages_are_timed_together_each_on_the_model_it_was(student_dir, tmp_path, monkeypatch):
    """One timing call holds every stage's work; the distilled stage's work still holds the unpruned model
    after pruning changed the chain's model in place; each row gets its own stage's latencies."""
    import polydistill.student.compress as compress
    from polydistill.student.prune import heads_per_layer

    rows = tiny_rows(16, seed=5)
    teacher_quality = quality(AutoModelForSequenceClassification.from_pretrained(student_dir), rows, 0, LABELS)
    timed_models, calls = [], []
    real_latency_work = compress.latency_work

    def recording_latency_work(model, *args, **kwargs):
        timed_models.append(model)
        return real_latency_work(model, *args, **kwargs)

    def fake_timing(work, *, rounds):
        calls.append(dict(work))
        return {key: 100.0 + index for index, key in enumerate(work)}

    monkeypatch.setattr(compress, "latency_work", recording_latency_work)
    monkeypatch.setattr(compress, "interleaved_latency_ms", fake_timing)
    stages = [stage("distil", "measure"), stage("prune", "prune", head_sparsity=0.5, calibration_batches=1)]
    result = run_stages(student_dir, stages, out_dir=tmp_path, calibration=rows, eval_rows=rows, pad_id=0,
                        num_labels=LABELS, teacher_quality=teacher_quality)

    keys = [(name, "model", figure) for name in ("distil", "prune") for figure in ("latency_ms_batch1", "latency_ms_batch32")]
    assert len(calls) == 1 and list(calls[0]) == keys
    assert heads_per_layer(timed_models[0]) == [4, 4] and sum(heads_per_layer(timed_models[1])) == 4
    by_name = {row.name: row for row in result}
    assert (by_name["distil"].latency_ms_batch1, by_name["distil"].latency_ms_batch32) == (100.0, 101.0)
    assert (by_name["prune"].latency_ms_batch1, by_name["prune"].latency_ms_batch32) == (102.0, 103.0)
