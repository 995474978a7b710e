"""Structured and magnitude pruning on a tiny BERT: shapes shrink, outputs match the masked
model, saved directories reload to identical outputs, and importance finds a silenced head."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from polydistill.storage.job_data import TokenizedSplit
from polydistill.student.prune import (
    ImportanceScores,
    apply_plan,
    heads_per_layer,
    importance_scores,
    intermediate_sizes,
    magnitude_prune,
    apply_masks,
    plan_structured_pruning,
    prune_ffn_neurons,
    prune_heads,
)

LAYERS, HEADS, WIDTH, FFN, VOCAB, LABELS = 3, 4, 32, 64, 50, 3
HEAD_SIZE = WIDTH // HEADS


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=32, num_labels=LABELS,
    )
    model = BertForSequenceClassification(config).eval()
    torch.nn.init.normal_(model.classifier.weight, std=1.0)  # logits far enough apart to matter
    return model


def tiny_rows(n: int = 24, seed: int = 0) -> TokenizedSplit:
    rng = np.random.default_rng(seed)
    token_ids = [rng.integers(1, VOCAB, size=rng.integers(4, 12)).astype(np.int32) for _ in range(n)]
    return TokenizedSplit(
        sample_ids=np.arange(n, dtype=np.int64), token_ids=token_ids,
        labels=rng.integers(0, LABELS, size=n).astype(np.int64), languages=["en", "fr"] * (n // 2),
    )


@pytest.fixture
def inputs():
    input_ids = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # padding must still be masked in the pruned attention
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def silence_head(model, layer: int, head: int) -> None:
    with torch.no_grad():
        model.bert.encoder.layer[layer].attention.output.dense.weight[:, head * HEAD_SIZE : (head + 1) * HEAD_SIZE] = 0


def test_prune_heads_shrinks_shapes_equals_masked_model_and_reloads(tmp_path, inputs):
    model, reference = tiny_bert(), tiny_bert()
    for layer, head in ((0, 1), (0, 3), (2, 0)):
        silence_head(reference, layer, head)  # removing a head == zeroing what reads its output

    prune_heads(model, {0: [1, 3], 2: [0]})

    assert heads_per_layer(model) == [2, 4, 3]
    for layer, count in zip(model.bert.encoder.layer, [2, 4, 3]):
        attention = layer.attention
        for projection in (attention.self.query, attention.self.key, attention.self.value):
            assert projection.weight.shape == (count * HEAD_SIZE, WIDTH)
        assert attention.output.dense.weight.shape == (WIDTH, count * HEAD_SIZE)
    assert model.config.heads_per_layer == [2, 4, 3]
    assert model.config.num_attention_heads == HEADS  # still fixes the head size
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), atol=1e-5, rtol=1e-5)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert heads_per_layer(reloaded) == [2, 4, 3]
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))

    prune_heads(reloaded, {1: [0, 1]})  # indices are the layer's current ones; prunes again
    assert reloaded.config.heads_per_layer == [2, 2, 3]


def test_prune_heads_refuses_to_empty_a_layer():
    with pytest.raises(ValueError, match="without heads"):
        prune_heads(tiny_bert(), {1: [0, 1, 2, 3]})


def test_prune_ffn_neurons_shrinks_and_reloads_with_the_stock_class(tmp_path, inputs):
    model, reference = tiny_bert(), tiny_bert()
    keep = {layer: torch.arange(layer % 2, FFN, 2) for layer in range(LAYERS)}  # 32 per layer
    with torch.no_grad():
        for layer, kept in keep.items():
            dropped = torch.ones(FFN, dtype=torch.bool)
            dropped[kept] = False
            reference.bert.encoder.layer[layer].output.dense.weight[:, dropped] = 0

    prune_ffn_neurons(model, keep)

    assert intermediate_sizes(model) == [FFN // 2] * LAYERS
    for layer in model.bert.encoder.layer:
        assert layer.intermediate.dense.weight.shape == (FFN // 2, WIDTH)
        assert layer.output.dense.weight.shape == (WIDTH, FFN // 2)
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), atol=1e-5, rtol=1e-5)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is BertForSequenceClassification and reloaded.config.intermediate_size == FFN // 2
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


def test_prune_ffn_neurons_keeps_layers_uniform():
    with pytest.raises(ValueError, match="same number of neurons"):
        prune_ffn_neurons(tiny_bert(), {0: torch.arange(10)})


def test_plan_keeps_a_head_per_layer_and_hits_the_sparsity():
    # Layer 0's heads are all the least important; it must still keep its best one.
    heads = (torch.tensor([0.01, 0.02, 0.03, 0.04]), torch.tensor([5.0, 1.0, 6.0, 7.0]), torch.tensor([8.0, 9.0, 2.0, 3.0]))
    neurons = tuple(torch.arange(FFN, dtype=torch.float).roll(layer) for layer in range(LAYERS))
    scores = ImportanceScores(heads=heads, neurons=neurons, batches=1)

    plan = plan_structured_pruning(scores, head_sparsity=0.5, ffn_sparsity=0.25, normalize_per_layer=False)

    assert plan.heads_to_prune == {0: [0, 1, 2], 1: [1], 2: [2, 3]}
    assert sum(len(h) for h in plan.heads_to_prune.values()) == round(0.5 * LAYERS * HEADS)
    assert all(len(plan.heads_to_prune.get(layer, [])) < HEADS for layer in range(LAYERS))
    for layer, kept in plan.neurons_to_keep.items():
        assert len(kept) == FFN - FFN // 4
        assert set(kept.tolist()) == set(torch.topk(neurons[layer], FFN - FFN // 4).indices.tolist())
    with pytest.raises(ValueError, match="at least one"):
        plan_structured_pruning(scores, head_sparsity=0.8, ffn_sparsity=0.0)


def test_importance_is_zero_for_a_silenced_head_and_neuron():
    model = tiny_bert()
    silence_head(model, layer=1, head=2)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[:, 5] = 0

    scores = importance_scores(model, tiny_rows(), pad_id=0, batch_size=8)

    assert scores.batches == 3
    assert [len(s) for s in scores.heads] == [HEADS] * LAYERS
    assert scores.heads[1][2] == 0
    assert (scores.heads[1][[0, 1, 3]] > 0).all()
    assert scores.neurons[0][5] == 0 and (scores.neurons[0].sum() > 0)
    assert all(p.grad is None for p in model.parameters())


def test_plan_applied_end_to_end_reloads(tmp_path, inputs):
    model = tiny_bert()
    plan = plan_structured_pruning(importance_scores(model, tiny_rows(), pad_id=0), 0.25, 0.5)
    apply_plan(model, plan)
    assert sum(heads_per_layer(model)) == LAYERS * HEADS - 3
    assert intermediate_sizes(model) == [FFN // 2] * LAYERS
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


def test_magnitude_prune_reaches_the_sparsity_and_masks_survive_training():
    model = tiny_bert()
    embeddings_before = model.bert.embeddings.word_embeddings.weight.clone()

    result = magnitude_prune(model, 0.6)

    assert result.zeroed == round(0.6 * result.prunable)
    assert result.actual == pytest.approx(0.6, abs=1 / result.prunable)
    assert model.bert.encoder.layer[0].intermediate.dense.weight.shape == (FFN, WIDTH)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, embeddings_before)
    with torch.no_grad():  # a fine-tune would regrow the zeros; the masks put them back
        for parameter in model.parameters():
            parameter.add_(0.1)
    apply_masks(model, result.masks)
    zeros = sum(int((model.get_parameter(name) == 0).sum()) for name in result.masks)
    assert zeros == result.zeroed
