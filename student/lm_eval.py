"""Causal-LM evaluation: perplexity per language, next-token accuracy and top-1 agreement with the teacher.

Every model reads the held-out text and predicts each next token (the shift of
``student.lm_losses``: logits at t predict token t + 1; positions whose next token is padding do
not count). Per language, and over all rows as ``overall``:

- ``perplexity``: exp of the mean token-level negative log-likelihood (token-weighted: every
  predicted token counts once, as in the usual corpus perplexity), with ``nll`` beside it;
- ``accuracy``: the share of tokens the model ranks first, i.e. next-token top-1 accuracy. It
  takes the ``accuracy`` slot of the classification report, so the shared tables, retention and
  plots read it (``report["metric"]`` says so);
- ``agreement``: the share of positions where the model's most likely next token is the teacher's
  (1.0 for the teacher itself), the usual measure of how faithfully a student follows;
- ``tokens`` (predicted tokens) and ``n`` (rows).

``lm_quality`` returns an ``LMQuality``, a plain dict for the report that also keeps the model's
top-1 predictions (not serialised): the evaluation of the next model passes it as ``reference``
to measure agreement, so the teacher runs once.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from storage.job_data import TokenizedSplit, pad_rows
from student.lm_losses import next_token_nll

# Rows per forward pass are chosen so that one batch's logits stay near this many floats
# (a 250k-piece vocabulary makes [rows, L, V] large quickly).
LOGIT_BUDGET = 32 * 1024 * 1024
MAX_ROWS = 64


class LMQuality(dict):
    """``{"overall": ..., "per_language": ...}`` plus ``predictions``: per row, the model's top-1
    next token at each counted position (int32), for agreement with a later model."""

    predictions: list[np.ndarray]


@torch.inference_mode()
def next_token_stats(model, rows: TokenizedSplit, pad_id: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Per row: summed NLL of its predicted tokens, how many of those the model ranked first, and its
    top-1 prediction at each of them. Rows are batched by length."""
    model.eval()
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else \
        model.config.vocab_size
    order = np.argsort(rows.lengths, kind="stable")
    nll_sum = np.zeros(len(rows), dtype=np.float64)
    correct = np.zeros(len(rows), dtype=np.int64)
    predictions: list[np.ndarray] = [np.empty(0, np.int32)] * len(rows)
    start = 0
    while start < len(order):
        longest = int(rows.lengths[order[min(len(order), start + MAX_ROWS) - 1]])
        take = int(max(1, min(MAX_ROWS, LOGIT_BUDGET // max(1, longest * vocab))))
        index = order[start : start + take]
        start += take
        input_ids, attention_mask = pad_rows([rows.token_ids[i] for i in index], pad_id)
        ids = torch.from_numpy(input_ids.astype(np.int64))
        mask = torch.from_numpy(attention_mask.astype(np.int64))
        logits = model(input_ids=ids, attention_mask=mask).logits
        nll, counted = next_token_nll(logits, ids, mask)
        top1 = logits[:, :-1].argmax(-1)
        hits = (top1 == ids[:, 1:]) & counted
        nll_sum[index] = torch.where(counted, nll.double(), torch.zeros((), dtype=torch.float64)).sum(-1).numpy()
        correct[index] = hits.sum(-1).numpy()
        for row, i in enumerate(index):
            predictions[i] = top1[row][counted[row]].to(torch.int32).numpy()
    return nll_sum, correct, predictions


def _scores(nll: float, correct: int, agreed: int | None, tokens: int, rows: int) -> dict:
    mean_nll = nll / tokens if tokens else 0.0
    return {
        "perplexity": math.exp(mean_nll) if tokens else None,
        "nll": mean_nll,
        "accuracy": correct / tokens if tokens else 0.0,
        "agreement": None if agreed is None else (agreed / tokens if tokens else 0.0),
        "tokens": tokens,
        "n": rows,
    }


def lm_quality(model, rows: TokenizedSplit, pad_id: int, reference: LMQuality | None = None) -> LMQuality:
    """Perplexity, next-token accuracy and (given the teacher's ``reference``) top-1 agreement with
    it, per language and overall. Without a reference the model is its own (agreement 1.0)."""
    nll, correct, predictions = next_token_stats(model, rows, pad_id)
    tokens = np.array([len(p) for p in predictions], dtype=np.int64)
    agree = None
    if reference is None:
        agree = tokens.copy()
    elif len(reference.predictions) == len(predictions) and all(
            len(mine) == len(theirs) for mine, theirs in zip(predictions, reference.predictions)):
        agree = np.array([int((mine == theirs).sum()) for mine, theirs in zip(predictions, reference.predictions)])
    # else: tokenised differently from the teacher (cannot happen for causal-lm, whose student must
    # read the teacher's tokenizer): no agreement rather than a misaligned one.
    languages = np.asarray(rows.languages, dtype=object)

    def scores(where: np.ndarray) -> dict:
        return _scores(float(nll[where].sum()), int(correct[where].sum()),
                       None if agree is None else int(agree[where].sum()), int(tokens[where].sum()), int(where.sum()))

    result = LMQuality(
        overall=scores(np.ones(len(rows), dtype=bool)),
        per_language={language: scores(languages == language) for language in sorted(set(rows.languages))},
    )
    result.predictions = predictions
    return result
