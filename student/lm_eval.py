"""Language-model evaluation: perplexity per language, top-1 accuracy and agreement with the teacher.

A masked LM (task masked-lm) is scored the same way on the held-out text masked as in training
(``storage.masking``, one fixed draw): the masked positions are the predicted tokens, and the
perplexity is the usual masked-LM pseudo-perplexity over them.

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
from collections.abc import Callable

import numpy as np
import torch

from polydistill.storage.job_data import TokenizedSplit, pad_rows
from polydistill.student.lm_losses import next_token_nll
from polydistill.student.devices import model_device

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
    device = model_device(model)
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
        ids = torch.from_numpy(input_ids.astype(np.int64)).to(device)
        mask = torch.from_numpy(attention_mask.astype(np.int64)).to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        nll, counted = next_token_nll(logits, ids, mask)
        top1 = logits[:, :-1].argmax(-1)
        hits = (top1 == ids[:, 1:]) & counted
        nll_sum[index] = torch.where(counted, nll.double(), torch.zeros((), dtype=torch.float64)).sum(-1).cpu().numpy()
        correct[index] = hits.sum(-1).cpu().numpy()
        for row, i in enumerate(index):
            predictions[i] = top1[row][counted[row]].to(torch.int32).cpu().numpy()
    return nll_sum, correct, predictions


@torch.inference_mode()
def masked_token_stats(model, rows: TokenizedSplit, pad_id: int,
                       masking: Callable[[int], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """As ``next_token_stats`` for a masked LM: ``masking(i)`` gives row i's corrupted ids and labels
    (``storage.masking``); the masked positions are the ones predicted and counted."""
    model.eval()
    device = model_device(model)
    masked = [masking(i) for i in range(len(rows))]
    order = np.argsort(rows.lengths, kind="stable")
    nll_sum = np.zeros(len(rows), dtype=np.float64)
    correct = np.zeros(len(rows), dtype=np.int64)
    predictions: list[np.ndarray] = [np.empty(0, np.int32)] * len(rows)
    for start in range(0, len(order), MAX_ROWS):
        index = order[start : start + MAX_ROWS]
        input_ids, attention_mask = pad_rows([masked[i][0] for i in index], pad_id)
        labels = np.full(input_ids.shape, -100, dtype=np.int64)
        for row, i in enumerate(index):
            labels[row, : len(masked[i][1])] = masked[i][1]
        logits = model(input_ids=torch.from_numpy(input_ids.astype(np.int64)).to(device),
                       attention_mask=torch.from_numpy(attention_mask.astype(np.int64)).to(device)).logits.float()
        target = torch.from_numpy(labels).to(device)
        counted = target != -100
        nll = -torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        top1 = logits.argmax(-1)
        nll_sum[index] = torch.where(counted, nll.double(), torch.zeros((), dtype=torch.float64)).sum(-1).cpu().numpy()
        correct[index] = ((top1 == target) & counted).sum(-1).cpu().numpy()
        for row, i in enumerate(index):
            predictions[i] = top1[row][counted[row]].to(torch.int32).cpu().numpy()
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


def lm_quality(model, rows: TokenizedSplit, pad_id: int, reference: LMQuality | None = None,
               masking: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None) -> LMQuality:
    """Perplexity, top-1 accuracy and (given the teacher's ``reference``) top-1 agreement with it,
    per language and overall. Without a reference the model is its own (agreement 1.0). Next tokens
    for a causal LM; with ``masking``, the masked tokens of a masked LM (pseudo-perplexity)."""
    if masking is None:
        nll, correct, predictions = next_token_stats(model, rows, pad_id)
    else:
        nll, correct, predictions = masked_token_stats(model, rows, pad_id, masking)
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
