"""The files that make a saved sentence-embedding student a sentence-transformers model, so that
``SentenceTransformer(folder)`` embeds as the report measured: the encoder, mean pooling over the
tokens the mask keeps, L2 normalisation (student/retrieval.py scores retrieval with the same three).
Plain JSON: nothing here needs sentence-transformers installed."""

from __future__ import annotations

import json
from pathlib import Path

POOLING_DIR = "1_Pooling"
NORMALIZE_DIR = "2_Normalize"


def write_sentence_transformers_files(folder: Path, hidden_size: int, max_seq_length: int) -> list[Path]:
    """Writes modules.json, sentence_bert_config.json and the pooling and normalisation modules'
    folders beside the encoder already saved in ``folder``; returns the paths written."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": NORMALIZE_DIR, "type": "sentence_transformers.models.Normalize"},
    ]
    pooling = {"word_embedding_dimension": hidden_size, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
               "pooling_mode_lasttoken": False, "include_prompt": True}
    files = {
        folder / "modules.json": modules,
        folder / "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
        folder / POOLING_DIR / "config.json": pooling,
    }
    (folder / NORMALIZE_DIR).mkdir(parents=True, exist_ok=True)
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return [*files, folder / NORMALIZE_DIR]
