"""Progress bars: samples distilled (fed from the progress hash the student writes to Redis), and
the steps of the supervised stages that run in the driver's process (teacher fine-tuning, baselines)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm import tqdm


def progress_bar(total: int, description: str, unit: str, enabled: bool = True) -> tqdm:
    """On a terminal the bar redraws in place; in a log (CI, `polydistill logs`) it prints a line
    every 10 s instead of thousands of carriage returns. Its remaining time is for ``total``."""
    return tqdm(
        total=total,
        desc=description,
        unit=unit,
        disable=not enabled,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
        dynamic_ncols=True,
        file=sys.stderr,
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
