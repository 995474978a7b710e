"""``TaskSpec``: what the layers below the training code know of a task kind.

The config checks a job of the kind must pass, the Hugging Face auto class its teachers and
students load with, and the few facts that the checks of other features (several teachers, a
student's own tokenizer, the data layouts) and the model builder ask about. Pure Python: the
config imports every spec, and loading a config must not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# A job config (cluster.config.JobConfig) as the checks see it. That module imports the specs, so the
# type cannot be imported here without a cycle; the checks read its fields by name.
JobSettings = Any
# A tokenizer (transformers' PreTrainedTokenizerBase), read for its special token ids only.
Tokenizer = Any


def no_token_fields(tokenizer: Tokenizer) -> Mapping[str, int]:
    return {}


def decoder_markers(tokenizer: Tokenizer) -> tuple[int, int]:
    """The ids a decoder's text starts and ends with: the tokenizer's BOS and EOS, else its [CLS] and
    [SEP] (a WordPiece tokenizer trained on the data has no BOS or EOS)."""
    start = tokenizer.cls_token_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.eos_token_id is None else tokenizer.eos_token_id
    return start, end


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the config's `task`
    # The auto class in transformers, by name: the spec stays importable without torch (student/build.py
    # resolves it).
    auto_class: str
    # Raises ValueError, saying what to change, for settings a job of this kind cannot use. Runs on every
    # config of the kind, after the data layout checks of ``check_task_settings``.
    check: Callable[[JobSettings], None]
    # Predicts the data's labels: a student checkpoint must predict the teacher's classes, in order.
    classes: bool = False
    # Knowledge per sequence (class probabilities, pooled embeddings): a student with its own tokenizer
    # (student.tokenizer) can learn it, as token positions need not line up.
    sequence_level: bool = False
    # Several teachers can serve a job together (extra_teachers): their class probabilities mix.
    several_teachers: bool = False
    # Reads parallel sentences (data.parallel).
    parallel_data: bool = False
    # Reads one tag per word (data.word_tags).
    word_tags: bool = False
    # Writes a translation of its input, so data.source_prefix can name the target language.
    translation: bool = False
    # Model config fields a teacher built with random weights takes from its tokenizer (teacher.config
    # still wins): a decoder's start and end markers.
    random_model_fields: Callable[[Tokenizer], Mapping[str, int]] = no_token_fields


def refuse_settings(wrong: Mapping[str, bool], why: str) -> None:
    """Refuses a config whose settings in ``wrong`` (setting -> set where the kind cannot use it) are
    set, naming each one: "<why>: set <setting> to 0/false/null, ..."."""
    named = [key for key, bad in wrong.items() if bad]
    if named:
        raise ValueError(f"{why}: set " + ", ".join(f"{key} to 0/false/null" for key in named))


def named_entry(registry: Mapping[str, Any], name: str) -> Any:
    """The task kind ``name`` of a registry keyed by the config's `task` literal, or an error listing them."""
    entry = registry.get(name)
    if entry is None:
        raise ValueError(f"no task kind is named {name!r}; the task kinds are {', '.join(registry)}")
    return entry

