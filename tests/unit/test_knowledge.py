"""Teacher side and student side of the knowledge contract, on tiny random BERTs (no Redis, no Ray).

The teacher computes and ships only what the contract asks for; the student turns a knowledge message
into exactly the weighted terms the config asks for, trains its feature projections, checkpoints them,
and leaves them out of the saved student.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from polydistill.actors.teacher import TeacherReplica
from polydistill.cluster.config import validate_config
from polydistill.cluster.prepare import prepare_student, prepare_teacher
from polydistill.storage import wire
from polydistill.storage.job_data import JobSplit
from polydistill.storage.vocab import train_wordpiece_tokenizer
from polydistill.student.checkpoint import load_checkpoint
from polydistill.student.contract import KnowledgeRequest, resolve_contract
from polydistill.student.losses import HiddenProjection, mean_pool
from polydistill.student.objectives import (
    StudentOutputs,
    build_projections,
    distillation_losses,
    pseudo_label,
    student_labels,
)
from polydistill.student.teacher_pass import compute_knowledge, soft_labels_on_device
from polydistill.student.trainer import PROJECTIONS_PREFIX, StudentTrainer

NOWHERE = "redis://127.0.0.1:1/0"  # never contacted: nothing here reads or writes Redis
TEXTS = ["the cat sat on the mat", "le chat est sur le tapis", "a dog runs in the park", "un chien court"] * 5
STUDENT = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
FEATURES = {"hidden_layers": "uniform", "hidden_weight": 1.0, "attention_layers": "uniform", "attention_weight": 1.0,
            "embedding_weight": 1.0}


def job(tmp: Path, distill: dict | None = None, data: dict | None = None, student: dict | None = None):
    return validate_config({
        "job_id": "unit",
        "teacher": {"model": "random", "config": {"model_type": "bert"}},
        "student": {"config": STUDENT, **(student or {})},
        "data": {"path": str(tmp), **(data or {})},
        "distill": distill or {},
    })


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher")
    tokenizer = train_wordpiece_tokenizer(TEXTS, 120, path)
    assert len(tokenizer) <= 128
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def teacher_model(teacher_dir: Path, attention: str | None = None):
    return AutoModelForSequenceClassification.from_pretrained(teacher_dir, attn_implementation=attention).eval()


def work_batch(labels=(0, 2, 1), languages=("eng", "fra", "eng")) -> wire.WorkBatch:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, size=(3, 7)).astype(np.int32)
    mask = np.ones((3, 7), dtype=np.uint8)
    mask[1, 4:] = 0
    mask[2, 5:] = 0
    return wire.WorkBatch(job_id="unit", epoch=0, batch_id=0, sample_ids=np.arange(3), languages=languages,
                          input_ids=ids, attention_mask=mask,
                          labels=None if labels is None else np.asarray(labels, dtype=np.int64))


class Spy(torch.nn.Module):
    """Records the keyword arguments of each forward call of the wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, **kwargs):
        self.calls.append({k: v for k, v in kwargs.items() if k.startswith("output_")})
        return self.model(**kwargs)


# --------------------------------------------------------------------------- teacher


def test_teacher_computes_only_soft_labels_by_default(teacher_dir):
    spy = Spy(teacher_model(teacher_dir))
    knowledge = compute_knowledge(spy, work_batch(), KnowledgeRequest(), teacher_id="t0", top_k=2)
    assert spy.calls == [{"output_hidden_states": False, "output_attentions": False}]
    assert knowledge.soft.kind == "topk" and knowledge.soft.topk_values.shape == (3, 2)
    assert knowledge.hidden_states == {} and knowledge.attentions == {} and knowledge.embeddings is None


def test_teacher_ships_exactly_the_requested_layers_as_float16(teacher_dir):
    model = teacher_model(teacher_dir, "eager")
    work = work_batch()
    request = KnowledgeRequest(soft=False, hidden_layers=(0, 4), attention_layers=(2,), embeddings=True)
    knowledge = compute_knowledge(model, work, request, teacher_id="t0")
    assert knowledge.soft is None
    assert sorted(knowledge.hidden_states) == [0, 4] and sorted(knowledge.attentions) == [2]
    assert all(a.dtype == np.float16 for a in [*knowledge.hidden_states.values(), *knowledge.attentions.values()])
    assert knowledge.hidden_states[4].shape == (3, 7, 32) and knowledge.attentions[2].shape == (3, 4, 7, 7)

    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(work.input_ids.astype(np.int64)),
                          attention_mask=torch.from_numpy(work.attention_mask.astype(np.int64)),
                          output_hidden_states=True, output_attentions=True)
    # Attention layer 2 is HF's attentions[1]; hidden layer 4 is hidden_states[4] (0 = embeddings).
    np.testing.assert_allclose(knowledge.attentions[2], reference.attentions[1].numpy(), atol=1e-3)
    np.testing.assert_allclose(knowledge.hidden_states[4], reference.hidden_states[4].numpy(), atol=1e-2)
    pooled = mean_pool(reference.hidden_states[4], torch.from_numpy(work.attention_mask))
    np.testing.assert_allclose(knowledge.embeddings, pooled.numpy(), atol=1e-2)
    # Padded keys get no attention; the rest is a distribution.
    np.testing.assert_allclose(knowledge.attentions[2].astype(np.float32).sum(-1), 1.0, atol=1e-2)
    assert not knowledge.attentions[2][1, :, :, 4:].any()

    decoded = wire.decode(wire.encode(knowledge))
    assert sorted(decoded.hidden_states) == [0, 4] and decoded.embeddings.shape == (3, 32)


def test_replica_resolves_the_contract_and_loads_eager_attention_only_when_needed(tmp_path, teacher_dir):
    plain = TeacherReplica("t0", job(tmp_path), str(teacher_dir), NOWHERE)
    assert plain.request == KnowledgeRequest(soft=True)
    assert plain.model.config._attn_implementation != "eager"

    replica = TeacherReplica("t1", job(tmp_path, {"hidden_layers": [[2, 4]], "hidden_weight": 1,
                                                  "attention_layers": [[1, 2]], "attention_weight": 1,
                                                  "relation_heads": None}, student={"config": {**STUDENT, "num_attention_heads": 4}}),
                             str(teacher_dir), NOWHERE)
    # Equal head counts (4 and 4): attention maps of teacher layer 2; hidden states of layer 4 only.
    assert replica.request == KnowledgeRequest(soft=True, hidden_layers=(4,), attention_layers=(2,))
    assert replica.model.config._attn_implementation == "eager"
    knowledge = replica.compute(work_batch())
    assert sorted(knowledge.hidden_states) == [4] and sorted(knowledge.attentions) == [2]
    assert len(wire.encode(knowledge)) > len(wire.encode(plain.compute(work_batch()))) + 3 * 7 * 32 * 2


# --------------------------------------------------------------------------- student: loss assembly


def student_parts(tmp_path: Path, teacher_dir: Path, distill: dict, data: dict | None = None):
    config = job(tmp_path, distill, data)
    init_dir, _ = prepare_student(config, teacher_dir, tmp_path / "out", train=None)
    from transformers import AutoConfig

    contract = resolve_contract(config.distill, AutoConfig.from_pretrained(teacher_dir),
                                AutoConfig.from_pretrained(init_dir))
    return config, init_dir, contract


def student_forward(init_dir: Path, work: wire.WorkBatch, attention: bool):
    model = AutoModelForSequenceClassification.from_pretrained(
        init_dir, attn_implementation="eager" if attention else None)
    out = model(input_ids=torch.from_numpy(work.input_ids.astype(np.int64)),
                attention_mask=torch.from_numpy(work.attention_mask.astype(np.int64)),
                output_hidden_states=True, output_attentions=attention)
    return StudentOutputs(out.logits, out.hidden_states, out.attentions)


@pytest.mark.parametrize(
    "distill, terms",
    [
        ({}, {"soft", "hard"}),
        ({"soft_weight": 0, "hard_weight": 1}, {"hard"}),
        ({"hidden_layers": [[2, 4]], "hidden_weight": 2.0}, {"soft", "hard", "hidden"}),
        ({"attention_layers": "uniform", "attention_weight": 1.0, "hard_weight": 0}, {"soft", "attention"}),
        ({"embedding_weight": 0.5, "embedding_loss": "mse"}, {"soft", "hard", "embedding"}),
        ({**FEATURES, "soft_weight": 0, "hard_weight": 0}, {"hidden", "attention", "embedding"}),
    ],
)
def test_each_term_is_present_exactly_when_weighted(tmp_path, teacher_dir, distill, terms):
    config, init_dir, contract = student_parts(tmp_path, teacher_dir, distill)
    work = work_batch()
    knowledge = compute_knowledge(teacher_model(teacher_dir, "eager"), work, contract.request, teacher_id="t0")
    outputs = student_forward(init_dir, work, attention=contract.student_needs_attentions)
    loss, values = distillation_losses(outputs, knowledge, config, contract, build_projections(contract))
    assert set(values) == terms | {"total"}
    weights = {"soft": config.distill.soft_weight, "hard": config.distill.hard_weight,
               "hidden": config.distill.hidden_weight, "attention": config.distill.attention_weight,
               "embedding": config.distill.embedding_weight}
    assert values["total"] == pytest.approx(sum(weights[t] * values[t] for t in terms), rel=1e-5)
    assert torch.isfinite(loss) and all(np.isfinite(v) for v in values.values())


def test_gradients_reach_every_projection(tmp_path, teacher_dir):
    config, init_dir, contract = student_parts(tmp_path, teacher_dir, FEATURES)
    # Student 16 wide, teacher 32: one projection per hidden pair and one for the embedding.
    assert set(contract.projections) == {"hidden_0_0", "hidden_1_2", "hidden_2_4", "embedding"}
    projections = build_projections(contract)
    assert all(isinstance(p, HiddenProjection) for p in projections.values())
    work = work_batch()
    knowledge = compute_knowledge(teacher_model(teacher_dir), work, contract.request, teacher_id="t0")
    loss, _ = distillation_losses(student_forward(init_dir, work, False), knowledge, config, contract, projections)
    loss.backward()
    for name, projection in projections.items():
        assert projection.linear.weight.grad is not None and projection.linear.weight.grad.abs().sum() > 0, name


def test_missing_teacher_layer_is_a_contract_error_naming_the_field(tmp_path, teacher_dir):
    config, init_dir, contract = student_parts(tmp_path, teacher_dir, {"hidden_layers": [[2, 4]], "hidden_weight": 1})
    work = work_batch()
    knowledge = compute_knowledge(teacher_model(teacher_dir), work, KnowledgeRequest(), teacher_id="t0")
    with pytest.raises(ValueError, match=r"t0 carries no hidden_states of teacher layer 4.*distill\.hidden_layers"):
        distillation_losses(student_forward(init_dir, work, False), knowledge, config, contract,
                            build_projections(contract))


def test_withheld_labels_never_reach_the_hard_term(tmp_path, teacher_dir):
    config = job(tmp_path, data={"withhold_labels": True})
    work = work_batch(labels=(0, 1, 2))
    assert student_labels(work, config) is None
    knowledge = compute_knowledge(teacher_model(teacher_dir), work, KnowledgeRequest(), teacher_id="t0")
    _, values = distillation_losses(torch.zeros(3, 3, requires_grad=True), knowledge, config)
    assert set(values) == {"soft", "total"}


def test_unlabelled_samples_in_a_labelled_batch_are_skipped_by_the_hard_term(tmp_path, teacher_dir):
    config = job(tmp_path, {"soft_weight": 0, "hard_weight": 1})
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    knowledge = wire.Knowledge(work=work_batch(labels=(0, -1, -1)), teacher_id="t0")
    _, values = distillation_losses(logits, knowledge, config)
    assert values["hard"] == pytest.approx(-torch.log_softmax(logits[0].detach(), -1)[0].item())


def test_a_batch_with_nothing_to_learn_is_a_zero_step_not_an_error(tmp_path):
    config = job(tmp_path, {"soft_weight": 0, "hard_weight": 1, "pseudo_label_threshold": 0.99},
                 data={"withhold_labels": True})
    logits = torch.zeros(3, 3, requires_grad=True)
    knowledge = wire.Knowledge(work=work_batch(), teacher_id="t0", soft=soft_from_probs([[0.4, 0.3, 0.3]] * 3))
    labels, counts = pseudo_label(knowledge.work, knowledge.soft, 0.99, None)
    loss, values = distillation_losses(logits, knowledge, config, labels=labels)
    assert values == {"total": 0.0} and counts["eng"] == {"passed": 0, "total": 2}
    loss.backward()
    assert not logits.grad.any()


# --------------------------------------------------------------------------- pseudo-labels


def soft_from_probs(probs) -> wire.SoftLabels:
    return wire.SoftLabels.full(np.log(np.asarray(probs, dtype=np.float32)))


def test_pseudo_labels_fill_only_unlabelled_samples_above_the_threshold_and_count_per_language():
    work = work_batch(labels=(1, -1, -1), languages=("eng", "eng", "fra"))
    soft = soft_from_probs([[0.9, 0.05, 0.05], [0.1, 0.85, 0.05], [0.5, 0.3, 0.2]])
    labels, counts = pseudo_label(work, soft, 0.8, work.labels)
    assert labels.tolist() == [1, 1, -1]  # gold kept; sample 1 passed (0.85); sample 2 did not (0.5)
    assert counts == {"eng": {"passed": 1, "total": 1}, "fra": {"passed": 0, "total": 1}}


def test_pseudo_labels_of_withheld_data_are_scored_against_the_gold_labels():
    work = work_batch(labels=(0, 2, 1), languages=("eng", "eng", "fra"))
    soft = soft_from_probs([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.2, 0.7, 0.1]])
    labels, counts = pseudo_label(work, soft, 0.6, None, withheld=work.labels)
    assert labels.tolist() == [0, 0, 1]
    assert counts == {"eng": {"passed": 2, "total": 2, "correct": 1}, "fra": {"passed": 1, "total": 1, "correct": 1}}


@pytest.mark.parametrize("shape", [(3, 50), (2, 7, 300)], ids=["per-sequence", "per-token"])
def test_top_k_on_the_teacher_device_matches_the_wire_reference(shape):
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 4
    on_device = soft_labels_on_device(logits, 8)
    reference = wire.topk_soft_labels(logits.numpy(), 8)
    np.testing.assert_array_equal(on_device.topk_indices, reference.topk_indices)
    np.testing.assert_allclose(on_device.topk_values, reference.topk_values)
    np.testing.assert_allclose(on_device.topk_logsumexp, reference.topk_logsumexp, rtol=1e-5)
    assert on_device.topk_indices.dtype == np.int32 and on_device.per_token == (len(shape) == 3)
    assert soft_labels_on_device(logits, None).logits.shape == shape


def test_top_k_soft_labels_give_the_exact_top_probability():
    logits = np.log(np.array([[0.6, 0.3, 0.1], [0.2, 0.1, 0.7]], dtype=np.float32))
    soft = wire.topk_soft_labels(logits, 1)
    work = work_batch(labels=None, languages=("eng", "eng", "eng"))
    work = wire.WorkBatch(job_id="unit", epoch=0, batch_id=0, sample_ids=np.arange(2), languages=("eng", "eng"),
                          input_ids=work.input_ids[:2], attention_mask=work.attention_mask[:2])
    labels, counts = pseudo_label(work, soft, 0.65, None)
    assert labels.tolist() == [-1, 2] and counts == {"eng": {"passed": 1, "total": 2}}


# --------------------------------------------------------------------------- trainer: step, checkpoint, save


def test_trainer_trains_projections_checkpoints_them_and_saves_a_plain_student(tmp_path, teacher_dir):
    distill = {**FEATURES, "pseudo_label_threshold": 0.0001}
    config, init_dir, contract = student_parts(tmp_path, teacher_dir, distill, data={"withhold_labels": True})
    checkpoints = tmp_path / "ckpt"
    trainer = StudentTrainer(config, str(init_dir), 1, NOWHERE, str(tmp_path / "student"),
                             checkpoint_dir=str(checkpoints))
    assert trainer.contract == contract
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in trainer.projections.parameters()} <= optimised
    before = {k: v.clone() for k, v in trainer.projections.state_dict().items()}

    work = work_batch()
    knowledge = compute_knowledge(teacher_model(teacher_dir), work, contract.request, teacher_id="t0")
    values = trainer.step(knowledge)
    trainer.ledger.record(work.epoch, work.batch_id, work.n_samples)
    assert {"soft", "hard", "hidden", "attention", "embedding"} <= set(values)  # hard: pseudo-labels only
    predicted = knowledge.soft.logits.argmax(-1)
    correct = {lang: int(sum(predicted[i] == work.labels[i] for i in range(3) if work.languages[i] == lang))
               for lang in ("eng", "fra")}
    assert trainer.state.pseudo_labels == {"eng": {"passed": 2, "total": 2, "correct": correct["eng"]},
                                           "fra": {"passed": 1, "total": 1, "correct": correct["fra"]}}
    assert any(not torch.equal(before[k], v) for k, v in trainer.projections.state_dict().items())

    trainer.checkpoint()
    saved = load_checkpoint(checkpoints)
    assert {k for k in saved.model if k.startswith(PROJECTIONS_PREFIX)} == {
        PROJECTIONS_PREFIX + k for k in trainer.projections.state_dict()}

    trainer.save()
    student_keys = set(load_file(tmp_path / "student" / "model.safetensors"))
    assert not any("projection" in k for k in student_keys)
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").config.hidden_size == 16

    resumed = StudentTrainer(config, str(init_dir), 1, NOWHERE, str(tmp_path / "student2"),
                             checkpoint_dir=str(checkpoints))
    assert resumed.resumed_from_step == 1
    for key, value in trainer.projections.state_dict().items():
        assert torch.equal(resumed.projections.state_dict()[key], value)
    assert resumed.state.pseudo_labels == trainer.state.pseudo_labels


def test_attention_distillation_turns_student_attention_dropout_off_for_training_only(tmp_path, teacher_dir):
    distill = {"attention_layers": "uniform", "attention_weight": 1}
    config = job(tmp_path, distill, student={"config": {**STUDENT, "num_attention_heads": 4}})
    init_dir, _ = prepare_student(config, teacher_dir, tmp_path / "out", train=None)
    trainer = StudentTrainer(config, str(init_dir), 1, NOWHERE, str(tmp_path / "student"))
    assert trainer.contract.attention_mode == "kl"
    assert all(m.p == 0 for name, m in trainer.model.named_modules()
               if isinstance(m, torch.nn.Dropout) and "attention.self" in name)
    trainer.save()
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    assert saved.config.attention_probs_dropout_prob == 0.1


def test_knowledge_bytes_by_part():
    work = work_batch()
    knowledge = wire.Knowledge(work=work, teacher_id="t0", soft=wire.SoftLabels.full(np.zeros((3, 3), np.float32)),
                               hidden_states={2: np.zeros((3, 7, 8), np.float16)},
                               attentions={1: np.zeros((3, 2, 7, 7), np.float16)})
    parts = wire.knowledge_nbytes(knowledge)
    assert parts == {"work": 3 * 8 + 3 * 7 * 4 + 3 * 7 + 3 * 8, "soft": 36, "hidden_states": 3 * 7 * 8 * 2,
                     "attentions": 3 * 2 * 49 * 2, "embeddings": 0, "target_ids": 0}
    assert len(wire.encode(knowledge)) > sum(parts.values())


def test_unlabelled_text_takes_the_classes_of_a_trained_teacher(tmp_path, teacher_dir):
    config = validate_config({"teacher": {"model": str(teacher_dir)},
                              "data": {"path": str(tmp_path), "label_column": None, "eval_split": None, "max_length": 32},
                              "distill": {"pseudo_label_threshold": 0.5}})
    unlabelled = JobSplit(dataset=None, label_names=[], cleaning={})
    assert prepare_teacher(config, tmp_path, unlabelled) == Path(teacher_dir)


def test_a_non_finite_loss_is_skipped_counted_and_stops_the_job_when_it_repeats(tmp_path, teacher_dir):
    from polydistill.student.trainer import NonFiniteLoss

    config, init_dir, contract = student_parts(tmp_path, teacher_dir, {})
    config = config.model_copy(update={"training": config.training.model_copy(update={"max_nonfinite_in_row": 2})})
    trainer = StudentTrainer(config, str(init_dir), 4, NOWHERE, str(tmp_path / "student"))
    knowledge = compute_knowledge(teacher_model(teacher_dir), work_batch(), contract.request, teacher_id="t0")
    bias = trainer.model.classifier.bias
    clean_bias = bias.detach().clone()

    def poisoned_step():
        with torch.no_grad():
            bias[0] = float("nan")  # the student's logits, and so its loss, are NaN
        return trainer.step(knowledge)

    weights = {key: value.clone() for key, value in trainer.model.state_dict().items() if "classifier" not in key}
    assert poisoned_step() is None  # skipped: no optimiser step
    assert trainer.state.steps_skipped_nonfinite == 1 and trainer.state.optimizer_steps == 0
    assert all(torch.equal(weights[key], value) for key, value in trainer.model.state_dict().items() if key in weights)
    with torch.no_grad():
        bias.copy_(clean_bias)
    assert trainer.step(knowledge) is not None  # a finite batch steps and ends the run of bad ones
    assert trainer.state.optimizer_steps == 1 and trainer.state.nonfinite_in_row == 0
    assert all(torch.isfinite(value).all() for value in trainer.model.state_dict().values())
    poisoned_step()
    with pytest.raises(NonFiniteLoss, match=r"2 batches in a row .* batch 0 of epoch 0: loss nan .*last finite loss"):
        poisoned_step()
    assert trainer.summary(1.0)["steps_skipped_nonfinite"] == 3
