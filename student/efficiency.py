"""Model size and speed measurements for the teacher-vs-student comparison."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

ModelInputs = Mapping[str, Tensor]
InputsFactory = Callable[[int], ModelInputs]


def _input_embedding_modules(model: nn.Module) -> list[nn.Module]:
    """The input word / position / token-type embedding modules of `model`.

    HF models expose the word embedding via ``get_input_embeddings()``; the position and
    token-type tables are its sibling ``nn.Embedding`` modules (``bert.embeddings.*``,
    GPT-2's ``wte``/``wpe``). Only siblings count: relative-position tables deeper in the
    attention layers are part of the network, not the input lookup. Models without
    ``get_input_embeddings`` fall back to every ``nn.Embedding`` they contain.
    """
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    word_embeddings = get_input_embeddings() if callable(get_input_embeddings) else None
    if word_embeddings is None:
        return [module for module in model.modules() if isinstance(module, nn.Embedding)]
    for parent in model.modules():
        children = list(parent.children())
        if any(child is word_embeddings for child in children):
            siblings = [child for child in children if isinstance(child, nn.Embedding)]
            return siblings if word_embeddings in siblings else [word_embeddings, *siblings]
    return [word_embeddings]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total parameters and parameters outside the input embedding tables.

    Tied weights count once (``parameters()`` deduplicates), so a tied LM head adds nothing.
    Non-embedding parameters are the better measure of compute: an embedding lookup is
    almost free, while a multilingual vocabulary can be most of a small model's size.
    """
    total = sum(parameter.numel() for parameter in model.parameters())
    embedding_parameters = {
        id(parameter): parameter
        for module in _input_embedding_modules(model)
        for parameter in module.parameters()
    }
    embedding = sum(parameter.numel() for parameter in embedding_parameters.values())
    return {"params": total, "non_embedding_params": total - embedding}


def disk_bytes(path: str | Path) -> int:
    """Size of a saved model: the file itself, or the sum of all files under a directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no saved model at {path}")
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _batch_of(inputs: ModelInputs | InputsFactory, batch_size: int) -> dict[str, Tensor]:
    """A batch of exactly `batch_size` rows, cycling through the examples if there are fewer."""
    if callable(inputs):
        return dict(inputs(batch_size))
    if not inputs:
        raise ValueError("measure_latency needs at least one input tensor (e.g. input_ids)")
    sizes = {name: tensor.shape[0] for name, tensor in inputs.items()}
    n_examples = next(iter(sizes.values()))
    if len(set(sizes.values())) != 1 or n_examples == 0:
        raise ValueError(f"input tensors need the same non-zero batch dimension, got {sizes}")
    rows = torch.arange(batch_size) % n_examples
    return {name: tensor[rows] for name, tensor in inputs.items()}


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def measure_latency(
    model: nn.Module,
    inputs: ModelInputs | InputsFactory,
    *,
    batch_size: int,
    repeats: int = 20,
    warmup: int = 3,
) -> dict[str, float]:
    """Median forward-pass latency for one batch, and the throughput it implies.

    `inputs` is either a dict of tensors (e.g. a tokenizer's output), whose rows are cycled
    to fill `batch_size`, or a callable ``batch_size -> dict`` that builds the batch. The
    batch is built once, outside the timed region, so tokenisation is not measured. The
    median over `repeats` resists the outliers (GC, scheduler) that skew a mean; `warmup`
    calls first let lazy initialisation and allocator growth happen off the clock.
    The model runs in eval mode under ``torch.inference_mode``; its training flag is
    restored afterwards.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(
            "need batch_size >= 1, repeats >= 1, warmup >= 0; "
            f"got {batch_size}, {repeats}, {warmup}"
        )
    device = _model_device(model)
    batch = {name: tensor.to(device) for name, tensor in _batch_of(inputs, batch_size).items()}
    # CUDA launches are asynchronous: without a sync the clock stops before the work does.
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(**batch)
            synchronize()
            timings_s = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(**batch)
                synchronize()
                timings_s.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    median_s = statistics.median(timings_s)
    return {"latency_ms": median_s * 1e3, "samples_per_s": batch_size / median_s}
