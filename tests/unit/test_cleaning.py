"""storage/cleaning.py: clean_text case by case, clean_dataset counts hand-checked."""

from __future__ import annotations

import pytest
from datasets import Dataset

from polydistill.storage.cleaning import CleaningReport, clean_dataset, clean_text
from polydistill.storage.datasets import CANONICAL_FEATURES

ZWNJ, ZWJ = "\u200c", "\u200d"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  a \t b\n\nc  ", "a b c"),
        ("non\u00a0breaking\u3000ideographic", "non breaking ideographic"),
        ("<p>Hello</p><p>world</p>", "Hello world"),
        ("un<b>usual</b> <i>word</i>", "unusual word"),
        ("line<br/>break<BR>again", "line break again"),
        ("中<b>文</b>", "中文"),
        ("Tom &amp; Jerry &lt;b&gt; &quot;q&quot; &#233;", 'Tom & Jerry <b> "q" é'),
        ("a < b and c > d, x <3", "a < b and c > d, x <3"),
        ("<!-- note -->kept<script>var x = 1;</script>", "kept"),
        ("soft\u00adhyphen zero\u200bwidth \ufeffbom", "softhyphen zerowidth bom"),
        ("bell\x07 null\x00 del\x7f", "bell null del"),
        ("rtl\u200emark", "rtlmark"),
        ("tab\tnew\nline\rcr\x0bvt", "tab new line cr vt"),
        (f"می{ZWNJ}خواهم", f"می{ZWNJ}خواهم"),  # Persian: ZWNJ is part of the spelling
        (f"क्{ZWJ}ष", f"क्{ZWJ}ष"),  # Devanagari: ZWJ picks the half form
        ("ＡＢＣ１２３ ﬁ", "ABC123 fi"),  # NFKC folds full-width forms and ligatures
        ("e\u0301", "\u00e9"),  # composed
        ("", ""),
    ],
)
def test_clean_text_defaults(raw, expected):
    assert clean_text(raw) == expected


def test_clean_text_options():
    assert clean_text("ＡＢ e\u0301", normalization="NFC") == "ＡＢ \u00e9"
    assert clean_text("e\u0301", normalization=None) == "e\u0301"
    assert clean_text("<b>x</b> &amp;", strip_html=False) == "<b>x</b> &amp;"
    assert clean_text("a\u200bb\tc", strip_control=False) == "a\u200bb c"  # whitespace still collapsed
    with pytest.raises(ValueError, match="normalization"):
        clean_text("x", normalization="NFD")


def test_control_removed_before_normalisation_so_composition_is_not_blocked():
    assert clean_text("e\u00ad\u0301") == "\u00e9"


def make(texts_by_lang: list[tuple[str, str]]) -> Dataset:
    return Dataset.from_dict(
        {
            "sample_id": list(range(len(texts_by_lang))),
            "text": [t for t, _ in texts_by_lang],
            "label": [i % 3 for i in range(len(texts_by_lang))],
            "language": [lang for _, lang in texts_by_lang],
        },
        features=CANONICAL_FEATURES,
    )


def test_clean_dataset_counts_per_reason_and_language():
    ds = make(
        [
            ("Hello  world", "en"),  # 0 kept as "Hello world"
            ("<b></b>", "en"),  # 1 empty after cleaning
            ("hi", "en"),  # 2 too short (min 3)
            ("Hello world", "en"),  # 3 duplicate of 0 after whitespace collapse
            ("x" * 12, "en"),  # 4 too long (max 11)
            ("Hello world", "fr"),  # 5 kept: duplicates count within a language only
            ("   ", "fr"),  # 6 empty
            ("Ｈello world", "fr"),  # 7 duplicate of 5 after NFKC
            ("bonjour", "fr"),  # 8 kept
        ]
    )
    out, report = clean_dataset(ds, min_chars=3, max_chars=11)
    assert isinstance(report, CleaningReport)
    assert out.features == CANONICAL_FEATURES
    assert out["sample_id"][:] == [0, 5, 8]  # ids survive as gaps
    assert out["text"][:] == ["Hello world", "Hello world", "bonjour"]
    assert out["label"][:] == [0, 2, 2]
    assert report.to_dict() == {
        "languages": {
            "en": {"rows_in": 5, "rows_out": 1, "dropped": {"empty": 1, "too_short": 1, "too_long": 1, "duplicate": 1, "words_changed": 0}},
            "fr": {"rows_in": 4, "rows_out": 2, "dropped": {"empty": 1, "too_short": 0, "too_long": 0, "duplicate": 1, "words_changed": 0}},
        },
        "total": {"rows_in": 9, "rows_out": 3, "dropped": {"empty": 2, "too_short": 1, "too_long": 1, "duplicate": 2, "words_changed": 0}},
    }


def test_clean_dataset_keeps_duplicates_when_asked_and_on_selected_rows():
    ds = make([("a", "en"), ("a", "en"), ("b", "en")]).select([2, 0, 1])
    out, report = clean_dataset(ds, drop_duplicates=False)
    assert out["sample_id"][:] == [2, 0, 1]
    assert report.languages["en"].rows_out == 3
    out, report = clean_dataset(ds)
    assert out["sample_id"][:] == [2, 0]
    assert report.languages["en"].dropped["duplicate"] == 1


def test_clean_dataset_extra_columns_pass_through_and_validation():
    ds = Dataset.from_dict({"text": [" a ", "b"], "english": ["x", "y"]})
    out, report = clean_dataset(ds)
    assert out[:] == {"text": ["a", "b"], "english": ["x", "y"]}
    assert list(report.languages) == ["und"]
    with pytest.raises(ValueError, match="max_chars"):
        clean_dataset(ds, min_chars=5, max_chars=3)
    with pytest.raises(ValueError, match="'text' column"):
        clean_dataset(Dataset.from_dict({"sentence": ["a"]}))


def test_clean_dataset_everything_dropped():
    out, report = clean_dataset(make([("", "en"), (" ", "en")]))
    assert len(out) == 0 and out.features == CANONICAL_FEATURES
    assert report.total.dropped["empty"] == 2
