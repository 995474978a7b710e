"""Code-switched sentences with word-level language tags, built offline from Tatoeba bitext.

The task is token classification: tag every word of a mixed sentence with the language it is
written in. Real code-switched corpora are scarce and licence-bound, so each sample is spliced
from one aligned Tatoeba pair (a sentence in language X and its English translation): a prefix of
one side followed by a suffix of the other, cut at about the same relative position in both, so
the result reads like one sentence that switches language once. Which side comes first and where
the cut falls are drawn from a seeded numpy Generator.

Tags: the side's language code ("fra", "eng", ...) for every word that contains at least one
letter, and "other" for a word made only of digits, punctuation or symbols ("3,000", "?", "—"),
which carry no language. Words are kept exactly as they are; only whitespace separates them.

Only languages that put spaces between words are used (Chinese and Japanese are not: a
whitespace "word" there is a whole clause). Train and test come from disjoint source lines: the
first ``train_fraction`` of each language's lines go to train, the rest to test, so no test
sample shares a sentence with a training sample. Files with fewer lines (Amharic and Swahili have
168 and 390) are split by the same fraction, which keeps a test part for every language.

Determinism: each language draws from its own generator seeded from (seed, crc32 of its code),
so adding or removing a language does not change the samples of the others.

Output of ``build_code_switch`` (also ``python -m polydistill.storage.code_switch TATOEBA_DIR OUT_DIR``):
``train.jsonl`` and ``test.jsonl`` with one {"text", "tags", "language"} object per line (``text``
and ``tags`` are space-joined, one tag per word of ``text.split(" ")``), and ``labels.txt`` with
the tag names one per line: the sorted language codes including "eng", then "other".
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "CODE_SWITCH_LANGUAGES",
    "ENGLISH",
    "OTHER_TAG",
    "CodeSwitchSample",
    "build_code_switch",
    "code_switch_label_names",
    "code_switch_samples",
    "read_aligned_pair",
    "splice_lines",
    "splice_pair",
    "split_index",
    "tag_words",
]

CODE_SWITCH_LANGUAGES: tuple[str, ...] = ("fra", "deu", "spa", "rus", "ara", "hin", "tur", "vie", "swh", "amh")
ENGLISH = "eng"
OTHER_TAG = "other"
DEFAULT_MAX_WORDS = 48


@dataclass(frozen=True)
class CodeSwitchSample:
    """One spliced sentence; ``line`` is the 0-based index of its source pair in the bitext."""

    words: tuple[str, ...]
    tags: tuple[str, ...]
    language: str
    line: int
    english_first: bool

    def to_json(self) -> dict[str, str]:
        return {"text": " ".join(self.words), "tags": " ".join(self.tags), "language": self.language}


def code_switch_label_names(languages: Sequence[str] = CODE_SWITCH_LANGUAGES) -> list[str]:
    """The tag names in label-id order: sorted language codes with English, then "other"."""
    return sorted(set(languages) | {ENGLISH}) + [OTHER_TAG]


def tag_words(words: Sequence[str], language: str) -> list[str]:
    """``language`` for each word with at least one letter, ``OTHER_TAG`` for the rest."""
    return [language if any(ch.isalpha() for ch in word) else OTHER_TAG for word in words]


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"missing bitext file: {path}")
    data = path.read_bytes()
    # Split on "\n" only: str.splitlines would also break on U+2028, U+0085 and friends, which
    # can occur inside a sentence and would shift every later line out of alignment.
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    decoded = []
    for number, raw in enumerate(lines, start=1):
        try:
            decoded.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: line {number} is not valid UTF-8 ({exc.reason})") from None
    return decoded


def read_aligned_pair(tatoeba_dir: Path | str, language: str) -> tuple[list[str], list[str]]:
    """The (language X, English) sentences of ``tatoeba.X-eng.{X,eng}``, checked to align."""
    base = Path(tatoeba_dir)
    foreign_path = base / f"tatoeba.{language}-eng.{language}"
    english_path = base / f"tatoeba.{language}-eng.eng"
    foreign, english = _read_lines(foreign_path), _read_lines(english_path)
    if len(foreign) != len(english):
        raise ValueError(
            f"line-count mismatch: {foreign_path} has {len(foreign)} lines, {english_path} has {len(english)}"
        )
    return foreign, english


def _cut(n_words: int, fraction: float, *, lowest: int, highest: int) -> int:
    return min(max(int(round(fraction * n_words)), lowest), highest)


def splice_pair(
    first: Sequence[str], second: Sequence[str], fraction: float, max_words: int = DEFAULT_MAX_WORDS
) -> tuple[int, int]:
    """How many words to keep: (prefix length of ``first``, suffix length of ``second``).

    Both sentences are cut at ``fraction`` of their length, so the prefix covers the beginning
    of the meaning and the suffix its end. Each part keeps at least one word, and the total is
    capped at ``max_words`` by dropping words next to the switch point, longer part first.
    """
    if not first or not second:
        raise ValueError("both sentences need at least one word")
    if max_words < 2:
        raise ValueError(f"max_words must be at least 2, got {max_words}")
    prefix = _cut(len(first), fraction, lowest=1, highest=len(first))
    suffix = len(second) - _cut(len(second), fraction, lowest=0, highest=len(second) - 1)
    excess = prefix + suffix - max_words
    if excess > 0:
        # Take from the longer part first, then alternate, leaving each at least one word.
        for _ in range(excess):
            if prefix >= suffix:
                prefix -= 1
            else:
                suffix -= 1
    return prefix, suffix


def _language_rng(seed: int, language: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(language.encode("utf-8"))])


def splice_lines(
    foreign: Sequence[str],
    english: Sequence[str],
    language: str,
    seed: int = 0,
    max_words: int = DEFAULT_MAX_WORDS,
) -> list[CodeSwitchSample]:
    """One spliced sample per aligned (``language``, English) line pair.

    Pairs where either side has no words are skipped (their line index is simply absent).
    """
    if len(foreign) != len(english):
        raise ValueError(f"{language}: {len(foreign)} sentences but {len(english)} English ones")
    rng = _language_rng(seed, language)
    samples: list[CodeSwitchSample] = []
    for line, (foreign_text, english_text) in enumerate(zip(foreign, english)):
        # Draw for every line, skipped or not, so one blank line does not shift the draws of
        # all the lines after it.
        english_first = bool(rng.random() < 0.5)
        fraction = float(rng.uniform(0.2, 0.8))
        foreign_words, english_words = foreign_text.split(), english_text.split()
        if not foreign_words or not english_words:
            continue
        if english_first:
            first, first_lang, second, second_lang = english_words, ENGLISH, foreign_words, language
        else:
            first, first_lang, second, second_lang = foreign_words, language, english_words, ENGLISH
        prefix, suffix = splice_pair(first, second, fraction, max_words)
        head, tail = first[:prefix], second[len(second) - suffix :]
        samples.append(
            CodeSwitchSample(
                words=tuple(head + tail),
                tags=tuple(tag_words(head, first_lang) + tag_words(tail, second_lang)),
                language=language,
                line=line,
                english_first=english_first,
            )
        )
    return samples


def code_switch_samples(
    tatoeba_dir: Path | str,
    language: str,
    seed: int = 0,
    max_words: int = DEFAULT_MAX_WORDS,
    max_lines: int | None = None,
) -> list[CodeSwitchSample]:
    """``splice_lines`` over the first ``max_lines`` (default all) lines of ``language``'s bitext."""
    foreign, english = read_aligned_pair(tatoeba_dir, language)
    return splice_lines(foreign[:max_lines], english[:max_lines], language, seed=seed, max_words=max_words)


def split_index(n_lines: int, train_fraction: float) -> int:
    """Lines ``[0, split)`` are train, ``[split, n_lines)`` test (800 of 1000 at 0.8)."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    return int(round(n_lines * train_fraction))


def _write_jsonl(path: Path, samples: Sequence[CodeSwitchSample]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as out:
        for sample in samples:
            out.write(json.dumps(sample.to_json(), ensure_ascii=False) + "\n")


def build_code_switch(
    tatoeba_dir: Path | str,
    out_dir: Path | str,
    seed: int = 0,
    languages: Sequence[str] = CODE_SWITCH_LANGUAGES,
    train_fraction: float = 0.8,
    max_lines: int | None = None,
    max_words: int = DEFAULT_MAX_WORDS,
) -> dict:
    """Writes train.jsonl, test.jsonl and labels.txt to ``out_dir``; returns the counts.

    Every input file is read and checked before anything is written, so a bad folder leaves
    ``out_dir`` untouched.
    """
    if not languages:
        raise ValueError("no languages given")
    if ENGLISH in languages:
        raise ValueError("English is the pivot of every pair; list only the other languages")
    splits: dict[str, list[CodeSwitchSample]] = {"train": [], "test": []}
    per_language: dict[str, dict[str, int]] = {}
    for language in languages:
        foreign, english = read_aligned_pair(tatoeba_dir, language)
        foreign, english = foreign[:max_lines], english[:max_lines]
        n_lines = len(foreign)
        samples = splice_lines(foreign, english, language, seed=seed, max_words=max_words)
        boundary = split_index(n_lines, train_fraction)
        train = [s for s in samples if s.line < boundary]
        test = [s for s in samples if s.line >= boundary]
        splits["train"] += train
        splits["test"] += test
        per_language[language] = {"train": len(train), "test": len(test), "skipped": n_lines - len(samples)}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, samples in splits.items():
        _write_jsonl(out / f"{name}.jsonl", samples)
    label_names = code_switch_label_names(languages)
    (out / "labels.txt").write_text("".join(f"{name}\n" for name in label_names), encoding="utf-8")

    tag_counts = {
        name: dict(sorted(Counter(tag for s in samples for tag in s.tags).items()))
        for name, samples in splits.items()
    }
    return {
        "train": len(splits["train"]),
        "test": len(splits["test"]),
        "per_language": per_language,
        "tags": tag_counts,
        "labels": label_names,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tatoeba_dir", type=Path, help="folder with tatoeba.xxx-eng.{xxx,eng}")
    parser.add_argument("out_dir", type=Path, help="where train.jsonl, test.jsonl and labels.txt go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--languages", nargs="+", default=list(CODE_SWITCH_LANGUAGES), help="codes paired with English"
    )
    parser.add_argument("--train-fraction", type=float, default=0.8)
    parser.add_argument("--max-lines", type=int, default=None, help="use only the first N lines of each language")
    parser.add_argument("--max-words", type=int, default=DEFAULT_MAX_WORDS)
    args = parser.parse_args(argv)
    counts = build_code_switch(
        args.tatoeba_dir,
        args.out_dir,
        seed=args.seed,
        languages=args.languages,
        train_fraction=args.train_fraction,
        max_lines=args.max_lines,
        max_words=args.max_words,
    )
    print(json.dumps(counts, indent=2, ensure_ascii=False))
    return counts


if __name__ == "__main__":
    main()
