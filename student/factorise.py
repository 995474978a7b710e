"""A factorised word embedding: the student's vocabulary × E table and an E × hidden projection.

Over a multilingual vocabulary the embedding is most of a small student: 57k pieces × 384 is 21.9M
parameters, against 1.8M for one encoder layer. ALBERT's factorisation (vocabulary × E, then a linear
map to the hidden width) keeps the pieces and cuts the table by hidden/E, and stock libraries load
it (transformers' ALBERT, its ONNX export, sentence-transformers). ``factorised_student`` turns a
BERT-layout student into that ALBERT model with the same layers, head and behaviour.

ALBERT sums the word, position and type vectors in E dimensions and normalises them there, while BERT
normalises the sum in the hidden width, so the conversion is exact only where a basis lines the two
up. BERT's normalisation first centres the sum: what matters is its part orthogonal to the all-ones
vector, at most hidden-1 dimensions. The basis is the top E-1 principal directions of the centred
word and position vectors; a reflection places them in E coordinates orthogonal to the all-ones
vector, so ALBERT's own centring removes nothing, and its normalisation scales by the same norm as
BERT's. The map back to the hidden width restores BERT's scale, gain and bias. With E = hidden the
converted model computes what the BERT one does (up to float rounding); below it, the sums lose
what lies outside the kept directions, which distillation then has to recover.
"""

from __future__ import annotations

import math

import torch
import transformers
from transformers import AlbertConfig, PreTrainedModel

from polydistill.student.architecture import ModelSetupError

# The heads whose weights carry over unchanged: an ALBERT model of the same task names them alike.
_HEADED = ("ForSequenceClassification", "ForTokenClassification")


def factorised_student(model: PreTrainedModel, embedding_size: int) -> PreTrainedModel:
    """The ALBERT equivalent of a BERT-layout ``model`` (its layers, pooler and head copied) whose word,
    position and type tables are ``embedding_size`` wide, initialised as the module docstring says."""
    config = model.config
    if config.model_type != "bert":
        raise ModelSetupError(
            f"student.embedding_size factorises a BERT-layout student's embedding; this student is "
            f"{config.model_type!r}: drop student.embedding_size, or distil from a BERT-architecture teacher "
            "(multilingual-e5, mBERT, LaBSE)"
        )
    hidden = config.hidden_size
    if not 2 <= embedding_size <= hidden:
        raise ModelSetupError(
            f"student.embedding_size {embedding_size} must lie between 2 and the student's hidden_size ({hidden})"
        )
    target_class = _albert_class(type(model).__name__)
    albert = target_class(_albert_config(config, embedding_size)).eval()
    bert_base, albert_base = model.base_model, albert.base_model
    with torch.no_grad():
        _copy_embeddings(bert_base.embeddings, albert_base, embedding_size)
        for bert_layer, albert_layer in zip(bert_base.encoder.layer, albert_base.encoder.albert_layer_groups):
            _copy_layer(bert_layer, albert_layer.albert_layers[0])
        bert_pooler = getattr(bert_base, "pooler", None)
        if bert_pooler is not None and albert_base.pooler is not None:
            albert_base.pooler.load_state_dict(bert_pooler.dense.state_dict())
        if albert is not albert_base:
            albert.classifier.load_state_dict(model.classifier.state_dict())
    albert.train(model.training)
    return albert


def _albert_class(bert_class: str) -> type:
    if bert_class == "BertModel":
        return transformers.AlbertModel
    for suffix in _HEADED:
        if bert_class == f"Bert{suffix}":
            return getattr(transformers, f"Albert{suffix}")
    raise ModelSetupError(
        f"student.embedding_size: a {bert_class} cannot be factorised (supported: BertModel, "
        f"{', '.join('Bert' + suffix for suffix in _HEADED)}): drop student.embedding_size for this task"
    )


def _albert_config(bert: transformers.BertConfig, embedding_size: int) -> AlbertConfig:
    fields = {key: getattr(bert, key) for key in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
        "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id", "bos_token_id",
        "eos_token_id", "num_labels", "id2label", "label2id", "problem_type")}
    fields["classifier_dropout_prob"] = getattr(bert, "classifier_dropout", None) or bert.hidden_dropout_prob
    return AlbertConfig(
        embedding_size=embedding_size,
        num_hidden_groups=bert.num_hidden_layers,  # a group per layer: nothing shared, unlike ALBERT's own
        inner_group_num=1,
        **fields,
    )


def _copy_embeddings(bert: torch.nn.Module, albert: torch.nn.Module, embedding_size: int) -> None:
    words = bert.word_embeddings.weight.float()
    positions = bert.position_embeddings.weight.float()
    types = bert.token_type_embeddings.weight.float()
    hidden = words.shape[1]
    basis = _principal_basis(words, positions, embedding_size - 1)  # hidden × (E-1)
    reflection = _reflection_to_ones(embedding_size)  # E × E: its last column is the all-ones direction
    coordinates = reflection[:, :-1]  # E × (E-1), columns orthogonal to the all-ones vector

    def project(table: torch.Tensor) -> torch.Tensor:  # rows in E coordinates, each summing to zero
        return _centred(table) @ basis @ coordinates.T

    target = albert.embeddings
    target.word_embeddings.weight.copy_(project(words))
    target.position_embeddings.weight.copy_(project(positions))
    target.token_type_embeddings.weight.copy_(project(types))
    target.LayerNorm.weight.fill_(1.0)
    target.LayerNorm.bias.zero_()
    # ALBERT's unit normalisation in E dims is BERT's in hidden dims up to sqrt(hidden / E).
    gain, bias = bert.LayerNorm.weight.float(), bert.LayerNorm.bias.float()
    mapping = albert.encoder.embedding_hidden_mapping_in
    mapping.weight.copy_(math.sqrt(hidden / embedding_size) * gain[:, None] * (basis @ coordinates.T))
    mapping.bias.copy_(bias)


def _centred(table: torch.Tensor) -> torch.Tensor:
    return table - table.mean(dim=1, keepdim=True)


def _principal_basis(words: torch.Tensor, positions: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading directions (hidden × rank, orthonormal) of the centred word vectors and the
    centred position vectors, the positions weighted to count as much as all the words together: the
    sum the first layer reads is one of each. Centring keeps every direction orthogonal to all-ones."""
    word_rows, position_rows = _centred(words), _centred(positions)
    weight = math.sqrt(word_rows.shape[0] / position_rows.shape[0])
    stacked = torch.cat([word_rows, weight * position_rows]).double()
    _, _, right = torch.linalg.svd(stacked, full_matrices=False)
    basis = right[:rank].T
    # Centred rows leave the all-ones direction out of the leading ones; projecting it out again
    # keeps a rank-deficient table (fewer independent rows than the rank asked for) exact too.
    ones = torch.full((basis.shape[0], 1), 1 / math.sqrt(basis.shape[0]), dtype=basis.dtype)
    basis = basis - ones @ (ones.T @ basis)
    basis, _ = torch.linalg.qr(basis)
    return basis.float()


def _reflection_to_ones(size: int) -> torch.Tensor:
    """A Householder reflection (symmetric, orthogonal) that swaps the last unit vector and the
    normalised all-ones vector: coordinates spanned by its other columns sum to zero."""
    last = torch.zeros(size, dtype=torch.float64)
    last[-1] = 1.0
    ones = torch.full((size,), 1 / math.sqrt(size), dtype=torch.float64)
    direction = last - ones
    direction /= direction.norm()
    return (torch.eye(size, dtype=torch.float64) - 2 * torch.outer(direction, direction)).float()


def _copy_layer(bert: torch.nn.Module, albert: torch.nn.Module) -> None:
    pairs = {
        albert.attention.query: bert.attention.self.query,
        albert.attention.key: bert.attention.self.key,
        albert.attention.value: bert.attention.self.value,
        albert.attention.dense: bert.attention.output.dense,
        albert.attention.LayerNorm: bert.attention.output.LayerNorm,
        albert.ffn: bert.intermediate.dense,
        albert.ffn_output: bert.output.dense,
        albert.full_layer_layer_norm: bert.output.LayerNorm,
    }
    for target, source in pairs.items():
        target.load_state_dict(source.state_dict())
