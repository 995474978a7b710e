"""Model size and speed measurements for the teacher-vs-student comparison."""

from __future__ import annotations

import statistics
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from polydistill.student.devices import model_device

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
    device = model_device(model)
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


def measure_latency_per_row(
    model: nn.Module,
    rows: Sequence[ModelInputs],
    *,
    repeats: int = 3,
    warmup: int = 3,
) -> dict[str, float]:
    """Batch-1 latency over several single rows: the mean of each row's median.

    One row's latency depends on its length, so a single row says little about a mix of
    languages whose texts segment into very different numbers of tokens; the mean over a sample
    spread across the languages estimates the latency of a request drawn from that mix.
    `warmup` calls on the first row happen off the clock.
    """
    if not rows:
        raise ValueError("measure_latency_per_row needs at least one row")
    per_row_ms = [
        measure_latency(model, row, batch_size=1, repeats=repeats, warmup=warmup if index == 0 else 0)["latency_ms"]
        for index, row in enumerate(rows)
    ]
    mean_ms = statistics.fmean(per_row_ms)
    return {"latency_ms": mean_ms, "samples_per_s": 1e3 / mean_ms}


def spread_over_languages(languages: Sequence[str], size: int, seed: int = 0) -> list[int]:
    """Indices of `size` rows drawn evenly from every language, the same ones on every call.

    A round-robin over the languages in sorted order, each language's rows taken in a shuffled
    order seeded by `seed` and the language's name: every language gives ``size // n`` or one
    more row (fewer only when it runs out). Held-out files are often sorted by language, so the
    first rows would all be one language's. Returns every row when there are fewer than `size`.
    """
    if size < 1:
        raise ValueError(f"need a sample size >= 1, got {size}")
    by_language: dict[str, list[int]] = {}
    for index, language in enumerate(languages):
        by_language.setdefault(language, []).append(index)
    queues = []
    for language in sorted(by_language):
        # crc32, not hash(): Python salts string hashes per process, and the sample must not change.
        rng = np.random.default_rng([seed, zlib.crc32(language.encode("utf-8"))])
        queues.append([by_language[language][i] for i in rng.permutation(len(by_language[language]))])
    sample: list[int] = []
    depth = 0
    while len(sample) < size and any(depth < len(queue) for queue in queues):
        sample.extend(queue[depth] for queue in queues if depth < len(queue))
        depth += 1
    return sample[:size]


def mean_tokens_per_language(lengths: Sequence[int], languages: Sequence[str]) -> dict[str, float]:
    """Mean tokens per row of each language, sorted by language.

    The same text costs a model as many positions as its tokenizer cuts it into: a trimmed or
    smaller vocabulary segments some scripts into many more tokens, which latency then pays.
    """
    if len(lengths) != len(languages):
        raise ValueError(f"{len(lengths)} lengths for {len(languages)} languages")
    totals: Counter[str] = Counter()
    counts: Counter[str] = Counter(languages)
    for length, language in zip(lengths, languages):
        totals[language] += int(length)
    return {language: round(totals[language] / counts[language], 2) for language in sorted(counts)}
