"""Keeps library chatter (per-load progress bars, hub warnings) out of job output."""

from __future__ import annotations

import os
import warnings


def quiet_libraries() -> None:
    # Every actor loads a checkpoint; transformers would draw a "Loading weights" bar in each.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*non-writable.*")
