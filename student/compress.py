"""The compression chain after distillation: prune, recover, quantise, measuring every stage.

``run_stages`` starts from the distilled student's directory and applies the stages in order to
one in-memory model; after each it saves the model (HF format, plus the student's tokenizer)
under ``out_dir/<stage name>`` and measures it on the same held-out rows as the teacher, giving
the report's rows: ``{name, params, disk_bytes, latency_ms_batch1, latency_ms_batch32, accuracy,
retention, per_language}``. The stages' latencies are timed together at the end, in the same rounds,
so that they compare with each other.

The stages are the job config's ``compress.stages`` (``cluster.config.CompressStageConfig``, with
the chain rules in ``cluster.config.check_stages``). Stage kinds:
- ``measure``: the model as it is (the first stage, usually named "distil").
- ``prune``: structured head / FFN-neuron pruning by first-order Taylor importance over the
  calibration rows (student/prune.py); shapes shrink.
- ``magnitude``: unstructured magnitude pruning; zeros only, so size and latency do not move.
  Its masks are re-applied after any later ``recover``, which would otherwise regrow them.
- ``recover``: a short fine-tune through the caller's function (``train_supervised`` on hard
  labels, ``finetune_with_loss`` with ``distillation_loss`` against cached teacher logits, ...).
- ``quantize``: dynamic int8 of the Linear layers and, with ``embeddings`` (the default), per-row
  8-bit embedding tables (student/quantize.py); must come last. Its ``disk_bytes`` is the
  serialised int8 state dict, its ``params`` the float model's count (the same weights, stored
  in a byte each); ``details`` names the method and the quantised embedding modules.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from polydistill.cluster.config import CompressStageConfig, DistillConfig, check_stages
from polydistill.storage import wire
from polydistill.storage.job_data import TokenizedSplit
from polydistill.student.efficiency import TimedWork, count_parameters, disk_bytes, interleaved_latency_ms
from polydistill.student.onnx_export import OnnxRuntimeClassifier, export_model_onnx
from polydistill.student.scoring import LATENCY_FIGURES, LATENCY_ROUNDS, latency_figures, latency_work, quality
from polydistill.student.losses import combine_losses
from polydistill.student.metrics import retention
from polydistill.student.objectives import label_terms, loss_weights
from polydistill.student.prune import (
    LossFn,
    apply_masks,
    apply_plan,
    cross_entropy_loss,
    heads_per_layer,
    importance_scores,
    intermediate_sizes,
    magnitude_prune,
    make_batch,
    plan_structured_pruning,
)
from polydistill.student.quantize import load_quantized, read_marker, save_quantized, serialized_size_bytes

RecoverFn = Callable[[PreTrainedModel], object]
# The stage kinds that change the chain's in-memory model (a quantize stage converts a copy of it).
CHANGES_MODEL = frozenset({"prune", "magnitude", "recover"})


@dataclass(frozen=True)
class StageRow:
    name: str
    kind: str
    params: int
    non_embedding_params: int
    disk_bytes: int
    latency_ms_batch1: float
    latency_ms_batch32: float
    accuracy: float
    retention: float | None  # accuracy / the teacher's, on the same rows
    per_language: dict[str, dict]  # language -> {accuracy, macro_f1, n, retention}
    details: dict = field(default_factory=dict)  # what the stage did (plan sizes, sparsity)

    def to_dict(self) -> dict:
        return asdict(self)


def run_stages(
    student_dir: str | Path,
    stages: Sequence[CompressStageConfig],
    *,
    out_dir: str | Path,
    calibration: TokenizedSplit,
    eval_rows: TokenizedSplit,
    pad_id: int,
    num_labels: int,
    teacher_quality: Mapping,
    recover: RecoverFn | None = None,
    importance_loss: LossFn = cross_entropy_loss,
) -> list[StageRow]:
    """One row per stage; `teacher_quality` is ``student.scoring.quality`` of the teacher on
    `eval_rows` (its ``overall`` and ``per_language`` accuracies give the retentions)."""
    check_stages(stages, have_recover=recover is not None)
    student_dir, out_dir = Path(student_dir), Path(out_dir)
    model = AutoModelForSequenceClassification.from_pretrained(student_dir)
    masks: dict[str, Tensor] = {}
    rows = []
    # Every stage's model (and its ONNX graph) is timed at the end, all in the same rounds, so that the
    # rows' latencies compare stages under the same machine state; the chain changes `model` in place,
    # so each stage's timed model is a copy of it as it was.
    timed_work: dict[tuple[str, str, str], TimedWork] = {}
    for position, stage in enumerate(stages):
        stage_dir = out_dir / stage.name
        details: dict = {}
        if stage.kind == "prune":
            scores = importance_scores(
                model, calibration, pad_id, importance_loss,
                batch_size=stage.calibration_batch_size, max_batches=stage.calibration_batches,
            )
            apply_plan(model, plan_structured_pruning(scores, stage.head_sparsity, stage.ffn_sparsity))
            masks = {}  # parameter shapes changed; magnitude masks no longer fit
            details = {"heads_per_layer": heads_per_layer(model), "intermediate_size": intermediate_sizes(model)[0],
                       "calibration_batches": scores.batches}
        elif stage.kind == "magnitude":
            result = magnitude_prune(model, stage.sparsity)
            masks = result.masks
            details = result.report()
        elif stage.kind == "recover":
            recover(model)
            if masks:
                apply_masks(model, masks)

        if stage.kind == "measure":
            measured, size = model, disk_bytes(student_dir)
        elif stage.kind == "quantize":
            _save(model, student_dir, stage_dir, quantized=True, embeddings=stage.embeddings)
            measured = load_quantized(stage_dir)
            size = serialized_size_bytes(measured)
            marker = read_marker(stage_dir)
            details = {"method": marker["method"], "embedding_modules": marker.get("embedding_modules", []),
                       "float_checkpoint_bytes": disk_bytes(stage_dir)}
        else:
            _save(model, student_dir, stage_dir, quantized=False)
            measured, size = model, disk_bytes(stage_dir)
        rows.append(_measure(stage, measured, size, count_parameters(model), eval_rows, pad_id,
                             num_labels, teacher_quality, details))
        # A copy only where a later stage changes the model in place (quantize saves a converted copy).
        changed_later = any(later.kind in CHANGES_MODEL for later in stages[position + 1:])
        timed = copy.deepcopy(measured) if measured is model and changed_later else measured
        timed_work.update(_keyed(stage.name, "model", latency_work(timed, eval_rows, pad_id)))
        if stage.export == "onnx":
            tokenizer_dir = student_dir if stage.kind == "measure" else stage_dir
            details["onnx"], runtime_model = _onnx_runtime_row(
                model, tokenizer_dir, stage_dir / "onnx", stage.kind == "quantize", eval_rows, pad_id, num_labels,
                teacher_quality)
            timed_work.update(_keyed(stage.name, "onnx", latency_work(runtime_model, eval_rows, pad_id)))
    latency_ms = interleaved_latency_ms(timed_work, rounds=LATENCY_ROUNDS)
    return [_with_latency(row, latency_ms) for row in rows]


def _keyed(stage: str, runtime: str, work: Mapping[str, TimedWork]) -> dict[tuple[str, str, str], TimedWork]:
    return {(stage, runtime, figure): item for figure, item in work.items()}


def _with_latency(row: StageRow, latency_ms: Mapping[tuple[str, str, str], float]) -> StageRow:
    """The row with its model's latencies, and its ONNX graph's where it was exported."""
    def figures(runtime: str) -> dict:
        return latency_figures({figure: latency_ms[(row.name, runtime, figure)] for figure in LATENCY_FIGURES})

    model = figures("model")
    details = row.details
    if "onnx" in details:
        details = {**details, "onnx": {**details["onnx"], **figures("onnx")}}
    return replace(row, latency_ms_batch1=model["latency_ms_batch1"], latency_ms_batch32=model["latency_ms_batch32"],
                   details=details)


def _onnx_runtime_row(model: nn.Module, tokenizer_dir: Path, onnx_dir: Path, int8: bool, eval_rows: TokenizedSplit,
                      pad_id: int, num_labels: int, teacher: Mapping) -> tuple[dict, OnnxRuntimeClassifier]:
    """The stage's model as the ONNX graph it ships as (int8 for a quantize stage), scored in onnxruntime;
    and that graph's runtime, for the timing of all stages together."""
    export = export_model_onnx(model, tokenizer_dir, onnx_dir, int8=int8)
    shipped = export.int8_path if int8 else export.float_path
    runtime_model = OnnxRuntimeClassifier(shipped)
    scores = quality(runtime_model, eval_rows, pad_id, num_labels)
    accuracy = scores["overall"]["accuracy"]
    row = {"file": str(shipped.relative_to(onnx_dir.parent)), "disk_bytes": shipped.stat().st_size,
           "max_abs_diff": export.int8_max_abs_diff if int8 else export.float_max_abs_diff,
           "accuracy": accuracy, "retention": retention(accuracy, teacher["overall"]["accuracy"]),
           "per_language_accuracy": {language: metrics["accuracy"]
                                     for language, metrics in scores["per_language"].items()}}
    return row, runtime_model


def _save(model: PreTrainedModel, student_dir: Path, stage_dir: Path, *, quantized: bool,
          embeddings: bool = True) -> None:
    """The stage's model plus the student's tokenizer, so each folder loads on its own."""
    if quantized:
        save_quantized(model, stage_dir, embeddings=embeddings)
    else:
        model.save_pretrained(stage_dir)
    if (student_dir / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(student_dir).save_pretrained(stage_dir)


def _measure(stage: CompressStageConfig, model: nn.Module, size: int, params: dict, eval_rows: TokenizedSplit,
             pad_id: int, num_labels: int, teacher: Mapping, details: dict) -> StageRow:
    """The stage's row, its latencies still to be timed (`_with_latency`)."""
    scores = quality(model, eval_rows, pad_id, num_labels)
    per_language = {
        language: {
            "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "n": metrics["n"],
            "retention": retention(metrics["accuracy"], teacher["per_language"][language]["accuracy"])
            if language in teacher["per_language"] else None,
        }
        for language, metrics in scores["per_language"].items()
    }
    accuracy = scores["overall"]["accuracy"]
    return StageRow(
        name=stage.name, kind=stage.kind, params=params["params"], non_embedding_params=params["non_embedding_params"],
        disk_bytes=size, latency_ms_batch1=math.nan, latency_ms_batch32=math.nan,
        accuracy=accuracy, retention=retention(accuracy, teacher["overall"]["accuracy"]),
        per_language=per_language, details=details,
    )


# --------------------------------------------------------------------------------------------
# Recovery helpers: a short fine-tune on any loss, and a distillation loss on cached logits
# --------------------------------------------------------------------------------------------


def distillation_loss(teacher_logits: Tensor | np.ndarray, distill: DistillConfig, *, labelled: bool = True) -> LossFn:
    """Loss ``(model, batch) -> loss`` against teacher logits cached per row of the split
    (``teacher_logits[i]`` belongs to row i): the distillation objective of training itself
    (``label_terms`` weighted by ``loss_weights``), so recovery after pruning and distillation
    give the same number for the same logits. Usable both for importance scores and for recovery."""
    cached = torch.as_tensor(teacher_logits, dtype=torch.float32).numpy()
    weights = loss_weights(distill)

    def loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        soft = wire.SoftLabels(logits=cached[batch["row_index"].numpy()])
        labels = batch["labels"].numpy() if labelled else None
        total, _ = combine_losses(label_terms(logits, soft, labels, distill), weights)
        return total

    return loss


def finetune_with_loss(
    model: PreTrainedModel, rows: TokenizedSplit, pad_id: int, loss_fn: LossFn, *,
    epochs: float, batch_size: int, lr: float, seed: int, weight_decay: float = 0.01,
) -> list[float]:
    """AdamW with linear decay over shuffled batches; returns the per-step losses.
    Build it after pruning: the optimizer must see the pruned tensors."""
    generator = np.random.default_rng(seed)
    steps = max(1, round(epochs * math.ceil(len(rows) / batch_size)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    order = np.array([], dtype=np.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, generator.permutation(len(rows))])
        index, order = order[:batch_size], order[batch_size:]
        loss = loss_fn(model, make_batch(rows, index, pad_id))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses
