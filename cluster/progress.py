"""Progress bars: samples distilled (fed from the progress hash the student writes to Redis), and
the steps of the supervised stages (teacher fine-tuning, baselines), which run as Ray tasks
(cluster/stages.py) whose output Ray forwards to the driver line by line."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm import tqdm


class _Lines:
    """A stream for tqdm off a terminal: each redraw becomes a line of its own. tqdm redraws with a
    carriage return and no newline, which a log (CI, a Ray task's output forwarded to the driver,
    `polydistill logs`) would show as one endless line, or not at all until the bar closes."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        for line in text.replace("\r", "\n").split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, description: str, unit: str, enabled: bool = True) -> tqdm:
    """On a terminal the bar redraws in place; in a log (CI, `polydistill logs`, a heavy stage's Ray
    task) it prints a line every 10 s instead. Its remaining time is for ``total``."""
    terminal = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=description,
        unit=unit,
        disable=not enabled,
        mininterval=0.5 if terminal else 10.0,
        dynamic_ncols=terminal,
        ncols=None if terminal else 100,
        file=sys.stderr if terminal else _Lines(sys.stderr),
    )


class ProgressDisplay:
    """The distilling bar; ``listener`` (experiment tracking) sees every progress update too."""

    def __init__(self, total: int, enabled: bool = True, description: str = "distilling",
                 listener: Callable[[dict[str, str]], None] | None = None):
        self.bar = progress_bar(total, description, "sample", enabled)
        self.listener = listener

    def update(self, progress: dict[str, str]) -> None:
        if self.listener is not None:
            self.listener(progress)
        samples = int(float(progress.get("samples", 0)))
        if samples > self.bar.n:
            self.bar.update(samples - self.bar.n)
        if "loss" in progress:
            self.bar.set_postfix(loss=f"{float(progress['loss']):.4f}", refresh=False)

    def __enter__(self) -> "ProgressDisplay":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
