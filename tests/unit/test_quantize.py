"""The int8 path on a tiny BERT: close to float, smaller, and reproduced from its saved folder."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from student.prune import prune_heads
from student.quantize import (
    QUANTIZATION_FILE,
    export_onnx,
    load_quantized,
    onnx_max_abs_diff,
    onnx_unavailable_reason,
    quantize_dynamic_int8,
    save_quantized,
    serialized_size_bytes,
)

VOCAB = 64


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
    quantized = quantize_dynamic_int8(model)

    float_logits, int8_logits = logits(model, inputs), logits(quantized, inputs)
    assert (float_logits.argmax(-1) == int8_logits.argmax(-1)).float().mean() >= 0.95
    assert (float_logits - int8_logits).abs().max() < 0.2 * float_logits.abs().max()
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, torch.nn.Linear)  # float model untouched
    assert serialized_size_bytes(quantized) < 0.5 * serialized_size_bytes(model)


def test_saved_int8_folder_reproduces_the_outputs(model, inputs, tmp_path):
    save_quantized(model, tmp_path)

    marker = json.loads((tmp_path / QUANTIZATION_FILE).read_text())
    assert marker["method"] == "dynamic int8 of nn.Linear"
    assert torch.equal(logits(load_quantized(tmp_path), inputs), logits(quantize_dynamic_int8(model), inputs))
    assert torch.equal(logits(AutoModelForSequenceClassification.from_pretrained(tmp_path), inputs), logits(model, inputs))


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


@pytest.mark.skipif(onnx_unavailable_reason() is not None, reason=str(onnx_unavailable_reason()))
def test_onnx_export_matches_torch(model, inputs, tmp_path):
    sample = {name: tensor[:4] for name, tensor in inputs.items()}
    path = export_onnx(model, sample, tmp_path / "model.onnx")
    assert onnx_max_abs_diff(model, path, sample) < 1e-4
