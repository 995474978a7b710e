"""Post-training dynamic int8 quantisation of a classifier's Linear layers, for CPU inference.

Dynamic quantisation stores each nn.Linear weight as int8 (one scale per tensor) and quantises
activations on the fly per batch; it needs no calibration data and no retraining. Embedding
tables and LayerNorms stay float32, so for a model whose size is mostly its vocabulary the
file shrinks far less than 4x: trim the vocabulary first (student/vocab_trim.py).

On disk. A dynamically quantised model is not ``save_pretrained``-able (its Linears hold packed
int8 params, not Parameters), and pickling modules is off the table. Quantisation is a
deterministic function of the float weights, so the saved form is the float checkpoint plus a
``quantization.json`` marker; ``load_quantized`` re-applies the same quantisation and reproduces
the int8 model exactly. The int8 model's *size* is reported as the byte count of its state dict
serialised with ``torch.save`` to a temporary file (what an int8 artefact would weigh); that file
is measured and deleted, never shipped or loaded.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

import student.prune  # noqa: F401  (registers the head-pruned model classes with the Auto classes)

QUANTIZATION_FILE = "quantization.json"
METHOD = "dynamic int8 of nn.Linear"


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """An int8 copy of `model` (eval mode) with every nn.Linear dynamically quantised; `model`
    itself is left float."""
    float_model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        # torch.ao's eager quantisation warns that it will move to torchao; it still works.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8, inplace=True)


def save_quantized(float_model: PreTrainedModel, out_dir: str | Path) -> Path:
    """Writes the float checkpoint and the marker that `load_quantized` reads."""
    out_dir = Path(out_dir)
    float_model.save_pretrained(out_dir)
    marker = {"method": METHOD, "dtype": "qint8", "modules": ["torch.nn.Linear"],
              "api": "torch.ao.quantization.quantize_dynamic", "torch_version": torch.__version__}
    (out_dir / QUANTIZATION_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return out_dir


def is_quantized_dir(model_dir: str | Path) -> bool:
    return (Path(model_dir) / QUANTIZATION_FILE).is_file()


def load_quantized(model_dir: str | Path) -> nn.Module:
    """The int8 model saved by `save_quantized`: from_pretrained, then the same quantisation."""
    marker_path = Path(model_dir) / QUANTIZATION_FILE
    if not marker_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {QUANTIZATION_FILE}: it was not saved by save_quantized")
    marker = json.loads(marker_path.read_text())
    if marker.get("method") != METHOD:
        raise ValueError(f"{marker_path} says method {marker.get('method')!r}; only {METHOD!r} is supported")
    return quantize_dynamic_int8(AutoModelForSequenceClassification.from_pretrained(model_dir))


def serialized_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the int8 model's real size (packed int8
    weights plus the float tensors left unquantised). Measured in a temporary file, then deleted."""
    handle, path = tempfile.mkstemp(suffix=".pt")
    os.close(handle)
    try:
        torch.save(model.state_dict(), path)
        return os.path.getsize(path)
    finally:
        os.remove(path)


# --------------------------------------------------------------------------------------------
# ONNX (optional)
# --------------------------------------------------------------------------------------------


def onnx_unavailable_reason() -> str | None:
    """None when ONNX export and checking can run here, else why not."""
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        return f"ONNX export skipped: {' and '.join(missing)} not installed (pip install onnx onnxruntime)"
    return None


class _LogitsOnly(nn.Module):
    """Positional (input_ids, attention_mask) -> logits, the signature an exporter can trace."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export_onnx(model: nn.Module, sample: Mapping[str, Tensor], path: str | Path) -> Path:
    """Exports the float classifier to ONNX with dynamic batch and sequence axes.

    Export the float model: dynamically quantised torch.ao modules do not export; quantise the
    ONNX graph with onnxruntime's own tools if an int8 ONNX file is wanted.
    """
    reason = onnx_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    path = Path(path)
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(
        _LogitsOnly(model).eval(),
        (sample["input_ids"], sample["attention_mask"]),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}},
        dynamo=False,
    )
    return path


def onnx_max_abs_diff(model: nn.Module, onnx_path: str | Path, sample: Mapping[str, Tensor]) -> float:
    """Largest |torch logits - onnxruntime logits| over `sample`: the equivalence check."""
    reason = onnx_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {name: sample[name].numpy() for name in ("input_ids", "attention_mask")}
    (onnx_logits,) = session.run(["logits"], feed)
    with torch.inference_mode():
        torch_logits = _LogitsOnly(model).eval()(sample["input_ids"], sample["attention_mask"])
    return float((torch_logits - torch.from_numpy(onnx_logits)).abs().max())
