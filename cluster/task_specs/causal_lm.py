"""Causal language modelling's spec: a decoder's next-token distributions (top-k per token) on plain
text. Its behaviour: student/task_kinds/causal_lm.py."""

from __future__ import annotations

from collections.abc import Mapping

from polydistill.cluster.task_specs.language_model import check_language_model
from polydistill.cluster.task_specs.spec import TaskSpec, Tokenizer, decoder_markers


def text_markers(tokenizer: Tokenizer) -> Mapping[str, int]:
    """A decoder's text starts and ends with the tokenizer's own markers."""
    start, end = decoder_markers(tokenizer)
    return {"bos_token_id": start, "eos_token_id": end}


SPEC = TaskSpec(name="causal-lm", auto_class="AutoModelForCausalLM", check=check_language_model,
                random_model_fields=text_markers)
