"""Pruning a BERT-family encoder: importance scores, a pruning plan, and the surgery itself.

Structured pruning removes whole attention heads and FFN neurons, so the weight matrices really
shrink (fewer parameters, smaller files, faster matmuls); unstructured magnitude pruning only
writes zeros, which changes neither the file size nor the CPU latency of dense kernels.

What the saved config can express (transformers 5.x removed ``PreTrainedModel.prune_heads`` and
the ``pruned_heads`` config field, and BERT derives the head size as hidden_size /
num_attention_heads, so no stock config can say "layer 3 has 7 heads of size 64"):
- FFN neurons: every layer keeps the same number of neurons (each layer picks its own top-k),
  so a smaller ``intermediate_size`` in the stock config describes the model and a plain
  ``AutoModelForSequenceClassification.from_pretrained`` loads it.
- Heads: the config becomes a registered subclass (model_type ``polydistill_pruned_bert``, and
  likewise for roberta / xlm-roberta) with a ``heads_per_layer`` list; ``num_attention_heads``
  keeps its original value because it fixes the head size. The Auto classes load such a
  directory once this module is imported (it registers the classes on import).

The surgery invalidates optimizer state that refers to the old tensors: prune first, then build
the optimizer for the recovery fine-tune.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from polydistill.storage.job_data import TokenizedSplit, pad_rows

Batch = dict[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]


# --------------------------------------------------------------------------------------------
# Model classes whose config can say how many heads each layer kept
# --------------------------------------------------------------------------------------------


def _shrunk_linear(old: nn.Linear, rows: Tensor | None = None, columns: Tensor | None = None) -> nn.Linear:
    """A new Linear holding the chosen output rows / input columns of `old` (bias follows the rows)."""
    weight = old.weight
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
    if columns is not None:
        weight = weight.index_select(1, columns.to(weight.device))
    bias = old.bias
    if bias is not None and rows is not None:
        bias = bias.index_select(0, rows.to(bias.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    return new


def _keep_heads(layer: nn.Module, keep: Tensor, head_size: int) -> None:
    """Keeps heads `keep` (current indices, ascending) of one encoder layer's self-attention."""
    attention = layer.attention.self
    dims = (keep[:, None] * head_size + torch.arange(head_size)).reshape(-1)
    for name in ("query", "key", "value"):
        setattr(attention, name, _shrunk_linear(getattr(attention, name), rows=dims))
    layer.attention.output.dense = _shrunk_linear(layer.attention.output.dense, columns=dims)
    # BERT's forward infers the head count from the projection width (view(..., -1, head_size));
    # these two attributes are kept truthful for anything else that reads them.
    attention.num_attention_heads = len(keep)
    attention.all_head_size = len(keep) * head_size


def _pruned_variant(config_class: type, model_class: type) -> tuple[type, type]:
    """A config subclass with ``heads_per_layer`` and a model subclass that builds those shapes."""
    model_type = f"polydistill_pruned_{config_class.model_type}"

    def config_init(self, heads_per_layer: list[int] | None = None, **kwargs):
        config_class.__init__(self, **kwargs)
        self.heads_per_layer = list(heads_per_layer) if heads_per_layer is not None else None

    pruned_config = type(
        f"Pruned{config_class.__name__}", (config_class,), {"model_type": model_type, "__init__": config_init}
    )

    def model_init(self, config):
        model_class.__init__(self, config)
        layers = self.base_model.encoder.layer
        heads = config.heads_per_layer or [config.num_attention_heads] * len(layers)
        if len(heads) != len(layers):
            raise ValueError(
                f"config.heads_per_layer lists {len(heads)} layers but num_hidden_layers is {len(layers)}"
            )
        head_size = config.hidden_size // config.num_attention_heads
        for layer, count in zip(layers, heads):
            if count != config.num_attention_heads:
                _keep_heads(layer, torch.arange(count), head_size)
        self.post_init()  # initialise the re-created Linears like the rest (from_config path)

    pruned_model = type(
        f"Pruned{model_class.__name__}", (model_class,), {"config_class": pruned_config, "__init__": model_init}
    )
    for cls in (pruned_config, pruned_model):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    AutoConfig.register(model_type, pruned_config, exist_ok=True)
    AutoModelForSequenceClassification.register(pruned_config, pruned_model, exist_ok=True)
    return pruned_config, pruned_model


PrunedBertConfig, PrunedBertForSequenceClassification = _pruned_variant(BertConfig, BertForSequenceClassification)
PrunedRobertaConfig, PrunedRobertaForSequenceClassification = _pruned_variant(
    RobertaConfig, RobertaForSequenceClassification
)
PrunedXLMRobertaConfig, PrunedXLMRobertaForSequenceClassification = _pruned_variant(
    XLMRobertaConfig, XLMRobertaForSequenceClassification
)
# Stock class -> its head-prunable twin. Already-pruned classes map to themselves.
_PRUNED_TWIN = {
    BertForSequenceClassification: PrunedBertForSequenceClassification,
    RobertaForSequenceClassification: PrunedRobertaForSequenceClassification,
    XLMRobertaForSequenceClassification: PrunedXLMRobertaForSequenceClassification,
}
_PRUNED_TWIN.update({twin: twin for twin in list(_PRUNED_TWIN.values())})


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """``base_model.encoder.layer``; a clear error for models laid out differently."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None or not hasattr(layers[0], "attention") or not hasattr(layers[0], "intermediate"):
        raise TypeError(
            f"{type(model).__name__} is not laid out like BERT (base_model.encoder.layer[i] with "
            "attention.self.query/key/value, attention.output.dense, intermediate.dense, output.dense)"
        )
    return layers


def head_size(model: PreTrainedModel) -> int:
    return model.config.hidden_size // model.config.num_attention_heads


def heads_per_layer(model: nn.Module) -> list[int]:
    return [layer.attention.output.dense.in_features // head_size(model) for layer in encoder_layers(model)]


def intermediate_sizes(model: nn.Module) -> list[int]:
    return [layer.intermediate.dense.out_features for layer in encoder_layers(model)]


# --------------------------------------------------------------------------------------------
# Importance scores
# --------------------------------------------------------------------------------------------


def calibration_batches(
    rows: TokenizedSplit, pad_id: int, *, batch_size: int = 16, max_batches: int | None = None
) -> Iterator[Batch]:
    """Batches in row order: input_ids, attention_mask, labels, and ``row_index`` (positions in
    `rows`, so a loss can look up per-row teacher logits)."""
    for number, start in enumerate(range(0, len(rows), batch_size)):
        if max_batches is not None and number >= max_batches:
            return
        yield make_batch(rows, np.arange(start, min(start + batch_size, len(rows))), pad_id)


def make_batch(rows: TokenizedSplit, index: np.ndarray, pad_id: int) -> Batch:
    """The rows at `index`, right-padded, as the tensors a loss function receives."""
    index = np.asarray(index, dtype=np.int64)
    input_ids, attention_mask = pad_rows([rows.token_ids[i] for i in index], pad_id)
    return {
        "input_ids": torch.from_numpy(input_ids.astype(np.int64)),
        "attention_mask": torch.from_numpy(attention_mask.astype(np.int64)),
        "labels": torch.from_numpy(rows.labels[index]),
        "row_index": torch.from_numpy(index),
    }


def cross_entropy_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Hard-label loss for importance scores; rows labelled -1 are ignored."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return nn.functional.cross_entropy(logits, batch["labels"], ignore_index=-1)


@dataclass(frozen=True)
class ImportanceScores:
    heads: tuple[Tensor, ...]  # per layer: [heads in that layer]
    neurons: tuple[Tensor, ...]  # per layer: [intermediate size]
    batches: int


def _taylor_per_column(linear: nn.Linear) -> Tensor:
    """Σ_rows grad·weight per input column: d loss / d (a mask scaling that column's input)."""
    return (linear.weight.grad * linear.weight).sum(0).detach()


def importance_scores(
    model: PreTrainedModel,
    rows: TokenizedSplit,
    pad_id: int,
    loss_fn: LossFn = cross_entropy_loss,
    *,
    batch_size: int = 16,
    max_batches: int | None = None,
) -> ImportanceScores:
    """First-order Taylor importance of every head and FFN neuron over a calibration set.

    A head's (or neuron's) score is |Σ grad·weight| over the columns of the projection that reads
    it (attention.output.dense for a head, output.dense for a neuron), accumulated over batches.
    That sum is exactly the gradient of the loss with respect to a mask multiplying the unit's
    output (Michel et al., 2019), i.e. the first-order estimate of the loss change when the unit
    is removed; the query/key/value weights add nothing once the unit's output is gone. Taking
    the absolute value per batch, then summing, keeps batches that pull in opposite directions
    from cancelling. `loss_fn` decides what "matters" means: hard-label CE or distillation KL.
    Dropout is off while scoring; gradients are cleared afterwards.
    """
    layers = encoder_layers(model)
    heads = [torch.zeros(n) for n in heads_per_layer(model)]
    neurons = [torch.zeros(n) for n in intermediate_sizes(model)]
    size = head_size(model)
    was_training = model.training
    model.eval()
    batches = 0
    try:
        with torch.enable_grad():
            for batch in calibration_batches(rows, pad_id, batch_size=batch_size, max_batches=max_batches):
                model.zero_grad(set_to_none=True)
                loss_fn(model, batch).backward()
                for i, layer in enumerate(layers):
                    per_dim = _taylor_per_column(layer.attention.output.dense)
                    heads[i] += per_dim.view(-1, size).sum(-1).abs().float().cpu()
                    neurons[i] += _taylor_per_column(layer.output.dense).abs().float().cpu()
                batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if batches == 0:
        raise ValueError("importance_scores needs at least one calibration row")
    return ImportanceScores(heads=tuple(heads), neurons=tuple(neurons), batches=batches)


# --------------------------------------------------------------------------------------------
# The plan (pure)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruningPlan:
    heads_to_prune: dict[int, list[int]]  # layer -> current head indices to remove
    neurons_to_keep: dict[int, Tensor]  # layer -> ascending neuron indices to keep


def _check_sparsity(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def plan_structured_pruning(
    scores: ImportanceScores, head_sparsity: float, ffn_sparsity: float, *, normalize_per_layer: bool = True
) -> PruningPlan:
    """Which heads to remove and which FFN neurons to keep, from importance scores alone.

    Heads: the round(head_sparsity · total) least important heads across all layers go, but every
    layer keeps at least one (a layer with no heads has no attention output to prune into).
    Scores are L2-normalised within each layer first by default, as Michel et al. (2019) found
    necessary for a global ranking: raw Taylor scores differ in scale from layer to layer.
    FFN: each layer keeps its own top-k neurons, with the same k everywhere, so the stock config's
    single ``intermediate_size`` still describes the model (see the module docstring).
    """
    _check_sparsity("head_sparsity", head_sparsity)
    _check_sparsity("ffn_sparsity", ffn_sparsity)
    head_scores = [s / s.norm() if normalize_per_layer and s.norm() > 0 else s for s in scores.heads]
    total = sum(len(s) for s in head_scores)
    n_prune = round(head_sparsity * total)
    most = total - len(head_scores)
    if n_prune > most:
        raise ValueError(
            f"head_sparsity {head_sparsity} would remove {n_prune} of {total} heads, but each of the "
            f"{len(head_scores)} layers keeps at least one: at most {most} ({most / total:.3f}) can go"
        )
    # Each layer's best head is exempt; the rest compete globally (ties broken by layer, head).
    candidates = sorted(
        (float(score), layer, head)
        for layer, layer_scores in enumerate(head_scores)
        for head, score in enumerate(layer_scores.tolist())
        if head != int(layer_scores.argmax())
    )
    heads_to_prune: dict[int, list[int]] = {}
    for _, layer, head in candidates[:n_prune]:
        heads_to_prune.setdefault(layer, []).append(head)
    heads_to_prune = {layer: sorted(heads) for layer, heads in sorted(heads_to_prune.items())}

    sizes = {len(s) for s in scores.neurons}
    if len(sizes) > 1:
        raise ValueError(f"FFN sizes differ across layers {sorted(sizes)}; plan_structured_pruning keeps them uniform")
    neurons_to_keep: dict[int, Tensor] = {}
    if ffn_sparsity > 0 and scores.neurons:
        size = sizes.pop()
        keep = size - round(ffn_sparsity * size)
        if keep < 1:
            raise ValueError(f"ffn_sparsity {ffn_sparsity} leaves no neuron of {size}")
        neurons_to_keep = {
            layer: torch.sort(torch.topk(s, keep).indices).values for layer, s in enumerate(scores.neurons)
        }
    return PruningPlan(heads_to_prune=heads_to_prune, neurons_to_keep=neurons_to_keep)


# --------------------------------------------------------------------------------------------
# Surgery
# --------------------------------------------------------------------------------------------


def prune_heads(model: PreTrainedModel, heads_to_prune: Mapping[int, list[int]]) -> PreTrainedModel:
    """Physically removes attention heads (indices as the layer has them now); returns `model`.

    The config becomes the pruned twin (``heads_per_layer``) and the model's class its pruned
    twin, so ``save_pretrained`` writes a directory that ``from_pretrained`` rebuilds exactly.
    """
    twin = _PRUNED_TWIN.get(type(model))
    if twin is None:
        raise TypeError(
            f"head pruning supports {sorted(c.__name__ for c in _PRUNED_TWIN)}, not {type(model).__name__}"
        )
    layers = encoder_layers(model)
    counts = heads_per_layer(model)
    keep_per_layer = {}
    for layer, heads in heads_to_prune.items():
        if not 0 <= layer < len(layers):
            raise ValueError(f"heads_to_prune names layer {layer}, but the model has {len(layers)} layers")
        bad = sorted(h for h in heads if not 0 <= h < counts[layer])
        if bad:
            raise ValueError(f"layer {layer} has heads 0..{counts[layer] - 1}; cannot prune {bad}")
        keep = [h for h in range(counts[layer]) if h not in set(heads)]
        if not keep:
            raise ValueError(f"pruning {sorted(heads)} would leave layer {layer} without heads; keep at least one")
        keep_per_layer[layer] = torch.tensor(keep, dtype=torch.long)
    for layer, keep in keep_per_layer.items():
        if len(keep) < counts[layer]:
            _keep_heads(layers[layer], keep, head_size(model))
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "heads_per_layer")}
    attn_implementation = model.config._attn_implementation
    model.config = twin.config_class(heads_per_layer=heads_per_layer(model), **fields)
    model.config._attn_implementation = attn_implementation
    for module in model.modules():  # submodules keep a reference to the config they were built with
        if getattr(module, "config", None) is not None and module is not model:
            module.config = model.config
    model.__class__ = twin  # adds only __init__/config_class; keeps save_pretrained's architectures honest
    return model


def prune_ffn_neurons(model: PreTrainedModel, neurons_to_keep: Mapping[int, Tensor]) -> PreTrainedModel:
    """Keeps the given FFN neurons (intermediate.dense rows, output.dense columns); returns `model`.

    Layers not named keep all their neurons. Afterwards every layer must have the same FFN size,
    because that single number is what ``config.intermediate_size`` can record.
    """
    layers = encoder_layers(model)
    sizes = intermediate_sizes(model)
    after = list(sizes)
    for layer, keep in neurons_to_keep.items():
        if not 0 <= layer < len(layers):
            raise ValueError(f"neurons_to_keep names layer {layer}, but the model has {len(layers)} layers")
        keep = torch.as_tensor(keep, dtype=torch.long)
        if len(keep) == 0 or len(set(keep.tolist())) != len(keep) or keep.min() < 0 or keep.max() >= sizes[layer]:
            raise ValueError(f"layer {layer}: neurons_to_keep must be distinct indices in 0..{sizes[layer] - 1}")
        after[layer] = len(keep)
    if len(set(after)) > 1:
        raise ValueError(
            f"FFN sizes per layer would become {after}; keep the same number of neurons in every layer "
            "so config.intermediate_size can describe the model (plan_structured_pruning does)"
        )
    for layer, keep in neurons_to_keep.items():
        keep = torch.sort(torch.as_tensor(keep, dtype=torch.long)).values
        block = layers[layer]
        block.intermediate.dense = _shrunk_linear(block.intermediate.dense, rows=keep)
        block.output.dense = _shrunk_linear(block.output.dense, columns=keep)
    model.config.intermediate_size = after[0]
    return model


def apply_plan(model: PreTrainedModel, plan: PruningPlan) -> PreTrainedModel:
    if plan.neurons_to_keep:
        prune_ffn_neurons(model, plan.neurons_to_keep)
    if plan.heads_to_prune:
        prune_heads(model, plan.heads_to_prune)
    return model


# --------------------------------------------------------------------------------------------
# Unstructured magnitude pruning
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MagnitudeResult:
    requested: float
    actual: float  # zero fraction of the prunable weights afterwards
    zeroed: int
    prunable: int
    masks: dict[str, Tensor]  # parameter name -> bool, True where the weight survives

    def report(self) -> dict:
        return {"requested": self.requested, "actual": self.actual, "zeroed": self.zeroed, "prunable": self.prunable}


def _prunable_weights(model: nn.Module) -> dict[str, Tensor]:
    """Weights of the encoder's Linear layers; embeddings, LayerNorms, biases, pooler and
    classifier are left dense (small, and the classifier is most sensitive)."""
    encoder_layers(model)
    prefix = f"{model.base_model_prefix}.encoder." if hasattr(model, "base_model_prefix") else "encoder."
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(prefix)
    }


def magnitude_prune(model: nn.Module, sparsity: float) -> MagnitudeResult:
    """Zeroes the smallest-|w| fraction `sparsity` of the encoder's Linear weights (one global
    ranking across layers); shapes are unchanged. Exactly round(sparsity · n) weights are chosen
    (already-zero ones count). A later fine-tune will regrow them: re-apply with `apply_masks`.
    """
    _check_sparsity("sparsity", sparsity)
    weights = _prunable_weights(model)
    flat = torch.cat([w.detach().abs().reshape(-1).float() for w in weights.values()])
    n_zero = round(sparsity * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if n_zero:
        keep[torch.topk(flat, n_zero, largest=False).indices] = False
    masks, start = {}, 0
    for name, weight in weights.items():
        masks[name] = keep[start : start + weight.numel()].view_as(weight)
        start += weight.numel()
    apply_masks(model, masks)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return MagnitudeResult(
        requested=sparsity, actual=zeros / flat.numel(), zeroed=n_zero, prunable=flat.numel(), masks=masks
    )


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            parameters[name].mul_(mask.to(parameters[name].device, parameters[name].dtype))
