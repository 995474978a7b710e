"""Model size and speed measurements for the teacher-vs-student comparison."""

from __future__ import annotations

import statistics
import time
import zlib
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from polydistill.student.devices import model_device

ModelInputs = Mapping[str, Tensor]


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


@dataclass(frozen=True)
class TimedWork:
    """Work whose latency is measured: ``run`` does ``units`` of the measured thing (one forward pass of a
    batch, or one pass over 32 single rows, 32 units), and a latency is the time of one unit."""

    run: Callable[[], object]
    units: int = 1

    def __post_init__(self) -> None:
        if self.units < 1:
            raise ValueError(f"timed work needs at least one unit (a batch or a row), got {self.units}")


def forward_work(model: nn.Module, batches: Sequence[ModelInputs]) -> TimedWork:
    """One forward pass over each of `batches`, a unit each, in eval mode without autograd. The tensors
    move to the model's device here, outside the timed region. On CUDA each pass waits for the device,
    whose launches are asynchronous: a unit is one request's latency, not passes overlapping in a queue."""
    device = model_device(model)
    on_device = [{name: tensor.to(device) for name, tensor in batch.items()} for batch in batches]
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run() -> None:
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for batch in on_device:
                    model(**batch)
                    synchronize()
        finally:
            model.train(was_training)

    return TimedWork(run, units=len(on_device))


def interleaved_latency_ms(work: Mapping[Hashable, TimedWork], *, rounds: int, warmup: int = 1,
                           clock: Callable[[], float] = time.perf_counter) -> dict[Hashable, float]:
    """The median time of one unit of each entry of `work`, in milliseconds, timed in shared rounds.

    A speed-up is the ratio of two latencies. Timed minutes apart, each carries the machine's state of its
    moment (another process on the cores, the clock's frequency), and one model's ratio to the teacher
    moved between 4.9x and 6.2x from one job to the next. So every round runs each entry once, in an order
    rotated by one place a round (no entry always runs first, after another's caches), and each entry's
    latency is the median over the rounds, which resists a round that a pause hit. `warmup` rounds first,
    off the clock, let lazy initialisation and allocator growth happen.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got {rounds} and {warmup}")
    names = list(work)
    for _ in range(warmup):
        for name in names:
            work[name].run()
    seconds: dict[Hashable, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            start = clock()
            work[name].run()
            seconds[name].append((clock() - start) / work[name].units)
    return {name: statistics.median(times) * 1e3 for name, times in seconds.items()}


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
