"""Parameter counts against hand sums of a tiny BERT's shapes; latency sanity."""

import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from polydistill.student.efficiency import count_parameters, disk_bytes, measure_latency

VOCAB, WIDTH, LAYERS, FFN, POSITIONS, TOKEN_TYPES, LABELS = 99, 16, 2, 32, 64, 2, 3


@pytest.fixture(scope="module")
def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=FFN, max_position_embeddings=POSITIONS, type_vocab_size=TOKEN_TYPES,
        num_labels=LABELS,
    )
    return BertForSequenceClassification(config)


def test_count_parameters_matches_hand_sums(tiny_bert):
    embedding_tables = VOCAB * WIDTH + POSITIONS * WIDTH + TOKEN_TYPES * WIDTH  # 1584 + 1024 + 32
    embedding_layer_norm = 2 * WIDTH
    per_layer = (
        4 * (WIDTH * WIDTH + WIDTH)  # query, key, value, attention output
        + 2 * WIDTH  # attention LayerNorm
        + (WIDTH * FFN + FFN)  # intermediate
        + (FFN * WIDTH + WIDTH)  # output
        + 2 * WIDTH  # output LayerNorm
    )
    pooler = WIDTH * WIDTH + WIDTH
    classifier = WIDTH * LABELS + LABELS
    non_embedding = embedding_layer_norm + LAYERS * per_layer + pooler + classifier
    assert count_parameters(tiny_bert) == {
        "params": embedding_tables + non_embedding,
        "non_embedding_params": non_embedding,
    }
    assert (embedding_tables, per_layer, non_embedding) == (2640, 2224, 2 * 2224 + 32 + 272 + 51)


def test_count_parameters_of_a_plain_module_without_hf_api():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2))
    assert count_parameters(model) == {"params": 40 + 10, "non_embedding_params": 10}


def test_disk_bytes_sums_files_recursively(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "config.json").write_bytes(b"y" * 24)
    assert disk_bytes(tmp_path) == 1024
    assert disk_bytes(tmp_path / "model.safetensors") == 1000
    with pytest.raises(FileNotFoundError, match="no saved model"):
        disk_bytes(tmp_path / "missing")


def _assert_sane(result, batch_size):
    assert set(result) == {"latency_ms", "samples_per_s"}
    assert math.isfinite(result["latency_ms"]) and result["latency_ms"] > 0
    assert result["samples_per_s"] == pytest.approx(batch_size * 1000 / result["latency_ms"])


def test_measure_latency_with_example_tensors_cycled_to_batch_size(tiny_bert):
    examples = {
        "input_ids": torch.randint(0, VOCAB, (3, 12)),
        "attention_mask": torch.ones(3, 12, dtype=torch.long),
    }
    tiny_bert.train()
    result = measure_latency(tiny_bert, examples, batch_size=8, repeats=3, warmup=1)
    _assert_sane(result, 8)
    assert tiny_bert.training, "the model's training flag must be restored"


def test_measure_latency_with_a_factory(tiny_bert):
    seen_sizes = []

    def make_batch(batch_size):
        seen_sizes.append(batch_size)
        return {"input_ids": torch.randint(0, VOCAB, (batch_size, 10))}

    _assert_sane(measure_latency(tiny_bert, make_batch, batch_size=1, repeats=2, warmup=0), 1)
    assert seen_sizes == [1]


def test_measure_latency_rejects_bad_arguments(tiny_bert):
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_latency(tiny_bert, {"input_ids": torch.zeros(1, 2).long()}, batch_size=1, repeats=0)
    with pytest.raises(ValueError, match="same non-zero batch"):
        measure_latency(
            tiny_bert,
            {"input_ids": torch.zeros(2, 4).long(), "attention_mask": torch.ones(3, 4).long()},
            batch_size=1,
        )
