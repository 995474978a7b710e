"""A factorised word embedding (student.embedding_size): a BERT-layout student becomes an ALBERT model
with the same layers and head, exact where its embedding tables fit the kept directions, and loadable
by stock transformers and onnxruntime."""

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from polydistill.cluster.config import StudentConfig
from polydistill.student.architecture import ModelSetupError
from polydistill.student.factorise import factorised_student
from polydistill.student.onnx_export import export_classifier_onnx
from polydistill.student.quantize import onnx_unavailable_reason
from polydistill.student.vocab_trim import count_parameters
from tests.unit.test_onnx_export import WORDS, _tokenizer

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


def _low_rank_embeddings(model, rank: int) -> None:
    """Word, position and type tables whose centred rows span ``rank`` directions only."""
    generator = torch.Generator().manual_seed(2)
    directions = torch.randn(rank, HIDDEN, generator=generator)
    embeddings = model.base_model.embeddings
    with torch.no_grad():
        for table in (embeddings.word_embeddings, embeddings.position_embeddings, embeddings.token_type_embeddings):
            rows = table.weight.shape[0]
            offsets = torch.randn(rows, 1, generator=generator)  # along all-ones: BERT's centring removes it
            table.weight.copy_(torch.randn(rows, rank, generator=generator) @ directions + offsets)


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
    whose centred rows span E - 1 directions convert without loss, however random those directions are."""
    size = 12
    bert = _bert()
    _low_rank_embeddings(bert, size - 1)
    albert = factorised_student(bert, size)

    torch.testing.assert_close(albert(**_inputs()).logits, bert(**_inputs()).logits, atol=1e-4, rtol=1e-4)
    rows = albert.get_input_embeddings().weight
    assert rows.shape == (VOCAB, size)
    torch.testing.assert_close(rows.sum(dim=1), torch.zeros(VOCAB), atol=1e-4, rtol=0)


def test_below_the_tables_rank_the_leading_directions_are_the_ones_kept():
    bert = _bert()
    _low_rank_embeddings(bert, 20)
    expected = bert(**_inputs(), output_hidden_states=True).hidden_states[0]
    errors = {size: (factorised_student(bert, size)(**_inputs(), output_hidden_states=True).hidden_states[0]
                     - expected).norm().item() for size in (6, 12, 21)}

    assert errors[21] < 1e-3 < errors[12] < errors[6]


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


@pytest.mark.skipif(onnx_unavailable_reason() is not None, reason=str(onnx_unavailable_reason()))
def test_onnxruntime_runs_the_exported_factorised_student(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    factorised_student(BertForSequenceClassification(config).eval(), 8).save_pretrained(tmp_path / "student")
    _tokenizer().save_pretrained(tmp_path / "student")

    exported = export_classifier_onnx(tmp_path / "student", tmp_path / "onnx", int8=False)
    assert exported.float_max_abs_diff < 1e-4


def test_only_bert_layout_students_and_widths_up_to_the_hidden_size_are_factorised():
    with pytest.raises(ModelSetupError, match="student.embedding_size .* between 2 and the student's hidden_size"):
        factorised_student(_bert(), HIDDEN + 1)
    roberta = XLMRobertaForSequenceClassification(XLMRobertaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96))
    with pytest.raises(ModelSetupError, match="'xlm-roberta': drop student.embedding_size"):
        factorised_student(roberta, 16)
    with pytest.raises(ValueError, match="embedding_size"):
        StudentConfig(embedding_size=1)
