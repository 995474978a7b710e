"""Translation quality of a sequence-to-sequence model: generate translations, score them with sacrebleu.

``translate`` runs batched generation with a Hugging Face encoder-decoder model
(``AutoModelForSeq2SeqLM``). Sources are sorted by their length in tokens, longest first, before
batching, so that each batch carries little padding and memory runs out on the first batch if at
all; the translations come back in the order of the input. Decoding uses the tokenizer's own
``batch_decode`` with special tokens skipped, so a WordPiece tokenizer with a WordPiece decoder
joins ``##`` pieces back into words.

``translation_scores`` reports corpus BLEU and chrF (sacrebleu, 0-100 scale) per language and over
all sentences. BLEU depends on how text is split into words, and the default ``13a`` tokenizer
splits on spaces and punctuation only, so a Chinese or Japanese sentence (written without spaces)
would count as one "word" and score near zero. Chinese therefore uses sacrebleu's ``zh``
tokenizer; Japanese uses ``char`` (the usual ``ja-mecab`` needs MeCab and a dictionary, which are
not available offline). chrF works on character n-grams with whitespace removed, so its default
settings suit every script.

The ``overall`` BLEU pools all sentences while each is still tokenized for its own language: the
n-gram match counts and lengths of every language are summed and BLEU is computed from the sums.
This is the corpus BLEU of the whole test set, with no script scored by the wrong tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.metrics.bleu import BLEUScore

CHINESE_LANGUAGE_PREFIXES = ("zh", "zho", "cmn")
JAPANESE_LANGUAGE_PREFIXES = ("ja", "jpn")
DEFAULT_BLEU_TOKENIZER = "13a"


def translate(
    model,
    tokenizer,
    sources: list[str],
    *,
    num_beams: int = 1,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    max_length: int = 128,
) -> list[str]:
    """Translate ``sources`` with ``model.generate`` (greedy when ``num_beams`` is 1, beam search
    otherwise; never sampling). Returns one stripped string per source, in the input order.

    Inputs longer than ``max_length`` tokens are truncated; at most ``max_new_tokens`` tokens are
    generated per source."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not sources:
        return []
    model.eval()
    device = next(model.parameters()).device
    token_counts = [len(ids) for ids in tokenizer(sources, truncation=True, max_length=max_length)["input_ids"]]
    longest_first = sorted(range(len(sources)), key=lambda index: token_counts[index], reverse=True)
    translations: list[str] = [""] * len(sources)
    with torch.inference_mode():
        for start in range(0, len(longest_first), batch_size):
            batch_indices = longest_first[start:start + batch_size]
            encoded = tokenizer(
                [sources[index] for index in batch_indices],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            generated = model.generate(
                input_ids=encoded["input_ids"].to(device),
                attention_mask=encoded["attention_mask"].to(device),
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
            decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
            for index, text in zip(batch_indices, decoded):
                translations[index] = text.strip()
    return translations


def bleu_tokenizer_for(language: str) -> str:
    """The sacrebleu BLEU tokenizer suited to a language code such as ``cmn``, ``zho_Hans``,
    ``jpn`` or ``fra_Latn``: ``zh`` for Chinese, ``char`` for Japanese, ``13a`` otherwise."""
    base = language.lower().replace("-", "_").split("_", 1)[0]
    if base in CHINESE_LANGUAGE_PREFIXES:
        return "zh"
    if base in JAPANESE_LANGUAGE_PREFIXES:
        return "char"
    return DEFAULT_BLEU_TOKENIZER


def translation_scores(hypotheses: list[str], references: list[str], languages: list[str]) -> dict:
    """Corpus BLEU and chrF of ``hypotheses`` against one reference each.

    Returns ``{"per_language": {language: {"bleu", "chrf", "n"}}, "overall": {"bleu", "chrf", "n"},
    "language_average": {"bleu", "chrf"}}``, scores on sacrebleu's 0-100 scale rounded to 2
    decimals. ``language_average`` is the unweighted mean over languages. With no sentences,
    ``per_language`` is empty and the other scores are 0 (with ``n`` 0)."""
    if not len(hypotheses) == len(references) == len(languages):
        raise ValueError(
            "hypotheses, references and languages must have the same length, got "
            f"{len(hypotheses)}, {len(references)} and {len(languages)}"
        )
    rows_by_language: dict[str, list[int]] = {}
    for row, language in enumerate(languages):
        rows_by_language.setdefault(language, []).append(row)

    chrf = CHRF()
    per_language: dict[str, dict] = {}
    bleu_by_language: list[BLEUScore] = []
    unrounded_by_language: list[tuple[float, float]] = []
    for language in sorted(rows_by_language):
        rows = rows_by_language[language]
        language_hypotheses = [hypotheses[row] for row in rows]
        language_references = [[references[row] for row in rows]]
        bleu = BLEU(tokenize=bleu_tokenizer_for(language)).corpus_score(language_hypotheses, language_references)
        chrf_score = chrf.corpus_score(language_hypotheses, language_references).score
        bleu_by_language.append(bleu)
        unrounded_by_language.append((bleu.score, chrf_score))
        per_language[language] = {"bleu": round(bleu.score, 2), "chrf": round(chrf_score, 2), "n": len(rows)}

    if not per_language:
        return {
            "per_language": {},
            "overall": {"bleu": 0.0, "chrf": 0.0, "n": 0},
            "language_average": {"bleu": 0.0, "chrf": 0.0},
        }
    overall = {
        "bleu": round(pooled_bleu(bleu_by_language).score, 2),
        "chrf": round(chrf.corpus_score(list(hypotheses), [list(references)]).score, 2),
        "n": len(hypotheses),
    }
    language_average = {
        "bleu": round(sum(bleu for bleu, _ in unrounded_by_language) / len(unrounded_by_language), 2),
        "chrf": round(sum(chrf_score for _, chrf_score in unrounded_by_language) / len(unrounded_by_language), 2),
    }
    return {"per_language": per_language, "overall": overall, "language_average": language_average}


def pooled_bleu(parts: Sequence[BLEUScore]) -> BLEUScore:
    """Corpus BLEU of the union of several corpora, each already scored with its own tokenizer:
    n-gram matches, n-gram totals and lengths are summed, then combined as sacrebleu's default
    corpus BLEU does (4-grams, exponential smoothing)."""
    max_ngram_order = len(parts[0].counts)
    correct = [sum(part.counts[order] for part in parts) for order in range(max_ngram_order)]
    total = [sum(part.totals[order] for part in parts) for order in range(max_ngram_order)]
    return BLEU.compute_bleu(
        correct=correct,
        total=total,
        sys_len=sum(part.sys_len for part in parts),
        ref_len=sum(part.ref_len for part in parts),
        smooth_method="exp",
        max_ngram_order=max_ngram_order,
    )
