"""What a worker does with a message whose handling raised (storage/delivery.py ``after_failure``), and the
checks of what a message asks of its model and plan (storage/message_checks.py): pure, no Redis."""

from __future__ import annotations

import numpy as np
import pytest

from polydistill.storage.delivery import DeadLetter, Retry, WorkerFault, after_failure
from polydistill.storage.message_checks import MessageRejected, ModelLimits, check_in_plan, check_token_ids
from polydistill.storage.wire import WireError

OOM = "OutOfMemoryError: CUDA out of memory"
SIZE = "RuntimeError: The size of tensor a (1024) must match the size of tensor b (128)"

# (errors so far, the last one just now; deliveries; message at fault) -> verdict class, words in its reason
CASES = [
    # The message says it is invalid: no retry mends it, whatever the count.
    (["WireError: bad shape"], 1, True, DeadLetter, "bad shape"),
    (["MessageRejected: ids past the vocabulary"], 4, True, DeadLetter, "vocabulary"),
    # An unexpected error is retried while deliveries remain.
    ([OOM], 1, False, Retry, None),
    ([OOM, OOM], 2, False, Retry, None),
    ([OOM, SIZE], 4, False, Retry, None),
    # Other workers died on it before: their deliveries count too.
    ([OOM], 5, False, DeadLetter, "each of its 5 deliveries"),
    # The same error on every delivery: the message's fault.
    ([SIZE] * 5, 5, False, DeadLetter, "must match"),
    ([SIZE] * 3, 7, False, DeadLetter, "transport.max_deliveries=5"),
    # Different errors on the same message, all deliveries spent: the worker's fault.
    ([OOM, SIZE, OOM, OOM, OOM], 5, False, WorkerFault, "different errors"),
]


@pytest.mark.parametrize("errors, deliveries, at_fault, verdict, words", CASES)
def test_after_failure(errors, deliveries, at_fault, verdict, words):
    got = after_failure(errors, deliveries, 5, message_at_fault=at_fault)
    assert type(got) is verdict
    if words is not None:
        assert words in got.reason


@pytest.mark.parametrize("errors, deliveries, max_deliveries", [([], 1, 5), (["x"], 0, 5), (["x"], 1, 0)])
def test_after_failure_refuses_impossible_inputs(errors, deliveries, max_deliveries):
    with pytest.raises(ValueError):
        after_failure(errors, deliveries, max_deliveries, message_at_fault=False)


LIMITS = ModelLimits(vocab_size=100, max_positions=8)


@pytest.mark.parametrize("ids, words", [
    (np.array([[1, 100]]), "span [1, 100], outside the teacher's vocabulary of 100"),
    (np.array([[-1, 3]]), "span [-1, 3]"),
    (np.zeros((2, 9), np.int32), "rows of 9 tokens, but the teacher has 8 positions"),
])
def test_token_ids_the_model_cannot_take_are_rejected_naming_why(ids, words):
    with pytest.raises(MessageRejected) as caught:
        check_token_ids(ids, LIMITS, "WorkBatch.input_ids", model="teacher")
    assert words in str(caught.value)
    assert isinstance(caught.value, WireError)  # the message's fault: dead-lettered like garbage


def test_token_ids_within_the_limits_pass():
    check_token_ids(np.array([[0, 99, 5, 5, 5, 5, 5, 5]]), LIMITS, "ids", model="teacher")
    check_token_ids(np.zeros((0, 0), np.int32), LIMITS, "ids", model="teacher")
    check_token_ids(np.zeros((1, 500), np.int32), ModelLimits(100), "ids", model="teacher")


@pytest.mark.parametrize("epoch, batch_id", [(2, 0), (0, 10), (-1, 0), (0, -1)])
def test_batches_outside_the_plan_are_rejected(epoch, batch_id):
    with pytest.raises(MessageRejected, match="outside the plan"):
        check_in_plan(epoch, batch_id, epochs=2, batches_per_epoch=10)


def test_batches_inside_the_plan_pass():
    check_in_plan(1, 9, epochs=2, batches_per_epoch=10)


def test_roberta_style_models_read_two_fewer_tokens_than_their_position_table():
    from transformers import BertConfig, XLMRobertaConfig

    from polydistill.storage.message_checks import check_max_length, usable_positions

    assert usable_positions(XLMRobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert usable_positions(BertConfig(max_position_embeddings=512)) == 512
    check_max_length(512, XLMRobertaConfig(max_position_embeddings=514, pad_token_id=1), "teacher")
    with pytest.raises(ValueError, match="set data.max_length to 512 or less"):
        check_max_length(513, XLMRobertaConfig(max_position_embeddings=514, pad_token_id=1), "teacher")
