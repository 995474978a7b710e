"""A distilled classifier as ONNX that onnxruntime runs without polydistill or torch: the float graph,
and beside it an int8 graph (onnxruntime's dynamic quantisation of the exported graph's weights), each
checked against the torch model on the same tokenised sample.

``polydistill export DIR --format onnx`` (cluster/cli.py) calls ``export_classifier_onnx``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from polydistill.student.quantize import export_onnx, onnx_max_abs_diff, onnx_unavailable_reason

FLOAT_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
# Text to trace and check the graphs on: two lengths, so the padding path is exercised too.
CHECK_TEXTS = ("A short sentence.", "A somewhat longer sentence, for the graph to see padding as well.")
SPINNING_ENTRY = "session.intra_op.allow_spinning"  # onnxruntime's name for the setting
# Files of the model folder that the exported one keeps, so a tokenizer and the label names load beside it.
KEPT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "sentencepiece.bpe.model", "vocab.txt", "README.md")


class ExportError(ValueError):
    """The model folder cannot be exported as asked; the message says what to change."""


@dataclass(frozen=True)
class OnnxExport:
    folder: Path
    float_path: Path
    int8_path: Path | None
    float_max_abs_diff: float  # largest |torch logit - onnxruntime logit| on CHECK_TEXTS
    int8_max_abs_diff: float | None


def export_classifier_onnx(model_dir: str | Path, out_dir: str | Path | None = None, *, int8: bool = True) -> OnnxExport:
    """Exports the sequence classifier saved in ``model_dir`` into ``out_dir`` (default ``model_dir/onnx``)."""
    reason = onnx_unavailable_reason()
    if reason:
        raise ExportError(reason)
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir}: no config.json; give the folder of a saved student (e.g. OUTPUT/student)")
    architectures = AutoConfig.from_pretrained(model_dir).architectures or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise ExportError(f"{model_dir}: ONNX export covers sequence classifiers; this model is {architectures or 'unnamed'}")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    return export_model_onnx(model, model_dir, Path(out_dir) if out_dir is not None else model_dir / "onnx", int8=int8)


def export_model_onnx(model: torch.nn.Module, model_dir: Path, out_dir: Path, *, int8: bool) -> OnnxExport:
    """Exports a classifier in memory (a pruned one at its real, smaller shapes too) with the tokenizer and
    config files of ``model_dir``, each graph checked against ``model``."""
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sample = dict(tokenizer(list(CHECK_TEXTS), padding=True, return_tensors="pt"))
    sample = {name: sample[name].to(torch.int64) for name in ("input_ids", "attention_mask")}
    model.eval()
    float_path = export_onnx(model, sample, out_dir / FLOAT_FILE)
    for name in KEPT_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    int8_path, int8_diff = None, None
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        int8_path = out_dir / INT8_FILE
        quantize_dynamic(str(float_path), str(int8_path), weight_type=QuantType.QInt8)
        int8_diff = onnx_max_abs_diff(model, int8_path, sample)
    return OnnxExport(out_dir, float_path, int8_path, onnx_max_abs_diff(model, float_path, sample), int8_diff)


class OnnxRuntimeClassifier(torch.nn.Module):
    """An ONNX classifier run by onnxruntime behind the call a transformers classifier answers
    (``model(input_ids=..., attention_mask=...).logits``), so that the same scoring and latency code
    measures it in the runtime it ships for. It has no torch parameters."""

    def __init__(self, path: str | Path):
        super().__init__()
        import onnxruntime

        self.path = Path(path)
        options = onnxruntime.SessionOptions()
        # It is timed in the same rounds as torch models (student/efficiency.py): the same number of threads,
        # and no worker threads left spinning after a run, taking the cores from the next model timed.
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry(SPINNING_ENTRY, "0")
        self.session = onnxruntime.InferenceSession(str(path), sess_options=options,
                                                    providers=["CPUExecutionProvider"])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> SequenceClassifierOutput:
        (logits,) = self.session.run(["logits"], {"input_ids": input_ids.numpy().astype(np.int64),
                                                  "attention_mask": attention_mask.numpy().astype(np.int64)})
        return SequenceClassifierOutput(logits=torch.from_numpy(logits))
