"""A factorised word embedding (student.embedding_size): a BERT-layout student becomes an ALBERT model
with the same layers and head, exact where its embedding tables fit the kept directions, and loadable
by stock transformers and onnxruntime."""

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from polydistill.cluster.config import ConfigError, StudentConfig, validate_config
from polydistill.student.architecture import ModelSetupError
from polydistill.student.factorise import factorised_student
from polydistill.student.onnx_export import export_classifier_onnx
from polydistill.student.quantize import onnx_unavailable_reason
from polydistill.student.vocab_trim import count_parameters
from tests.unit.test_onnx_export import WORDS, word_level_tokenizer

HIDDEN, LAYERS, VOCAB, POSITIONS = 48, 2, 300, 40


def _config(**fields) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                      intermediate_size=96, max_position_embeddings=POSITIONS, num_labels=3, **fields)


def _bert(cls=BertForSequenceClassification, **fields):
    torch.manual_seed(0)
    model = cls(_config(**fields)).eval()
    with torch.no_grad():  # a gain and bias that are not the identity, so the map back has to carry them
        model.base_model.embeddings.LayerNorm.weight.uniform_(0.5, 1.5)
        model.base_model.embeddings.LayerNorm.bias.normal_(0, 0.1)
    return model


def _inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 17), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 11:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": (torch.arange(17) > 8).long().expand(3, -1)}


def _centred_directions(count: int, seed: int = 2) -> torch.Tensor:
    """``count`` orthonormal directions (rows) orthogonal to all-ones, in the hidden width."""
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(HIDDEN, count, generator=generator, dtype=torch.float64)
    raw -= raw.mean(dim=0, keepdim=True)
    return torch.linalg.qr(raw)[0].T.float()


def _set_tables(model, words: torch.Tensor, positions: torch.Tensor, types: torch.Tensor) -> None:
    """The tables' centred rows as given, each row shifted along all-ones by a random offset (which BERT's
    centring removes, so the conversion must ignore it too)."""
    generator = torch.Generator().manual_seed(3)
    embeddings = model.base_model.embeddings
    with torch.no_grad():
        for table, rows in ((embeddings.word_embeddings, words), (embeddings.position_embeddings, positions),
                            (embeddings.token_type_embeddings, types)):
            table.weight.copy_(rows + torch.randn(rows.shape[0], 1, generator=generator))


def _coefficients(rows: int, scales: list[float], seed: int) -> torch.Tensor:
    """Coefficients whose columns are orthogonal, each of root-mean-square ``scales[i]``: the rows' energy along
    direction i is then exactly rows * scales[i] ** 2, with nothing shared between directions."""
    generator = torch.Generator().manual_seed(seed)
    orthonormal = torch.linalg.qr(torch.randn(rows, len(scales), generator=generator, dtype=torch.float64))[0]
    return (orthonormal * rows ** 0.5).float() * torch.tensor(scales)


def test_at_the_full_width_the_albert_model_computes_what_the_bert_one_does():
    bert = _bert()
    albert = factorised_student(bert, HIDDEN)
    expected, got = (model(**_inputs(), output_hidden_states=True) for model in (bert, albert))

    assert albert.config.model_type == "albert" and albert.config.num_hidden_groups == LAYERS
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-4)
    for layer, (ours, theirs) in enumerate(zip(got.hidden_states, expected.hidden_states, strict=True)):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4, msg=f"hidden state {layer}")


def test_a_narrow_embedding_is_exact_when_the_tables_fit_its_directions():
    """E - 1 directions are kept (the last coordinate holds what ALBERT's own centring would remove): tables
    whose centred rows span E - 1 directions between them convert without loss, the type vectors' own
    direction included, however random those directions are."""
    size = 12
    directions = _centred_directions(size - 1)
    bert = _bert()
    shared = directions[: size - 2]  # words and positions; the type vectors add the last direction
    _set_tables(bert, _coefficients(VOCAB, [1.0] * (size - 2), 4) @ shared,
                _coefficients(POSITIONS, [1.0] * (size - 2), 5) @ shared,
                torch.tensor([[0.0], [2.0]]) * directions[-1:] + 0.3 * torch.randn(2, size - 2) @ shared)
    albert = factorised_student(bert, size)

    expected, got = (model(**_inputs(), output_hidden_states=True) for model in (bert, albert))
    torch.testing.assert_close(got.hidden_states[0], expected.hidden_states[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)
    rows = albert.get_input_embeddings().weight
    assert rows.shape == (VOCAB, size)
    torch.testing.assert_close(rows.sum(dim=1), torch.zeros(VOCAB), atol=1e-4, rtol=0)


def test_below_the_tables_rank_the_leading_directions_are_the_ones_kept():
    """Word vectors over six directions of falling weight, positions and types over the first two: E = 3
    keeps those two, so each narrow word row is as long as its part along them, not as the whole row."""
    directions = _centred_directions(6)
    coefficients = _coefficients(VOCAB, [8.0, 4.0, 2.0, 1.0, 0.5, 0.25], 4)
    bert = _bert()
    _set_tables(bert, coefficients @ directions, _coefficients(POSITIONS, [4.0, 2.0], 5) @ directions[:2],
                _coefficients(2, [1.0, 1.0], 6) @ directions[:2])
    rows = factorised_student(bert, 3).get_input_embeddings().weight

    torch.testing.assert_close(rows.norm(dim=1), coefficients[:, :2].norm(dim=1), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(rows.norm(dim=1), coefficients.norm(dim=1), atol=0.1)  # the other four are dropped


def test_the_factorised_student_counts_the_narrow_tables_and_the_map():
    bert = _bert()
    size = 16
    albert = factorised_student(bert, size)
    embeddings = bert.base_model.embeddings
    full_tables = sum(count_parameters(table) for table in (
        embeddings.word_embeddings, embeddings.position_embeddings, embeddings.token_type_embeddings))
    narrow_tables = full_tables // HIDDEN * size
    # The narrow tables, their normalisation over E instead of the hidden width, and the map back to the
    # hidden width (weights and bias).
    normalisation = 2 * size - 2 * HIDDEN
    expected = count_parameters(bert) - full_tables + narrow_tables + normalisation + (size * HIDDEN + HIDDEN)
    assert count_parameters(albert) == expected


def test_saved_it_loads_as_a_stock_albert_classifier(tmp_path):
    albert = factorised_student(_bert(), 16)
    albert.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()

    assert type(loaded).__name__ == "AlbertForSequenceClassification" and loaded.config.embedding_size == 16
    assert loaded.config.id2label == albert.config.id2label
    torch.testing.assert_close(loaded(**_inputs()).logits, albert(**_inputs()).logits)


@pytest.mark.parametrize("cls", [BertModel, BertForTokenClassification])
def test_encoders_and_token_classifiers_convert_too(cls):
    bert = _bert(cls)
    albert = factorised_student(bert, HIDDEN)
    expected, got = bert(**_inputs())[0], albert(**_inputs())[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_an_encoders_pooler_is_copied_and_one_without_stays_without():
    bert = _bert(BertModel)
    torch.testing.assert_close(factorised_student(bert, HIDDEN)(**_inputs()).pooler_output,
                               bert(**_inputs()).pooler_output, atol=1e-4, rtol=1e-4)
    torch.manual_seed(0)
    bare = BertModel(_config(), add_pooling_layer=False).eval()
    assert factorised_student(bare, HIDDEN)(**_inputs()).pooler_output is None


def test_the_heads_dropout_and_the_training_mode_carry_over():
    bert = _bert(classifier_dropout=0.0).train()
    albert = factorised_student(bert, 16)
    assert albert.training and albert.config.classifier_dropout_prob == 0.0
    unset = factorised_student(_bert(), 16)
    assert not unset.training and unset.config.classifier_dropout_prob == unset.config.hidden_dropout_prob


@pytest.mark.skipif(onnx_unavailable_reason() is not None, reason=str(onnx_unavailable_reason()))
def test_onnxruntime_runs_the_exported_factorised_student(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    factorised_student(BertForSequenceClassification(config).eval(), 8).save_pretrained(tmp_path / "student")
    word_level_tokenizer().save_pretrained(tmp_path / "student")

    exported = export_classifier_onnx(tmp_path / "student", tmp_path / "onnx", int8=False)
    assert exported.float_max_abs_diff < 1e-4


def test_only_bert_layout_students_and_widths_up_to_the_hidden_size_are_factorised():
    with pytest.raises(ModelSetupError, match="student.embedding_size .* between 2 and the student's hidden_size"):
        factorised_student(_bert(), HIDDEN + 1)
    roberta = XLMRobertaForSequenceClassification(XLMRobertaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96))
    with pytest.raises(ModelSetupError, match="'xlm-roberta' .*drop student.embedding_size"):
        factorised_student(roberta, 16)
    with pytest.raises(ModelSetupError, match="BertForMaskedLM cannot be factorised"):
        factorised_student(BertForMaskedLM(_config()), 16)
    with pytest.raises(ValueError, match="embedding_size"):
        StudentConfig(embedding_size=1)


MINIMAL = {"teacher": {"model": "random", "config": {"model_type": "bert"}}, "data": {"path": "/data"}}


def test_tasks_a_factorised_student_cannot_serve_are_refused_at_validation():
    def refused(**sections) -> str:
        with pytest.raises(ConfigError) as info:
            validate_config({**MINIMAL, **sections})
        return str(info.value)

    assert "not masked-lm: drop student.embedding_size" in refused(
        task="masked-lm", student={"embedding_size": 64}, data={"path": "/data", "label_column": None}, distill={"top_k": 16})
    assert "extra_students[small].embedding_size" in refused(
        task="masked-lm", extra_students=[{"name": "small", "embedding_size": 64}],
        data={"path": "/data", "label_column": None}, distill={"top_k": 16})
    assert "drop student.embedding_size or extra_tasks" in refused(
        student={"embedding_size": 64},
        extra_tasks=[{"name": "tags", "task": "token-classification", "data": {"path": "/tags", "label_column": "tags", "word_tags": True},
                      "teacher": {"model": "random", "config": {"model_type": "bert"}}}])
    assert validate_config({**MINIMAL, "task": "sentence-embedding", "student": {"embedding_size": 64},
                            "data": {"path": "/data", "parallel": True, "label_column": None},
                            "distill": {"soft_weight": 0, "hard_weight": 0, "embedding_weight": 1}}
                           ).student.embedding_size == 64
