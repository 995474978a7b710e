"""storage/code_switch.py on the real Tatoeba files: splicing, tags, splits, determinism, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from polydistill.storage.code_switch import (
    CODE_SWITCH_LANGUAGES,
    OTHER_TAG,
    build_code_switch,
    code_switch_label_names,
    code_switch_samples,
    main,
    read_aligned_pair,
    splice_lines,
    splice_pair,
    split_index,
    tag_words,
)

TATOEBA = Path(__file__).resolve().parents[2] / "examples" / "data" / "tatoeba"
SMALL = ("fra", "ara", "amh")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("codeswitch")
    return out, build_code_switch(TATOEBA, out, seed=3, languages=SMALL)


def test_tags_align_with_words_and_name_the_right_side():
    foreign, english = read_aligned_pair(TATOEBA, "fra")
    for sample in code_switch_samples(TATOEBA, "fra", seed=0):
        assert len(sample.words) == len(sample.tags) >= 2
        assert set(sample.tags) <= {"fra", "eng", OTHER_TAG}
        first, second = (english, foreign) if sample.english_first else (foreign, english)
        first_words, second_words = first[sample.line].split(), second[sample.line].split()
        # Some prefix of the first sentence followed by some suffix of the second, at least one
        # word of each, tagged with the side's language unless the word has no letter.
        words = list(sample.words)
        splits = [
            k
            for k in range(1, len(words))
            if words[:k] == first_words[:k] and words[k:] == second_words[len(second_words) - (len(words) - k) :]
        ]
        assert splits, sample
        first_lang, second_lang = ("eng", "fra") if sample.english_first else ("fra", "eng")
        expected = [tag_words(sample.words[:k], first_lang) + tag_words(sample.words[k:], second_lang) for k in splits]
        assert list(sample.tags) in expected


def test_both_orders_occur_and_the_source_lines_are_all_used():
    samples = code_switch_samples(TATOEBA, "deu", seed=0)
    assert [s.line for s in samples] == list(range(1000))
    orders = {s.english_first for s in samples}
    assert orders == {True, False}
    english_first = sum(s.english_first for s in samples)
    assert 400 < english_first < 600
    # And the tags show it: some samples start with an English word, others end with one.
    assert any(s.tags[0] == "eng" and s.tags[-1] == "deu" for s in samples)
    assert any(s.tags[0] == "deu" and s.tags[-1] == "eng" for s in samples)


def test_words_without_letters_are_tagged_other():
    assert tag_words(["3,000", "meters", "?", "—", "€100", "l'eau", "2:30."], "fra") == [
        OTHER_TAG,
        "fra",
        OTHER_TAG,
        OTHER_TAG,
        OTHER_TAG,
        "fra",
        OTHER_TAG,
    ]
    # Letters with combining marks (Devanagari) and non-Latin scripts count as letters.
    assert tag_words(["है", "ነኝ።", "؟", "।"], "x") == ["x", "x", OTHER_TAG, OTHER_TAG]


def test_splice_pair_keeps_one_word_per_side_and_caps_the_length():
    assert splice_pair(["a"], ["b"], 0.5) == (1, 1)
    assert splice_pair(["a", "b", "c", "d"], ["w", "x", "y", "z"], 0.5) == (2, 2)
    assert splice_pair(["a", "b"], ["x", "y"], 0.01) == (1, 2)
    assert splice_pair(["a", "b"], ["x", "y"], 0.99) == (2, 1)
    long = [str(i) for i in range(100)]
    prefix, suffix = splice_pair(long, long, 0.5, max_words=10)
    assert prefix + suffix == 10 and prefix >= 1 and suffix >= 1


def test_max_words_caps_every_sample():
    samples = splice_lines([" ".join("x" * 60)], [" ".join("y" * 60)], "fra", max_words=48)
    assert len(samples[0].words) == 48


def test_build_is_deterministic_for_a_seed(built, tmp_path):
    out, counts = built
    again = build_code_switch(TATOEBA, tmp_path / "again", seed=3, languages=SMALL)
    assert again == counts
    for name in ("train.jsonl", "test.jsonl", "labels.txt"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    other_seed = build_code_switch(TATOEBA, tmp_path / "other", seed=4, languages=SMALL)
    assert (tmp_path / "other" / "train.jsonl").read_bytes() != (out / "train.jsonl").read_bytes()
    assert other_seed["train"] == counts["train"]


def test_a_language_draws_the_same_samples_whatever_else_is_built(built, tmp_path):
    out, _ = built
    build_code_switch(TATOEBA, tmp_path, seed=3, languages=["ara"])
    for name in ("train.jsonl", "test.jsonl"):
        alone = read_jsonl(tmp_path / name)
        assert alone == [row for row in read_jsonl(out / name) if row["language"] == "ara"]


def test_written_files(built):
    out, counts = built
    assert (out / "labels.txt").read_text(encoding="utf-8").splitlines() == ["amh", "ara", "eng", "fra", "other"]
    train, test = read_jsonl(out / "train.jsonl"), read_jsonl(out / "test.jsonl")
    assert (len(train), len(test)) == (counts["train"], counts["test"])
    # 1000 lines -> 800 / 200; Amharic has 168 lines -> round(134.4) = 134 / 34.
    assert counts["per_language"]["fra"] == {"train": 800, "test": 200, "skipped": 0}
    assert counts["per_language"]["amh"] == {"train": 134, "test": 34, "skipped": 0}
    tags = {"train": {}, "test": {}}
    for name, rows in (("train", train), ("test", test)):
        for row in rows:
            assert set(row) == {"text", "tags", "language"}
            words, row_tags = row["text"].split(" "), row["tags"].split(" ")
            assert len(words) == len(row_tags) and all(words)
            assert set(row_tags) <= {row["language"], "eng", OTHER_TAG}
            for tag in row_tags:
                tags[name][tag] = tags[name].get(tag, 0) + 1
    assert tags["train"] == counts["tags"]["train"] and tags["test"] == counts["tags"]["test"]
    assert counts["tags"]["train"][OTHER_TAG] > 0


def test_train_and_test_never_share_a_source_line(built):
    out, _ = built
    for language in SMALL:
        samples = code_switch_samples(TATOEBA, language, seed=3)
        boundary = split_index(len(read_aligned_pair(TATOEBA, language)[0]), 0.8)
        train_lines = {s.line for s in samples if s.line < boundary}
        test_lines = {s.line for s in samples if s.line >= boundary}
        assert train_lines and test_lines and not train_lines & test_lines
        # The files hold exactly those samples, in that order.
        texts = {
            name: [row["text"] for row in read_jsonl(out / f"{name}.jsonl") if row["language"] == language]
            for name in ("train", "test")
        }
        assert texts["train"] == [" ".join(s.words) for s in samples if s.line < boundary]
        assert texts["test"] == [" ".join(s.words) for s in samples if s.line >= boundary]


def test_label_names_order():
    assert code_switch_label_names() == sorted([*CODE_SWITCH_LANGUAGES, "eng"]) + ["other"]
    assert "cmn" not in CODE_SWITCH_LANGUAGES and "jpn" not in CODE_SWITCH_LANGUAGES


def test_missing_file_is_a_clear_error(tmp_path):
    shutil.copy(TATOEBA / "tatoeba.fra-eng.fra", tmp_path / "tatoeba.fra-eng.fra")
    with pytest.raises(ValueError, match=r"missing bitext file: .*tatoeba\.fra-eng\.eng"):
        build_code_switch(tmp_path, tmp_path / "out", languages=["fra"])
    assert not (tmp_path / "out").exists()


def test_line_count_mismatch_is_a_clear_error(tmp_path):
    (tmp_path / "tatoeba.fra-eng.fra").write_text("Bonjour.\nMerci.\n", encoding="utf-8")
    (tmp_path / "tatoeba.fra-eng.eng").write_text("Hello.\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line-count mismatch: .*fra-eng\.fra has 2 lines, .*fra-eng\.eng has 1"):
        build_code_switch(tmp_path, tmp_path / "out", languages=["fra"])


def test_invalid_utf8_names_the_line(tmp_path):
    (tmp_path / "tatoeba.fra-eng.fra").write_bytes(b"Bonjour.\n\xff\xfe\n")
    (tmp_path / "tatoeba.fra-eng.eng").write_text("Hello.\nThanks.\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"fra-eng\.fra: line 2 is not valid UTF-8"):
        build_code_switch(tmp_path, tmp_path / "out", languages=["fra"])


def test_blank_lines_are_skipped_without_shifting_later_draws(tmp_path):
    foreign = ["Bonjour tout le monde.", "", "Il fait beau aujourd'hui."]
    english = ["Hello everyone.", "Nothing.", "The weather is nice today."]
    with_blank = splice_lines(foreign, english, "fra", seed=1)
    assert [s.line for s in with_blank] == [0, 2]
    filled = splice_lines([foreign[0], "Rien.", foreign[2]], english, "fra", seed=1)
    assert with_blank[1] == filled[2]


def test_command_line_entry_point(tmp_path, capsys):
    for side in ("fra", "eng"):
        name = f"tatoeba.fra-eng.{side}"
        lines = (TATOEBA / name).read_text(encoding="utf-8").splitlines()[:10]
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    # Only fra is present, so a default build (all ten languages) fails on the next one.
    with pytest.raises(ValueError, match="missing bitext file"):
        main([str(tmp_path), str(tmp_path / "all")])
    counts = main([str(tmp_path), str(tmp_path / "out"), "--languages", "fra", "--seed", "2"])
    assert (counts["train"], counts["test"]) == (8, 2)
    assert json.loads(capsys.readouterr().out) == counts
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 8
