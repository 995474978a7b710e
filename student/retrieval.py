"""Bitext retrieval: the standard evaluation of multilingual sentence embeddings.

For each language, every translation is embedded and matched to its nearest English sentence
among all held-out English sentences of that language (cosine similarity), and the other way
round; accuracy is the share matched to their own translation. The report carries both
directions and their mean as ``accuracy``, per language and overall, in the shape of the
classification report so that the same tables and plots show it.
"""

from __future__ import annotations

import numpy as np
import torch

from polydistill.storage.job_data import TokenizedSplit, pad_rows
from polydistill.student.losses import mean_pool
from polydistill.student.devices import model_device

EMBED_BATCH = 64


@torch.inference_mode()
def embed(model, token_ids: list[np.ndarray], pad_id: int, batch_size: int = EMBED_BATCH) -> np.ndarray:
    """Mean-pooled last hidden states, L2-normalised, one row per text (batched by length)."""
    model.eval()
    device = model_device(model)
    lengths = np.array([len(ids) for ids in token_ids])
    order = np.argsort(lengths, kind="stable")
    out = None
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        input_ids, mask = pad_rows([token_ids[i] for i in index], pad_id)
        mask_t = torch.from_numpy(mask.astype(np.int64)).to(device)
        states = model(input_ids=torch.from_numpy(input_ids.astype(np.int64)).to(device),
                       attention_mask=mask_t).last_hidden_state
        pooled = torch.nn.functional.normalize(mean_pool(states.float(), mask_t), dim=-1).cpu().numpy()
        if out is None:
            out = np.empty((len(token_ids), pooled.shape[1]), dtype=np.float32)
        out[index] = pooled
    return out


def retrieval_accuracy(source: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Row i of ``source`` translates row i of ``target``; both L2-normalised."""
    similarity = source @ target.T
    truth = np.arange(len(source))
    forward = float((similarity.argmax(1) == truth).mean())
    backward = float((similarity.argmax(0) == truth).mean())
    return {"accuracy": (forward + backward) / 2, "eng_to_xx": forward, "xx_to_eng": backward, "n": len(source)}


def retrieval_quality(model, rows: TokenizedSplit, pad_id: int) -> dict:
    """Per language, and averaged over languages as ``overall``."""
    if rows.pair_token_ids is None:
        raise ValueError("retrieval needs parallel rows (data.parallel: true)")
    english = embed(model, rows.token_ids, pad_id)
    translations = embed(model, rows.pair_token_ids, pad_id)
    languages = np.array(rows.languages)
    per_language = {}
    for language in sorted(set(rows.languages)):
        index = np.flatnonzero(languages == language)
        per_language[language] = retrieval_accuracy(english[index], translations[index])
    overall = {key: float(np.mean([row[key] for row in per_language.values()]))
               for key in ("accuracy", "eng_to_xx", "xx_to_eng")}
    overall["n"] = len(rows)
    return {"overall": overall, "per_language": per_language}
