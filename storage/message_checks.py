"""What a message may ask of the model that handles it, checked before the model runs.

A work batch decodes fine with token ids past the model's vocabulary, rows longer than its
positions, or an epoch the plan does not have; run as it is, it raises deep inside torch (an
index error, a tensor-size mismatch) or trains on something that is not the job's. Such a
message is the sender's fault and is dead-lettered with the reason (``MessageRejected``); these
checks are pure, so teachers and students share them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from polydistill.storage.schema import WireError


class MessageRejected(WireError):
    """A well-formed message asks what this model or this job's plan cannot give: dead-letter it."""


@dataclass(frozen=True)
class ModelLimits:
    """What one model accepts: token ids below ``vocab_size``, rows of at most ``max_positions`` tokens
    (None: not bounded, e.g. relative positions)."""

    vocab_size: int
    max_positions: int | None = None

    @classmethod
    def of(cls, model_config) -> "ModelLimits":
        """The limits of a Hugging Face model's config (its ``vocab_size`` and ``max_position_embeddings``)."""
        return cls(int(model_config.vocab_size), usable_positions(model_config))


# RoBERTa-style models number positions from the padding id + 1: XLM-R's 514 position embeddings hold 512 tokens.
POSITIONS_AFTER_PADDING_ID = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "xmod"}


def usable_positions(model_config) -> int | None:
    """The longest row (in tokens) a model reads; None when its positions are not bounded."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if not positions:
        return None
    if getattr(model_config, "model_type", None) in POSITIONS_AFTER_PADDING_ID:
        return int(positions) - (int(getattr(model_config, "pad_token_id", None) or 0) + 1)
    return int(positions)


def check_max_length(max_length: int, model_config, model: str) -> None:
    """Refuse, before any text is read, a data.max_length longer than the model's rows."""
    positions = usable_positions(model_config)
    if positions is not None and max_length > positions:
        raise ValueError(f"data.max_length is {max_length}, but the {model} reads rows of at most {positions} tokens "
                         f"(max_position_embeddings): set data.max_length to {positions} or less")


def check_token_ids(ids: np.ndarray, limits: ModelLimits, where: str, *, model: str) -> None:
    """Refuse ids outside [0, vocab_size) and rows longer than the model's positions."""
    if ids.ndim == 2 and limits.max_positions is not None and ids.shape[1] > limits.max_positions:
        raise MessageRejected(
            f"{where}: rows of {ids.shape[1]} tokens, but the {model} has {limits.max_positions} positions "
            "(data.max_length must not exceed the model's max_position_embeddings)")
    if ids.size:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= limits.vocab_size:
            raise MessageRejected(
                f"{where}: token ids span [{low}, {high}], outside the {model}'s vocabulary of {limits.vocab_size} "
                "(was the batch tokenised with another tokenizer?)")


def check_in_plan(epoch: int, batch_id: int, epochs: int, batches_per_epoch: int) -> None:
    """Refuse a batch the job's plan does not have."""
    if not (0 <= epoch < epochs and 0 <= batch_id < batches_per_epoch):
        raise MessageRejected(f"batch {batch_id} of epoch {epoch} is outside the plan "
                              f"({epochs} epochs x {batches_per_epoch} batches)")
