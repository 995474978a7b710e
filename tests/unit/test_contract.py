"""The knowledge contract: resolution into layer pairs and requests, and refusals that name field and numbers."""

import pytest
from transformers import BertConfig

from polydistill.cluster.config import ConfigError, validate_config
from polydistill.student.architecture import ModelSetupError
from polydistill.student.contract import (
    ContractError,
    KnowledgeRequest,
    check_contract,
    resolve_contract,
)

TEACHER = BertConfig(vocab_size=500, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_labels=7)
STUDENT = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_labels=7)
SAME_SHAPE = BertConfig(vocab_size=500, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_labels=7)


def job(distill: dict | None = None, **sections):
    raw = {"teacher": {"model": "random", "config": {"model_type": "bert"}}, "data": {"path": "/data"}, **sections}
    if distill is not None:
        raw["distill"] = distill
    return validate_config(raw)


def test_labels_only_asks_for_soft_labels_and_needs_no_model_configs():
    contract = resolve_contract(job().distill, None, None)
    assert contract.request == KnowledgeRequest(soft=True)
    assert not contract.request.needs_hidden_states and not contract.request.needs_attentions
    # Hard labels alone: the teacher ships nothing but the batch.
    assert not resolve_contract(job({"soft_weight": 0, "hard_weight": 1}).distill, None, None).request.soft


def test_uniform_layers_and_projections_across_widths():
    distill = job({"hidden_layers": "uniform", "hidden_weight": 1, "attention_layers": "uniform",
                   "attention_weight": 1, "embedding_weight": 1}).distill
    contract = resolve_contract(distill, TEACHER, STUDENT)
    assert contract.hidden_pairs == ((0, 0), (1, 2), (2, 4))
    assert contract.attention_pairs == ((1, 2), (2, 4))
    # 4 teacher heads vs 2 student heads: relation transfer over the layers' states, gcd(4, 2) = 2 heads.
    assert contract.attention_mode == "relation" and contract.relation_heads == 2
    assert contract.projections == {"hidden_0_0": (64, 128), "hidden_1_2": (64, 128), "hidden_2_4": (64, 128),
                                    "embedding": (64, 128)}
    assert contract.request == KnowledgeRequest(soft=True, hidden_layers=(0, 2, 4), attention_layers=(),
                                                embeddings=True)
    assert contract.student_needs_hidden_states and not contract.student_needs_attentions


def test_equal_head_counts_ship_attention_maps_of_listed_layers_only():
    distill = job({"attention_layers": [[2, 3]], "attention_weight": 1}).distill
    contract = resolve_contract(distill, TEACHER, SAME_SHAPE)
    assert contract.attention_mode == "kl" and contract.projections == {}
    assert contract.request == KnowledgeRequest(soft=True, attention_layers=(3,))
    assert contract.student_needs_attentions and not contract.student_needs_hidden_states


def test_explicit_relation_heads_switch_to_relations_and_must_divide_both_widths():
    distill = job({"attention_layers": [[2, 4]], "attention_weight": 1, "relation_heads": 8}).distill
    contract = resolve_contract(distill, TEACHER, SAME_SHAPE)
    assert contract.attention_mode == "relation" and contract.request.hidden_layers == (4,)
    bad = job({"attention_layers": [[2, 4]], "attention_weight": 1, "relation_heads": 3}).distill
    with pytest.raises(ContractError, match=r"distill\.relation_heads is 3, but the student's hidden size 64 is not "
                                            r"divisible by it \(student 64, teacher 128\)"):
        resolve_contract(bad, TEACHER, STUDENT)


@pytest.mark.parametrize(
    "pairs, message",
    [
        ([[1, 14]], r"student layer 1 maps to teacher layer 14, but the teacher has 4 layers .*\(distill\.hidden_layers\)"),
        ([[7, 2]], r"student layer 7 maps to teacher layer 2, but the student has 2 layers .*\(distill\.hidden_layers\)"),
    ],
)
def test_hidden_layer_out_of_range_names_field_and_numbers(pairs, message):
    distill = job({"hidden_layers": pairs, "hidden_weight": 1}).distill
    with pytest.raises(ContractError, match=message):
        resolve_contract(distill, TEACHER, STUDENT)


def test_attention_layers_count_from_one_and_stay_in_range():
    with pytest.raises(ContractError, match=r"student layer 0 maps to teacher layer 2, but layer 0 is the embeddings.*"
                                            r"\(distill\.attention_layers\)"):
        resolve_contract(job({"attention_layers": [[0, 2]], "attention_weight": 1}).distill, TEACHER, STUDENT)
    with pytest.raises(ContractError, match=r"student layer 2 maps to teacher layer 5, but the teacher has 4 layers.*"
                                            r"\(distill\.attention_layers\)"):
        resolve_contract(job({"attention_layers": [[2, 5]], "attention_weight": 1}).distill, TEACHER, STUDENT)


def test_uniform_refuses_a_student_deeper_than_its_teacher():
    deep = BertConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=2)
    with pytest.raises(ContractError, match=r"distill\.hidden_layers is 'uniform'.*student has 6 layers and the "
                                            r"teacher only 4"):
        resolve_contract(job({"hidden_layers": "uniform", "hidden_weight": 1}).distill, TEACHER, deep)


def test_check_contract_refuses_different_classes_and_vocabularies():
    five_classes = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_labels=5)
    with pytest.raises(ContractError, match=r"teacher predicts 7 classes but the student 5.*distill\.soft_weight"):
        check_contract(job(), TEACHER, five_classes)
    other_vocab = BertConfig(vocab_size=900, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_labels=7)
    with pytest.raises(ContractError, match=r"vocabulary has 900 pieces but the teacher's 500.*student\.model"):
        check_contract(job(), TEACHER, other_vocab)
    # A trimmed vocabulary reads the teacher's ids through its map: allowed.
    check_contract(job(student={"trim_vocabulary": True}), TEACHER, other_vocab)
    check_contract(job({"hidden_layers": "uniform", "hidden_weight": 1}), TEACHER, STUDENT)


def test_contract_errors_are_model_setup_errors_so_the_cli_exits_with_bad_input():
    assert issubclass(ContractError, ModelSetupError)


@pytest.mark.parametrize(
    "distill, message",
    [
        ({"hidden_weight": 1}, r"distill: .*hidden_weight is 1.0 but hidden_layers is not set"),
        ({"attention_layers": "uniform"}, r"attention_layers is set but attention_weight is 0"),
        ({"hidden_layers": [[1, 2], [1, 2]], "hidden_weight": 1}, r"hidden_layers lists a pair twice"),
        ({"hidden_layers": [[-1, 2]], "hidden_weight": 1}, r"distill\.hidden_layers"),
        ({"relation_heads": 2}, r"relation_heads is set but attention_layers is not"),
        ({"pseudo_label_threshold": 0.9, "hard_weight": 0}, r"pseudo_label_threshold is 0.9 but hard_weight is 0"),
        ({"soft_weight": 0, "hard_weight": 0}, r"learn nothing"),
    ],
)
def test_distill_section_is_refused_with_the_field(distill, message):
    with pytest.raises(ConfigError, match=message):
        job(distill)


def test_features_alone_are_a_valid_job():
    config = job({"soft_weight": 0, "hard_weight": 0, "hidden_layers": [[2, 4]], "hidden_weight": 1})
    assert config.distill.hidden_layers == [(2, 4)]


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"data": {"path": "/data", "label_column": None}},
         r"data\.label_column is null .*need labels: data\.eval_split, teacher\.model 'random'"),
        ({"data": {"path": "/data", "label_column": None, "withhold_labels": True}}, r"no labels to withhold"),
        ({"data": {"path": "/data", "withhold_labels": True}, "distill": {"soft_weight": 0, "hard_weight": 1}},
         r"student gets no labels .*distill\.pseudo_label_threshold"),
    ],
)
def test_unlabelled_jobs_are_refused_where_labels_are_needed(sections, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({"teacher": {"model": "random", "config": {"model_type": "bert"}}, **sections})


def test_unlabelled_text_with_a_trained_teacher_and_withheld_labels_are_valid():
    unlabelled = validate_config({"teacher": {"model": "some/checkpoint"},
                                  "data": {"path": "/data", "label_column": None, "eval_split": None},
                                  "distill": {"pseudo_label_threshold": 0.8}})
    assert unlabelled.data.label_column is None
    withheld = job({"soft_weight": 0, "hard_weight": 1, "pseudo_label_threshold": 0.5},
                   data={"path": "/data", "withhold_labels": True})
    assert withheld.data.withhold_labels
