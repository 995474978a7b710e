"""Per-epoch dev validation and keep_best: which epochs are due, the settings that cannot work
together, and how the report shows the scores."""

from __future__ import annotations

import json

import pytest

from polydistill.cluster.config import ConfigError, validate_config
from polydistill.storage.ledger import EpochLedger
from polydistill.student.evaluate import ABLATION_VALIDATION_FILE, ablation_validation
from polydistill.student.report import early_stopping_lines, format_validation_table
from polydistill.student.validation import best_weights_file, epochs_to_validate


def ledger_with(applied: dict[int, set[int]]) -> EpochLedger:
    return EpochLedger(batches_per_epoch=3, epochs=3, applied=applied)


def test_an_epoch_is_due_once_every_batch_of_it_is_applied_and_only_once():
    assert epochs_to_validate(ledger_with({0: {0, 1}}), []) == []
    assert epochs_to_validate(ledger_with({0: {0, 1, 2}, 1: {0}}), []) == [0]
    assert epochs_to_validate(ledger_with({0: {0, 1, 2}, 1: {0}}), [0]) == []
    # Interleaved at the boundary: epoch 1 completes before epoch 0's last batch arrives.
    assert epochs_to_validate(ledger_with({0: {0, 1}, 1: {0, 1, 2}}), []) == [1]
    assert epochs_to_validate(ledger_with({0: {0, 1, 2}, 1: {0, 1, 2}, 2: {0, 1, 2}}), [1]) == [0, 2]


def test_best_weight_files_are_named_by_epoch():
    assert best_weights_file(2) == "best_weights.epoch2.pt"
    assert best_weights_file("*") == "best_weights.epoch*.pt"


def config(training: dict, task: str | None = None, data: dict | None = None):
    raw = {"teacher": {"model": "random"}, "data": {"path": "/data", **(data or {})}, "training": training}
    if task:  # a language-model task, with the settings it needs
        raw.update(task=task, distill={"top_k": 16})
    return validate_config(raw)


@pytest.mark.parametrize(("training", "task", "data", "words"), [
    ({"keep_best": True}, None, None, "set training.validate_each_epoch: true as well"),
    ({"validate_each_epoch": True}, "masked-lm", {"label_column": None}, "task masked-lm is scored after the run only"),
    ({"validate_each_epoch": True, "keep_best": True}, None, {"eval_split": "dev"},
     "would choose the epoch on data.eval_split ('dev'), the rows the report reads"),
    ({"validate_each_epoch": True, "patience": 2}, None, None, "set training.keep_best: true as well"),
])
def test_settings_that_cannot_work_are_refused_naming_the_fix(training, task, data, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        config(training, task, data)
    assert config({"validate_each_epoch": True, "keep_best": True}).training.keep_best


def test_early_stopping_is_refused_where_it_cannot_stop_every_worker():
    raw = {"teacher": {"model": "random"}, "data": {"path": "/data"}, "student": {"workers": 2},
           "training": {"validate_each_epoch": True, "keep_best": True, "patience": 1}}
    with pytest.raises(ConfigError, match="data-parallel workers"):
        validate_config(raw)
    with pytest.raises(ConfigError, match="greater than or equal to 1"):
        config({"validate_each_epoch": True, "keep_best": True, "patience": 0})


def test_the_report_says_which_students_stopped_early_and_after_which_epoch():
    report = {"epochs": 5, "stopped_early": {"after_epoch": 2, "patience": 2, "last_epoch": 2},
              "extra_students": {"tiny": {"stopped_early": None}}}
    assert early_stopping_lines(report) == ("\n\n- student stopped early: no new best dev score in the 2 epoch(s) up "
                                            "to epoch 3; trained 3 of 5 planned epochs")
    report["stopped_early"]["last_epoch"] = 3
    assert early_stopping_lines(report).endswith("trained 4 of 5 planned epochs (the epoch under way was finished)")
    assert early_stopping_lines({"epochs": 2}) == ""


def test_a_rule_that_fires_on_the_last_planned_epoch_is_not_called_stopping_early():
    # the best dev epoch was the third of five: two epochs without a new best end the plan where it ended anyway
    curve = [{"step": 10 * epoch, "epoch": float(epoch), "accuracy": 0.7, "per_language": {}}
             for epoch in (1, 2, 3, 4, 5)]
    report = {"epochs": 5, "stopped_early": {"after_epoch": 4, "patience": 2, "last_epoch": 4},
              "ablation_validation": {"ablation:tiny": {"curve": curve, "kept_step": 30, "stopped_early": True}}}
    assert early_stopping_lines(report) == ""
    report["ablation_validation"]["ablation:tiny"]["curve"] = curve[:4]
    assert early_stopping_lines(report) == ("\n\n- ablation:tiny stopped early by the same rule: "
                                            "trained 4 of 5 planned epochs")


def test_the_report_table_marks_the_kept_epoch_and_shows_the_weakest_language():
    scores = [{"epoch": 0, "step": 10, "accuracy": 0.70, "per_language": {"eng": 0.8, "yor": 0.55}},
              {"epoch": 1, "step": 20, "accuracy": 0.74, "per_language": {"eng": 0.82, "yor": 0.61}}]
    table = format_validation_table({"validation": scores, "kept_epoch": 1,
                                     "extra_students": {"tiny": {"validation": scores[:1], "kept_epoch": None}}})
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
    assert rows[0] == ["Student", "Epoch", "Step", "Dev accuracy", "Weakest language"]
    assert rows[2:] == [["student", "1", "10", "70.0%", "55.0%"], ["student", "2 (kept)", "20", "74.0%", "61.0%"],
                        ["tiny", "1", "10", "70.0%", "55.0%"]]
    assert format_validation_table({"validation": []}) == ""


def test_the_ablations_dev_scores_sit_beside_the_students_with_the_kept_one_marked():
    student = [{"epoch": 0, "step": 10, "accuracy": 0.70, "per_language": {"eng": 0.8, "yor": 0.55}}]
    ablation = {"curve": [{"step": 10, "epoch": 1.0, "accuracy": 0.68, "per_language": {"eng": 0.8, "yor": 0.5}},
                          {"step": 20, "epoch": 2.0, "accuracy": 0.66, "per_language": {"eng": 0.79, "yor": 0.49}}],
                "kept_step": 10, "stopped_early": True}
    report = {"epochs": 5, "validation": student, "ablation_validation": {"ablation": ablation}}
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in format_validation_table(report).splitlines()]
    assert rows[2:] == [["student", "1", "10", "70.0%", "55.0%"], ["ablation", "1 (kept)", "10", "68.0%", "50.0%"],
                        ["ablation", "2", "20", "66.0%", "49.0%"]]
    assert early_stopping_lines(report) == "\n\n- ablation stopped early by the same rule: trained 2 of 5 planned epochs"
    ablation["stopped_early"] = False
    assert early_stopping_lines(report) == ""


def test_an_ablations_dev_curve_is_read_from_beside_its_weights(tmp_path):
    scored, unscored = tmp_path / "ablation", tmp_path / "ablation-tiny"
    scored.mkdir(), unscored.mkdir()
    record = {"curve": [{"step": 4, "epoch": 1.0, "accuracy": 0.5, "per_language": {"eng": 0.5}}], "kept_step": 4,
              "stopped_early": False}
    (scored / ABLATION_VALIDATION_FILE).write_text(json.dumps(record))
    assert ablation_validation({"ablation": scored, "ablation:tiny": unscored}) == {"ablation": record}
