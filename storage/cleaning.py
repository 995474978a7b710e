"""Text cleaning for a canonical dataset (see storage/datasets.py), with a per-language report.

`clean_text` is the pure per-string function; `clean_dataset` applies it, then drops rows for
one reason each, checked in this order: `empty`, `too_short`, `too_long`, `duplicate`.
Rows keep their `sample_id`, so dropped rows show up as gaps in the ids.

Steps of `clean_text`, in order:
1. HTML: tags removed (block-level tags such as <br>, <p>, <li> become a space, inline tags such
   as <b> vanish so that "un<b>usual</b>" stays one word and CJK text gains no spaces), then
   entities unescaped. Tags go first so that escaped markup ("&lt;b&gt;") survives as text.
2. Control characters: Unicode categories Cc and Cf are removed, except that whitespace controls
   (tab, newline, CR, ...) become a space, and ZERO WIDTH JOINER (U+200D) / ZERO WIDTH NON-JOINER
   (U+200C) are kept. Those two are Cf but carry meaning: ZWNJ separates morphemes in Persian and
   Kurdish ("می‌خواهم") and picks half-forms in Devanagari/Bengali conjuncts, ZWJ selects
   conjunct/ligature forms in Indic scripts (and builds emoji sequences). Dropping them changes
   the spelling and the tokenisation of real words. Other Cf characters (soft hyphen, BOM,
   zero-width space, bidi marks) are invisible formatting and are dropped. Done before
   normalisation so that a removed character cannot block the composition of its neighbours.
3. Unicode normalisation (NFKC by default; NFC keeps compatibility characters such as full-width
   Latin or ligatures distinct).
4. Whitespace: every run of Unicode whitespace becomes one ASCII space; ends are stripped.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa
from datasets import Dataset
from datasets.table import InMemoryTable

__all__ = ["DROP_REASONS", "CleaningReport", "LanguageCleaning", "clean_dataset", "clean_text"]

DROP_REASONS = ("empty", "too_short", "too_long", "duplicate", "words_changed")
Normalization = Literal["NFC", "NFKC"]

_KEEP_FORMAT = {"\u200c", "\u200d"}  # ZWNJ, ZWJ: see the module docstring
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_BLOCK_TAGS = (
    "address|article|aside|blockquote|br|dd|div|dl|dt|figcaption|figure|footer|h[1-6]|header|hr|"
    "li|main|nav|ol|p|pre|section|table|tbody|td|tfoot|th|thead|tr|ul"
)
_BLOCK_TAG = re.compile(rf"</?(?:{_BLOCK_TAGS})(?:\s[^<>]*)?/?>", re.IGNORECASE)
# A tag must start with a letter (or "/" + letter) so that "a < b" and "x <3" are left alone.
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>")
_SCRIPT_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)


def _strip_control(text: str) -> str:
    out = []
    for ch in text:
        if ch in _KEEP_FORMAT:
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf"):
            if ch.isspace():
                out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def clean_text(
    text: str,
    *,
    normalization: Normalization | None = "NFKC",
    strip_html: bool = True,
    strip_control: bool = True,
) -> str:
    if normalization not in (None, "NFC", "NFKC"):
        raise ValueError(f"normalization must be 'NFC', 'NFKC' or None, got {normalization!r}")
    if strip_html:
        if "<" in text:
            text = _SCRIPT_STYLE.sub(" ", text)
            text = _COMMENT.sub(" ", text)
            text = _BLOCK_TAG.sub(" ", text)
            text = _TAG.sub("", text)
        if "&" in text:
            text = html.unescape(text)
    if strip_control and not text.isprintable():
        text = _strip_control(text)  # only texts with a non-printable character get here
    if normalization is not None and not text.isascii():
        text = unicodedata.normalize(normalization, text)
    return " ".join(text.split())


@dataclass
class LanguageCleaning:
    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in DROP_REASONS})

    def to_dict(self) -> dict:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "dropped": dict(self.dropped)}


@dataclass
class CleaningReport:
    languages: dict[str, LanguageCleaning] = field(default_factory=dict)

    @property
    def total(self) -> LanguageCleaning:
        out = LanguageCleaning()
        for stats in self.languages.values():
            out.rows_in += stats.rows_in
            out.rows_out += stats.rows_out
            for reason, n in stats.dropped.items():
                out.dropped[reason] += n
        return out

    def to_dict(self) -> dict:
        return {
            "languages": {lang: stats.to_dict() for lang, stats in self.languages.items()},
            "total": self.total.to_dict(),
        }


def clean_dataset(
    ds: Dataset,
    *,
    normalization: Normalization | None = "NFKC",
    strip_html: bool = True,
    strip_control: bool = True,
    min_chars: int = 1,
    max_chars: int | None = None,
    drop_duplicates: bool = True,
) -> tuple[Dataset, CleaningReport]:
    """Clean `text`, drop rows, and report per language. Other columns pass through unchanged.

    Lengths count Unicode code points of the cleaned text. Duplicates are exact duplicates of the
    cleaned text within one language; the first occurrence is kept, whatever its label.
    A dataset without a `language` column is reported under "und".
    """
    if "text" not in ds.column_names:
        raise ValueError(f"clean_dataset needs a 'text' column; columns: {', '.join(ds.column_names)}")
    if min_chars < 0:
        raise ValueError(f"min_chars must be >= 0, got {min_chars}")
    if max_chars is not None and max_chars < max(min_chars, 1):
        raise ValueError(f"max_chars ({max_chars}) must be >= min_chars ({min_chars}) and >= 1")

    plain = ds.with_format(None)
    texts = plain["text"][:]
    langs = plain["language"][:] if "language" in ds.column_names else ["und"] * len(texts)
    # Tagged text (one tag per word): a row whose cleaning merged or split words would misalign its tags.
    word_counts = [len(tags) for tags in plain["tags"][:]] if "tags" in ds.column_names else None

    report = CleaningReport()
    seen: dict[str, set[str]] = {}
    keep: list[int] = []
    cleaned: list[str] = []
    for i, (raw, lang) in enumerate(zip(texts, langs)):
        stats = report.languages.setdefault(lang, LanguageCleaning())
        stats.rows_in += 1
        text = clean_text(
            "" if raw is None else raw,
            normalization=normalization,
            strip_html=strip_html,
            strip_control=strip_control,
        )
        n = len(text)
        if n == 0:
            reason = "empty"
        elif n < min_chars:
            reason = "too_short"
        elif max_chars is not None and n > max_chars:
            reason = "too_long"
        elif drop_duplicates and text in seen.setdefault(lang, set()):
            reason = "duplicate"
        elif word_counts is not None and len(text.split()) != word_counts[i]:
            reason = "words_changed"
        else:
            reason = None
        if reason is not None:
            stats.dropped[reason] += 1
            continue
        if drop_duplicates:
            seen[lang].add(text)
        stats.rows_out += 1
        keep.append(i)
        cleaned.append(text)

    table = plain.with_format("arrow")[:].take(pa.array(keep, type=pa.int64()))
    column = table.column_names.index("text")
    text_field = table.schema.field(column)
    table = table.set_column(column, text_field, pa.array(cleaned, type=text_field.type))
    return Dataset(InMemoryTable(table), info=ds.info.copy()), report
