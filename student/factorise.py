"""A factorised word embedding: the student's vocabulary × E table and an E × hidden projection.

Over a multilingual vocabulary the embedding is most of a small student: 57k pieces × 384 is 21.9M
parameters, against 1.8M for one encoder layer. ALBERT's factorisation (vocabulary × E, then a linear
map to the hidden width) keeps the pieces and cuts the table by hidden/E, and stock libraries load
it (transformers' ALBERT, its ONNX export, sentence-transformers). ``factorised_student`` turns a
BERT-layout student into that ALBERT model with the same layers, pooler and head.

ALBERT sums the word, position and type vectors in E dimensions and normalises them there, while BERT
normalises the sum in the hidden width, so the conversion is exact only where a basis lines the two
up. BERT's normalisation first centres the sum: what matters is its part orthogonal to the all-ones
vector, at most hidden-1 dimensions. The basis is the top E-1 principal directions of the centred
word, position and type vectors; a reflection places them in E coordinates orthogonal to the all-ones
vector, so ALBERT's own centring removes nothing, and its normalisation divides by the same norm as
BERT's. The map back to the hidden width restores BERT's scale, gain and bias. So in evaluation the
converted model computes what the BERT one does wherever the tables' centred rows span at most E-1
directions (always at E = hidden), up to float rounding and a layer-norm epsilon scaled by E/hidden;
below that, what lies outside the kept directions is lost until training recovers it.

Training is not identical even then: the stock ALBERT layer applies no dropout after its feed-forward
block (BERT does), and its embedding dropout acts in E dimensions before the map. Compare a factorised
student with its own hard-label ablation (the same ALBERT model), not with a BERT-layout student's.
"""

from __future__ import annotations

import math

import torch
import transformers
from transformers import AlbertConfig, PreTrainedModel

from polydistill.cluster.config import FACTORISABLE_TASKS
from polydistill.student.architecture import ModelSetupError

# The BERT classes whose ALBERT twin has the same head (by name and shape): the FACTORISABLE_TASKS' models.
CONVERTED_CLASSES = {
    "BertModel": "AlbertModel",  # sentence embeddings
    "BertForSequenceClassification": "AlbertForSequenceClassification",
    "BertForTokenClassification": "AlbertForTokenClassification",
}
# Rows of the tables at a time when summing their Gram matrix: a 250k-piece table stays in float32.
_GRAM_CHUNK = 16384


def factorised_student(model: PreTrainedModel, embedding_size: int) -> PreTrainedModel:
    """The ALBERT equivalent of a BERT-layout ``model`` (its layers, pooler and head copied) whose word,
    position and type tables are ``embedding_size`` wide, initialised as the module docstring says."""
    config = model.config
    if config.model_type != "bert":
        raise ModelSetupError(
            f"student.embedding_size factorises a BERT-layout student's embedding; this student is "
            f"{config.model_type!r} (from student.model, or the teacher's architecture): drop "
            "student.embedding_size, or start from a BERT-architecture model (multilingual-e5-small, mBERT, LaBSE)"
        )
    hidden = config.hidden_size
    if not 2 <= embedding_size <= hidden:
        raise ModelSetupError(
            f"student.embedding_size {embedding_size} must lie between 2 and the student's hidden_size ({hidden})"
        )
    bert_class = type(model).__name__
    if bert_class not in CONVERTED_CLASSES:
        raise ModelSetupError(
            f"student.embedding_size: a {bert_class} cannot be factorised (supported: {', '.join(CONVERTED_CLASSES)}, "
            f"for the tasks {', '.join(FACTORISABLE_TASKS)}): drop student.embedding_size for this task"
        )
    bert_base = model.base_model
    albert_class = getattr(transformers, CONVERTED_CLASSES[bert_class])
    albert_config = _albert_config(config, embedding_size)
    has_pooler = getattr(bert_base, "pooler", None) is not None
    albert = (albert_class(albert_config, add_pooling_layer=has_pooler) if bert_class == "BertModel"
              else albert_class(albert_config))
    albert_base = albert.base_model
    with torch.no_grad():
        _copy_embeddings(bert_base.embeddings, albert_base, embedding_size)
        groups = albert_base.encoder.albert_layer_groups
        for bert_layer, group in zip(bert_base.encoder.layer, groups, strict=True):
            _copy_layer(bert_layer, group.albert_layers[0])
        if has_pooler and albert_base.pooler is not None:
            albert_base.pooler.load_state_dict(bert_base.pooler.dense.state_dict())
        if albert is not albert_base:
            albert.classifier.load_state_dict(model.classifier.state_dict())
    albert.train(model.training)
    return albert


def _albert_config(bert: transformers.BertConfig, embedding_size: int) -> AlbertConfig:
    fields = {key: getattr(bert, key) for key in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
        "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id", "bos_token_id",
        "eos_token_id", "num_labels", "id2label", "label2id", "problem_type")}
    # BERT's head falls back to the hidden dropout only when classifier_dropout is unset (0.0 is a setting).
    classifier_dropout = getattr(bert, "classifier_dropout", None)
    fields["classifier_dropout_prob"] = bert.hidden_dropout_prob if classifier_dropout is None else classifier_dropout
    return AlbertConfig(
        embedding_size=embedding_size,
        num_hidden_groups=bert.num_hidden_layers,  # a group per layer: nothing shared, unlike ALBERT's own
        inner_group_num=1,
        **fields,
    )


def _copy_embeddings(bert: torch.nn.Module, albert: torch.nn.Module, embedding_size: int) -> None:
    tables = [bert.word_embeddings.weight, bert.position_embeddings.weight, bert.token_type_embeddings.weight]
    hidden = tables[0].shape[1]
    basis = _principal_basis(tables, embedding_size - 1)  # hidden × (E-1)
    reflection = _reflection_to_ones(embedding_size)  # E × E: its last column is the all-ones direction
    coordinates = reflection[:, :-1]  # E × (E-1), columns orthogonal to the all-ones vector

    def project(table: torch.Tensor) -> torch.Tensor:  # rows in E coordinates, each summing to zero
        return _centred(table.float()) @ basis @ coordinates.T

    target = albert.embeddings
    for source, narrow in zip(tables, (target.word_embeddings, target.position_embeddings,
                                       target.token_type_embeddings), strict=True):
        narrow.weight.copy_(project(source))
    target.LayerNorm.weight.fill_(1.0)
    target.LayerNorm.bias.zero_()
    # ALBERT's unit normalisation in E dims is BERT's in hidden dims up to sqrt(hidden / E).
    gain, bias = bert.LayerNorm.weight.float(), bert.LayerNorm.bias.float()
    mapping = albert.encoder.embedding_hidden_mapping_in
    mapping.weight.copy_(math.sqrt(hidden / embedding_size) * gain[:, None] * (basis @ coordinates.T))
    mapping.bias.copy_(bias)


def _centred(table: torch.Tensor) -> torch.Tensor:
    return table - table.mean(dim=1, keepdim=True)


def _principal_basis(tables: list[torch.Tensor], rank: int) -> torch.Tensor:
    """The ``rank`` leading directions (hidden × rank, orthonormal) of the tables' centred rows, each table
    weighted to count as much as the first (the words): every token's input is one row of each. Centred
    rows are orthogonal to all-ones, and so is every direction they carry weight in. From the eigenvectors
    of the hidden × hidden Gram matrix, summed in chunks: no copy of a table in double precision."""
    hidden = tables[0].shape[1]
    gram = torch.zeros(hidden, hidden, dtype=torch.float64)
    words = tables[0].shape[0]
    for table in tables:
        weight = words / table.shape[0]
        for chunk in table.detach().split(_GRAM_CHUNK):
            rows = _centred(chunk.float()).double()
            gram += weight * (rows.T @ rows)
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vectors[:, -rank:].flip(1).float()


def _reflection_to_ones(size: int) -> torch.Tensor:
    """A Householder reflection (symmetric, orthogonal) that swaps the last unit vector and the
    normalised all-ones vector: coordinates spanned by its other columns sum to zero."""
    last = torch.zeros(size, dtype=torch.float64)
    last[-1] = 1.0
    ones = torch.full((size,), 1 / math.sqrt(size), dtype=torch.float64)
    direction = last - ones  # never zero: size is at least 2
    direction /= direction.norm()
    return (torch.eye(size, dtype=torch.float64) - 2 * torch.outer(direction, direction)).float()


def _copy_layer(bert: torch.nn.Module, albert: torch.nn.Module) -> None:
    pairs = [
        (bert.attention.self.query, albert.attention.query),
        (bert.attention.self.key, albert.attention.key),
        (bert.attention.self.value, albert.attention.value),
        (bert.attention.output.dense, albert.attention.dense),
        (bert.attention.output.LayerNorm, albert.attention.LayerNorm),
        (bert.intermediate.dense, albert.ffn),
        (bert.output.dense, albert.ffn_output),
        (bert.output.LayerNorm, albert.full_layer_layer_norm),
    ]
    for source, target in pairs:
        target.load_state_dict(source.state_dict())
