"""Post-training int8 quantisation of a classifier for CPU inference: dynamic int8 of the Linear
layers and, optionally (on by default), weight-only 8-bit of the embedding tables.

- nn.Linear: dynamic quantisation stores each weight as int8 (one scale per tensor) and quantises
  activations on the fly per batch; no calibration data, no retraining.
- nn.Embedding (word, position and token-type tables): each row stored as 8 bits with its own
  float scale and zero point (torch.ao's ``float_qparams_weight_only_qconfig``, giving
  ``torch.ao.nn.quantized.Embedding``); a lookup dequantises only the rows it reads. A row of D
  floats goes from 4·D bytes to D + 8 (3.9x smaller at D = 384), and each value is within half a
  step (row range / 255 / 2) of the float one. For a multilingual student the word-embedding
  matrix is most of the model, so this is where the file size is. Off (``embeddings=False``), the
  tables stay float32: the method of markers written before the option existed.
  LayerNorms, biases and the other small tensors stay float32.

Every quantised embedding gets a forward pre-hook that makes its indices contiguous: the int8
lookup kernel (quantized::embedding_byte) refuses strided indices, and HF passes some: BERT's
default token-type ids are an expanded buffer (so a plain ``model(input_ids=...)`` fails without
the hook), and strided position ids or the ``inputs_embeds`` path of BERT and XLM-R likewise.

On disk. A quantised model is not ``save_pretrained``-able (it holds packed int8 params, not
Parameters), and pickling modules is off the table. Quantisation is a deterministic function of
the float weights, so the saved form is the float checkpoint plus a ``quantization.json`` marker
naming the method and the quantised embedding modules; ``load_quantized`` re-applies exactly that
quantisation and reproduces the int8 model. Markers written before embeddings were an option
(method "dynamic int8 of nn.Linear") still load, Linear-only. The int8 model's *size* is reported
as the byte count of its state dict serialised with ``torch.save`` to a temporary file (what an
int8 artefact would weigh: packed int8 weights, per-row embedding scales and zero points, and the
float tensors left unquantised); that file is measured and deleted, never shipped or loaded.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.ao.quantization import default_dynamic_qconfig, float_qparams_weight_only_qconfig
from transformers import AutoModelForSequenceClassification, PreTrainedModel

import polydistill.student.prune  # noqa: F401  (registers the head-pruned model classes with the Auto classes)

QUANTIZATION_FILE = "quantization.json"
METHOD = "dynamic int8 of nn.Linear"  # Linear only: also what every marker written before embeddings was
METHOD_WITH_EMBEDDINGS = "dynamic int8 of nn.Linear + weight-only 8-bit of nn.Embedding (per-row float qparams)"
METHODS = (METHOD, METHOD_WITH_EMBEDDINGS)


def embedding_module_names(model: nn.Module) -> list[str]:
    """Names of every float nn.Embedding in `model` (word, position, token-type tables), in module order."""
    return [name for name, module in model.named_modules() if type(module) is nn.Embedding]


def method_of(embeddings: bool) -> str:
    return METHOD_WITH_EMBEDDINGS if embeddings else METHOD


def quantize_dynamic_int8(model: nn.Module, *, embeddings: bool = True) -> nn.Module:
    """An int8 copy of `model` (eval mode): every nn.Linear dynamically quantised and, with
    `embeddings`, every nn.Embedding stored as per-row 8-bit; `model` itself is left float."""
    return _quantize(model, embedding_module_names(model) if embeddings else [])


def _quantize(model: nn.Module, embedding_names: Sequence[str]) -> nn.Module:
    modules = dict(model.named_modules())
    for name in embedding_names:
        if type(modules.get(name)) is not nn.Embedding:
            found = type(modules[name]).__name__ if name in modules else "no such module"
            raise ValueError(f"cannot quantise embedding {name!r}: {found} (expected torch.nn.Embedding)")
    spec: dict = {nn.Linear: default_dynamic_qconfig}
    spec.update({name: float_qparams_weight_only_qconfig for name in embedding_names})
    float_model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        # torch.ao's eager quantisation warns that it will move to torchao; it still works.
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(float_model, spec, dtype=torch.qint8, inplace=True)
    quantized_modules = dict(quantized.named_modules())
    for name in embedding_names:
        quantized_modules[name].register_forward_pre_hook(_contiguous_indices)
    return quantized


def _contiguous_indices(module: nn.Module, args: tuple) -> tuple:
    """The int8 embedding kernel (quantized::embedding_byte) rejects non-contiguous indices."""
    return tuple(arg.contiguous() if isinstance(arg, Tensor) else arg for arg in args)


def save_quantized(float_model: PreTrainedModel, out_dir: str | Path, *, embeddings: bool = True) -> Path:
    """Writes the float checkpoint and the marker that `load_quantized` reads."""
    out_dir = Path(out_dir)
    float_model.save_pretrained(out_dir)
    (out_dir / QUANTIZATION_FILE).write_text(json.dumps(quantization_marker(float_model, embeddings=embeddings),
                                                        indent=2) + "\n")
    return out_dir


def quantization_marker(float_model: nn.Module, *, embeddings: bool = True) -> dict:
    """What `save_quantized` writes: enough for `load_quantized` to redo exactly this quantisation."""
    marker = {"method": method_of(embeddings), "dtype": "qint8", "modules": ["torch.nn.Linear"],
              "api": "torch.ao.quantization.quantize_dynamic", "torch_version": torch.__version__}
    if embeddings:
        marker["modules"].append("torch.nn.Embedding")
        marker["embedding_modules"] = embedding_module_names(float_model)
        marker["embedding_dtype"] = "quint8"
        marker["embedding_qscheme"] = "per_channel_affine_float_qparams"
    return marker


def is_quantized_dir(model_dir: str | Path) -> bool:
    return (Path(model_dir) / QUANTIZATION_FILE).is_file()


def read_marker(model_dir: str | Path) -> dict:
    marker_path = Path(model_dir) / QUANTIZATION_FILE
    if not marker_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {QUANTIZATION_FILE}: it was not saved by save_quantized")
    marker = json.loads(marker_path.read_text())
    if marker.get("method") not in METHODS:
        raise ValueError(f"{marker_path} says method {marker.get('method')!r}; supported: {', '.join(map(repr, METHODS))}")
    if marker["method"] == METHOD_WITH_EMBEDDINGS and not isinstance(marker.get("embedding_modules"), list):
        raise ValueError(f"{marker_path}: method {METHOD_WITH_EMBEDDINGS!r} needs an 'embedding_modules' list")
    return marker


def load_quantized(model_dir: str | Path) -> nn.Module:
    """The int8 model saved by `save_quantized`: from_pretrained, then the quantisation its marker
    names (Linear only for old markers; plus exactly the listed embedding modules for new ones)."""
    marker = read_marker(model_dir)
    names = marker.get("embedding_modules", []) if marker["method"] == METHOD_WITH_EMBEDDINGS else []
    return _quantize(AutoModelForSequenceClassification.from_pretrained(model_dir), names)


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
