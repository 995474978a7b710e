"""Where a stage's models run: on the GPU Ray gave the stage (cluster/stages.py), else on the CPU."""

from __future__ import annotations

import torch
from torch import nn

CPU = torch.device("cpu")


def stage_device(num_gpus: float) -> torch.device:
    """CUDA when the stage asked Ray for a GPU and one is visible to it; the CPU otherwise."""
    return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's weights; the CPU for one without any (onnxruntime behind a torch-like call)."""
    first = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return first.device if first is not None else torch.device("cpu")
