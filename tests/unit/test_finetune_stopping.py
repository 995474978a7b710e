"""Early stopping on a dev split: the pure decision on a scripted curve, and the training loop that
stops on it and ends with the best weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from polydistill.storage.job_data import TokenizedSplit
from polydistill.student.supervised import DevStopping, StoppingState, after_dev_score, train_supervised

CURVE = [0.30, 0.50, 0.45, 0.50, 0.49, 0.60, 0.70]


def run_curve(curve: list[float], patience: int) -> tuple[StoppingState, int | None]:
    """The state after the scores up to the stop, and the evaluation (1-based) that stopped it."""
    state = StoppingState()
    for evaluation, score in enumerate(curve, start=1):
        state, stop = after_dev_score(state, evaluation, score, patience)
        if stop:
            return state, evaluation
    return state, None


@pytest.mark.parametrize("patience, best_step, stopped_at", [
    (1, 2, 3),  # the first score without a new best ends it
    (3, 2, 5),  # 0.45, a tie at 0.50 (not a new best) and 0.49: three without improvement
    (4, 7, None),  # patient enough to see 0.60 and 0.70
])
def test_early_stopping_on_a_scripted_curve(patience, best_step, stopped_at):
    state, stopped = run_curve(CURVE, patience)
    assert (state.best_step, stopped) == (best_step, stopped_at)
    assert state.best_score == CURVE[best_step - 1]


def test_a_new_best_resets_the_count():
    state, stop = after_dev_score(StoppingState(best_score=0.5, best_step=3, scores_since_best=2), 9, 0.6, 3)
    assert state == StoppingState(best_score=0.6, best_step=9, scores_since_best=0) and not stop


def tiny_classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=3,
                                                    max_position_embeddings=32))


def tiny_rows(n: int = 40) -> TokenizedSplit:
    rng = np.random.default_rng(0)
    return TokenizedSplit(sample_ids=np.arange(n), labels=rng.integers(0, 3, n),
                          token_ids=[rng.integers(1, 50, rng.integers(4, 10)).astype(np.int32) for _ in range(n)],
                          languages=["aaa"] * n)


def test_training_stops_on_the_scripted_dev_curve_and_keeps_the_best_weights():
    model, seen = tiny_classifier(), []
    scripted = iter([0.1, 0.3, 0.2, 0.25, 0.9])

    def score(scored_model):
        seen.append(scored_model.classifier.weight.detach().clone())
        value = next(scripted)
        return value, {"aaa": value}

    dev = DevStopping(score, every_steps=2, patience=2)
    train_supervised(model, tiny_rows(), 0, epochs=3, batch_size=4, lr=1e-2, weight_decay=0.0, seed=0, dev=dev,
                     show_progress=False)
    # 10 steps an epoch, scored every 2: 0.1, 0.3 (best, step 4), 0.2, 0.25 -> stop at step 8.
    assert [point["step"] for point in dev.curve] == [2, 4, 6, 8]
    assert [point["accuracy"] for point in dev.curve] == [0.1, 0.3, 0.2, 0.25]
    assert dev.curve[1] == {"step": 4, "epoch": 0.4, "accuracy": 0.3, "per_language": {"aaa": 0.3}}
    assert dev.state.best_step == 4 and dev.stopped_early
    assert torch.equal(model.classifier.weight, seen[1])
    assert not torch.equal(seen[1], seen[3])  # it did train on after the best


def test_the_last_step_is_always_scored():
    dev = DevStopping(lambda model: (0.5, {"aaa": 0.5}), every_steps=4, patience=5)
    train_supervised(tiny_classifier(), tiny_rows(), 0, epochs=1, batch_size=4, lr=1e-3, weight_decay=0.0, seed=0,
                     dev=dev, show_progress=False)
    assert [point["step"] for point in dev.curve] == [4, 8, 10] and not dev.stopped_early


def test_the_schedule_setting_changes_the_run():
    """Same seed and data: only the learning-rate schedule differs, so the weights do too."""
    trained = {}
    for schedule in ("linear", "constant"):
        model = tiny_classifier()
        train_supervised(model, tiny_rows(), 0, epochs=1, batch_size=4, lr=1e-2, weight_decay=0.0, seed=0,
                         schedule=schedule, show_progress=False)
        trained[schedule] = model.classifier.weight.detach().clone()
    assert not torch.equal(trained["linear"], trained["constant"])
