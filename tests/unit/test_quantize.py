"""The int8 path on a tiny BERT: close to float, smaller, and reproduced from its saved folder;
with embeddings (the default) the word / position / token-type tables are per-row 8-bit too."""

import json

import pytest
import torch
from torch.ao.nn.quantized import Embedding as QuantizedEmbedding
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from polydistill.student.onnx_export import SPINNING_ENTRY, OnnxRuntimeClassifier
from polydistill.student.prune import prune_heads
from polydistill.student.quantize import (
    METHOD,
    METHOD_WITH_EMBEDDINGS,
    QUANTIZATION_FILE,
    embedding_module_names,
    export_onnx,
    load_quantized,
    onnx_max_abs_diff,
    onnx_unavailable_reason,
    quantize_dynamic_int8,
    save_quantized,
    serialized_size_bytes,
)

VOCAB = 64
EMBEDDINGS = ["bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings",
              "bert.embeddings.token_type_embeddings"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=32, num_labels=3,
    )
    model = BertForSequenceClassification(config).eval()
    torch.nn.init.normal_(model.classifier.weight, std=1.0)  # logit margins a random model lacks
    return model


@pytest.fixture(scope="module")
def inputs():
    input_ids = torch.randint(1, VOCAB, (64, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::3, 8:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def logits(model, inputs):
    with torch.inference_mode():
        return model(**inputs).logits


def test_int8_agrees_with_float_and_is_smaller(model, inputs):
    quantized = quantize_dynamic_int8(model, embeddings=False)

    float_logits, int8_logits = logits(model, inputs), logits(quantized, inputs)
    assert (float_logits.argmax(-1) == int8_logits.argmax(-1)).float().mean() >= 0.95
    assert (float_logits - int8_logits).abs().max() < 0.2 * float_logits.abs().max()
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, torch.nn.Linear)  # float model untouched
    assert type(quantized.bert.embeddings.word_embeddings) is torch.nn.Embedding  # embeddings=False: left float
    assert serialized_size_bytes(quantized) < 0.5 * serialized_size_bytes(model)


def _bert(vocab: int, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    torch.nn.init.normal_(model.classifier.weight, std=1.0)
    return model


@pytest.fixture(scope="module")
def big_vocab_model():
    """Like a vocabulary-heavy multilingual student: the 2048 x 64 word table outweighs the Linears."""
    return _bert(2048)


def test_embeddings_are_per_row_8bit_and_shrink_the_size_as_expected(big_vocab_model):
    model = big_vocab_model
    assert embedding_module_names(model) == EMBEDDINGS
    linear_only, full = quantize_dynamic_int8(model, embeddings=False), quantize_dynamic_int8(model)

    for name in EMBEDDINGS:
        table = full.get_submodule(name)
        assert type(table) is QuantizedEmbedding and table.dtype == torch.quint8
        assert table.weight().qscheme() == torch.per_channel_affine_float_qparams  # a scale and zero point per row
    assert type(model.bert.embeddings.word_embeddings) is torch.nn.Embedding  # float model untouched
    # Each table: 4 bytes per weight -> 1 byte, plus a float32 scale and zero point per row (8 bytes).
    tables = [model.get_submodule(name).weight for name in EMBEDDINGS]
    expected_saving = sum(3 * w.numel() - 8 * w.shape[0] for w in tables)
    saving = serialized_size_bytes(linear_only) - serialized_size_bytes(full)
    assert saving == pytest.approx(expected_saving, rel=0.02)  # measured: 380,922 vs 383,088 bytes expected
    assert serialized_size_bytes(model) / serialized_size_bytes(full) > 3.2  # measured 3.34 (1.44 Linear-only)


def test_int8_embeddings_stay_close_to_float(big_vocab_model):
    model = big_vocab_model
    input_ids = torch.randint(1, 2048, (64, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::3, 8:] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    full = quantize_dynamic_int8(model)

    # Every stored row is within half a quantisation step (range / 255 / 2) of the float row.
    for name in EMBEDDINGS:
        weight = model.get_submodule(name).weight.detach()
        rows = full.get_submodule(name)(torch.arange(weight.shape[0]))
        step = (weight.max(1).values - weight.min(1).values) / 255
        assert ((rows - weight).abs().max(1).values <= 0.51 * step + 1e-7).all()
    with torch.inference_mode():  # the embedding block's output (after LayerNorm, |x| up to ~4): measured 0.019
        assert (full.bert.embeddings(input_ids=input_ids) - model.bert.embeddings(input_ids=input_ids)).abs().max() < 0.06
    float_logits, int8_logits = logits(model, batch), logits(full, batch)
    # Linear + embeddings int8 vs float: measured max |diff| 0.070 against max |logit| 3.2 (2.2 %; 0.07-0.094 over
    # seeds 0-2), argmax agreement 100 %. Tolerance: 10 % of the largest logit, 95 % agreement.
    assert (float_logits.argmax(-1) == int8_logits.argmax(-1)).float().mean() >= 0.95
    assert (float_logits - int8_logits).abs().max() < 0.1 * float_logits.abs().max()


def test_saved_int8_folder_reproduces_the_outputs(model, inputs, tmp_path):
    save_quantized(model, tmp_path)

    marker = json.loads((tmp_path / QUANTIZATION_FILE).read_text())
    assert marker["method"] == METHOD_WITH_EMBEDDINGS
    assert marker["modules"] == ["torch.nn.Linear", "torch.nn.Embedding"]
    assert marker["embedding_modules"] == EMBEDDINGS
    loaded = load_quantized(tmp_path)
    assert all(type(loaded.get_submodule(name)) is QuantizedEmbedding for name in EMBEDDINGS)
    assert torch.equal(logits(loaded, inputs), logits(quantize_dynamic_int8(model), inputs))
    assert serialized_size_bytes(loaded) == serialized_size_bytes(quantize_dynamic_int8(model))
    assert torch.equal(logits(AutoModelForSequenceClassification.from_pretrained(tmp_path), inputs), logits(model, inputs))


def test_linear_only_save_writes_the_old_marker(model, inputs, tmp_path):
    save_quantized(model, tmp_path, embeddings=False)

    marker = json.loads((tmp_path / QUANTIZATION_FILE).read_text())
    assert marker["method"] == METHOD == "dynamic int8 of nn.Linear"
    assert marker["modules"] == ["torch.nn.Linear"] and "embedding_modules" not in marker
    loaded = load_quantized(tmp_path)
    assert type(loaded.bert.embeddings.word_embeddings) is torch.nn.Embedding
    assert torch.equal(logits(loaded, inputs), logits(quantize_dynamic_int8(model, embeddings=False), inputs))


def test_a_marker_written_before_embeddings_were_an_option_still_loads(model, inputs, tmp_path):
    model.save_pretrained(tmp_path)
    old_marker = {"method": "dynamic int8 of nn.Linear", "dtype": "qint8", "modules": ["torch.nn.Linear"],
                  "api": "torch.ao.quantization.quantize_dynamic", "torch_version": "2.13.0+cpu"}
    (tmp_path / QUANTIZATION_FILE).write_text(json.dumps(old_marker, indent=2) + "\n")

    loaded = load_quantized(tmp_path)
    assert all(type(loaded.get_submodule(name)) is torch.nn.Embedding for name in EMBEDDINGS)  # Linear only
    assert isinstance(loaded.bert.encoder.layer[0].intermediate.dense, torch.ao.nn.quantized.dynamic.Linear)
    assert torch.equal(logits(loaded, inputs), logits(quantize_dynamic_int8(model, embeddings=False), inputs))


def test_the_marker_lists_exactly_the_tables_it_quantised(model, inputs, tmp_path):
    """load_quantized follows the marker's list, not what a fresh quantisation would pick."""
    save_quantized(model, tmp_path)
    marker_path = tmp_path / QUANTIZATION_FILE
    marker = json.loads(marker_path.read_text())
    marker_path.write_text(json.dumps({**marker, "embedding_modules": EMBEDDINGS[:1]}))
    loaded = load_quantized(tmp_path)
    assert type(loaded.bert.embeddings.word_embeddings) is QuantizedEmbedding
    assert type(loaded.bert.embeddings.position_embeddings) is torch.nn.Embedding

    marker_path.write_text(json.dumps({**marker, "embedding_modules": ["bert.embeddings.LayerNorm"]}))
    with pytest.raises(ValueError, match="LayerNorm.*expected torch.nn.Embedding"):
        load_quantized(tmp_path)
    marker_path.write_text(json.dumps({**marker, "method": "static int4"}))
    with pytest.raises(ValueError, match="static int4"):
        load_quantized(tmp_path)


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_quantised_embeddings_run_in_every_hf_call_pattern(family):
    """The int8 lookup kernel rejects strided indices, and HF passes some: BERT's default token-type ids
    are an expanded buffer, XLM-R's position ids for inputs_embeds too. All three tables must still work."""
    torch.manual_seed(0)
    sizes = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=40, num_labels=3)
    model = (BertForSequenceClassification(BertConfig(**sizes)) if family == "bert"
             else XLMRobertaForSequenceClassification(XLMRobertaConfig(**sizes))).eval()
    quantized = quantize_dynamic_int8(model)
    assert {type(quantized.get_submodule(name)) for name in embedding_module_names(model)} == {QuantizedEmbedding}
    assert len(embedding_module_names(model)) == 3
    input_ids = torch.randint(3, 100, (4, 10), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 6:] = 0
    calls = [
        {},  # token-type (and, for BERT, position) ids from the model's buffers
        {"token_type_ids": torch.zeros_like(input_ids)},
        {"position_ids": torch.arange(2, 12).expand(4, -1)},  # strided
    ]
    with torch.inference_mode():
        for extra in calls:
            float_logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
            int8_logits = quantized(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
            assert (float_logits - int8_logits).abs().max() < 0.1 * float_logits.abs().max() + 1e-3, extra
        embedded = quantized.get_input_embeddings()(input_ids)
        int8_logits = quantized(inputs_embeds=embedded, attention_mask=attention_mask).logits
        float_logits = model(inputs_embeds=model.get_input_embeddings()(input_ids), attention_mask=attention_mask).logits
        assert (float_logits - int8_logits).abs().max() < 0.1 * float_logits.abs().max() + 1e-3


def test_load_quantized_needs_the_marker(model, tmp_path):
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=QUANTIZATION_FILE):
        load_quantized(tmp_path)


def test_head_pruned_model_quantizes_and_reloads(tmp_path, inputs):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    pruned = prune_heads(BertForSequenceClassification(config).eval(), {0: [0, 2]})
    save_quantized(pruned, tmp_path)
    assert torch.equal(logits(load_quantized(tmp_path), inputs), logits(quantize_dynamic_int8(pruned), inputs))
    assert type(load_quantized(tmp_path).bert.embeddings.word_embeddings) is QuantizedEmbedding


@pytest.mark.skipif(onnx_unavailable_reason() is not None, reason=str(onnx_unavailable_reason()))
def test_onnx_export_matches_torch(model, inputs, tmp_path):
    sample = {name: tensor[:4] for name, tensor in inputs.items()}
    path = export_onnx(model, sample, tmp_path / "model.onnx")
    assert onnx_max_abs_diff(model, path, sample) < 1e-4


@pytest.mark.skipif(onnx_unavailable_reason() is not None, reason=str(onnx_unavailable_reason()))
def test_the_onnx_classifier_timed_beside_torch_uses_torchs_threads_and_leaves_no_thread_spinning(
        model, inputs, tmp_path):
    sample = {name: tensor[:4] for name, tensor in inputs.items()}
    runtime = OnnxRuntimeClassifier(export_onnx(model, sample, tmp_path / "model.onnx"))
    options = runtime.session.get_session_options()
    assert options.intra_op_num_threads == torch.get_num_threads()
    assert options.get_session_config_entry(SPINNING_ENTRY) == "0"
    assert torch.allclose(runtime(**sample).logits, logits(model, sample), atol=1e-4)
