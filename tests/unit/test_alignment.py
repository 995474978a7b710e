"""Cross-lingual alignment (distill.align_language): each row is pulled towards the teacher's embedding of
the same sentence (index_id) in one language; the table, the feeder's lookup, the loss and the checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from polydistill.actors.feeder import Feeder
from polydistill.cluster.config import ConfigError, load_config
from polydistill.cluster.prepare import prepare_alignment_targets, prepare_student
from polydistill.storage import wire
from polydistill.storage.alignment import AlignmentDataError, AlignmentTable, pivot_rows
from polydistill.storage.job_data import load_job_split
from polydistill.student.build import materialize_random_teacher
from polydistill.student.contract import resolve_contract
from polydistill.student.objectives import StudentOutputs, alignment_term, distillation_losses

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NO_REDIS = "redis://127.0.0.1:1/0"


def tiny(tmp_path: Path, *overrides: str):
    return load_config(EXAMPLES / "tiny.yaml", [
        f"transport.redis_url={NO_REDIS}", "data.languages=[eng_Latn, swh_Latn]", "data.limit_per_language=40",
        "distill.align_language=eng_Latn", "distill.align_weight=1.0", *overrides,
    ], output_dir=str(tmp_path / "out"))


def test_targets_are_looked_up_by_index_id_and_missing_sentences_are_flagged():
    table = AlignmentTable("eng_Latn", np.array([30, 10, 20]),
                           np.array([[3, 3], [1, 1], [2, 2]], dtype=np.float16))
    vectors, found = table.targets_for(np.array([20, 99, 10, 30, 5, 20]))
    assert found.tolist() == [1, 0, 1, 1, 0, 1]
    assert vectors.tolist() == [[2, 2], [0, 0], [1, 1], [3, 3], [0, 0], [2, 2]]


def test_string_index_ids_work_and_the_table_round_trips_without_pickle(tmp_path):
    table = AlignmentTable("eng_Latn", np.array(["b", "a"]), np.array([[1, 0], [0, 1]], dtype=np.float16))
    loaded = AlignmentTable.load(Path(table.save(tmp_path)).parent)
    assert loaded.language == "eng_Latn" and loaded.index_ids.tolist() == ["b", "a"]
    vectors, found = loaded.targets_for(np.array(["a", "c"]))
    assert found.tolist() == [1, 0] and vectors[0].tolist() == [0, 1]


def test_pivot_rows_keep_the_first_row_of_each_sentence_in_the_language():
    data = Dataset.from_dict({"index_id": [7, 7, 8, 7, 9], "language": ["eng", "fra", "eng", "eng", "fra"],
                              "text": list("abcde"), "label": [0] * 5})
    assert pivot_rows(data, "eng").tolist() == [0, 2]
    with pytest.raises(AlignmentDataError, match="no row in it.*eng, fra"):
        pivot_rows(data, "deu")
    with pytest.raises(AlignmentDataError, match="needs an index_id column"):
        pivot_rows(data.remove_columns("index_id"), "eng")


def test_the_loss_is_zero_where_the_student_points_like_the_target_and_skips_rows_without_one(tmp_path):
    config = tiny(tmp_path)
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[0.0, 2.0], [0.0, 2.0]]], requires_grad=True)  # pooled: x, y
    work = wire.WorkBatch(job_id="j", epoch=0, batch_id=0, sample_ids=np.arange(2), languages=("eng", "swh"),
                          input_ids=np.ones((2, 2), np.int32), attention_mask=np.ones((2, 2), np.uint8),
                          align_targets=np.array([[5, 0], [1, 0]], np.float16), align_found=np.array([1, 0], np.uint8))
    outputs = StudentOutputs(logits=torch.zeros(2, 3), hidden_states=(hidden,))
    assert float(alignment_term(outputs, work, config, None).detach()) == pytest.approx(0.0, abs=1e-6)
    # Found on the second row too, where the student points along y and the target along x: 1 - cos = 1, mean 0.5.
    both = wire.WorkBatch(**{**{f: getattr(work, f) for f in ("job_id", "epoch", "batch_id", "sample_ids", "languages",
                                                             "input_ids", "attention_mask", "align_targets")},
                             "align_found": np.array([1, 1], np.uint8)})
    loss = alignment_term(outputs, both, config, None)
    assert float(loss.detach()) == pytest.approx(0.5, abs=1e-6)
    loss.backward()
    assert hidden.grad is not None and bool(hidden.grad[1].abs().sum() > 0)


def test_alignment_is_a_term_of_the_objective_weighed_by_align_weight(tmp_path):
    config = tiny(tmp_path, "distill.soft_weight=0", "distill.hard_weight=0", "distill.align_weight=2.0")
    contract = resolve_contract(config.distill, _Width(2), _Width(2))
    assert contract.align and contract.student_needs_hidden_states and not contract.request.needs_hidden_states
    hidden = torch.tensor([[[0.0, 1.0]]])
    work = wire.WorkBatch(job_id="j", epoch=0, batch_id=0, sample_ids=np.arange(1), languages=("swh",),
                          input_ids=np.ones((1, 1), np.int32), attention_mask=np.ones((1, 1), np.uint8),
                          align_targets=np.array([[1, 0]], np.float16), align_found=np.array([1], np.uint8))
    knowledge = wire.Knowledge(work=work, teacher_id="t", soft=None)
    total, logged = distillation_losses(StudentOutputs(logits=torch.zeros(1, 3), hidden_states=(hidden,)),
                                        knowledge, config, contract, labels=None)
    assert logged["align"] == pytest.approx(1.0) and float(total) == pytest.approx(2.0)


class _Width:
    """The two fields of a model config the contract reads when no layers are mapped."""

    def __init__(self, width: int):
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = width, 2, 1


def test_the_feeder_sends_each_row_the_teacher_embedding_of_its_english_translation(tmp_path):
    config = tiny(tmp_path)
    out_dir = Path(config.output_dir).resolve()
    out_dir.mkdir(parents=True)
    train = load_job_split(config.data, config.data.train_split)
    teacher_dir = materialize_random_teacher(config.teacher, train.label_names, train.dataset["text"],
                                             tmp_path / "teacher", config.training.seed)
    prepare_student(config, teacher_dir, out_dir, train)
    prepare_alignment_targets(config, teacher_dir, out_dir, train)
    table = AlignmentTable.load(out_dir)
    feeder = Feeder(config, str(teacher_dir), NO_REDIS)
    columns = train.dataset.with_format(None)
    english = {i: n for n, (i, lang) in enumerate(zip(columns["index_id"], columns["language"])) if lang == "eng_Latn"}
    rows = np.arange(len(train.dataset))
    work = feeder.work_batch(0, 0, rows)
    for position in rows:
        index_id = columns["index_id"][position]
        if index_id in english:
            expected = table.vectors[list(table.index_ids).index(index_id)]
            assert work.align_found[position] == 1
            assert np.array_equal(work.align_targets[position], expected)
        else:  # the Swahili row's sentence is not among the English rows kept
            assert work.align_found[position] == 0
    assert work.align_found.sum() >= len(english)
    assert wire.decode(wire.encode(work)).align_targets.shape == work.align_targets.shape


@pytest.mark.parametrize("overrides, message", [
    (["distill.align_weight=0"], "alignment needs both"),
    (["distill.align_language=null"], "alignment needs both"),
    (["data.languages=[swh_Latn, fra_Latn]"], "data.languages .* leaves out"),
    (["task=token-classification"], "task token-classification"),
])
def test_alignment_settings_are_refused_with_what_to_change(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(tmp_path, *overrides)


def test_coverage_is_counted_per_language_and_none_at_all_is_refused():
    from polydistill.storage.alignment import check_coverage, coverage_by_language

    coverage = coverage_by_language(["yor", "eng", "yor", "yor"], np.array([1, 1, 0, 1], np.uint8))
    assert coverage == {"eng": 1.0, "yor": pytest.approx(2 / 3)}
    check_coverage(coverage, "eng")
    with pytest.raises(AlignmentDataError, match="no training row's index_id matches"):
        check_coverage(coverage_by_language(["yor"], np.array([0], np.uint8)), "eng")
