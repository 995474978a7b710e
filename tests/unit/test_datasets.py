"""storage/datasets.py: every file format, the real SIB-200 and Tatoeba folders, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, Value

import polydistill.storage.datasets as sd
from polydistill.storage.datasets import CANONICAL_FEATURES, DataSourceError, load_parallel, load_split

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
SIB = ROOT / "examples" / "data" / "sib200"  # the copy the project ships
TATOEBA = DATA / "tatoeba"
needs_data = pytest.mark.skipif(not SIB.is_dir(), reason=f"SIB-200 not found at {SIB}")
needs_tatoeba = pytest.mark.skipif(not TATOEBA.is_dir(), reason=f"Tatoeba data not found at {TATOEBA}")

LABELS = ["sports", "travel", "health"]


def rows(ds: Dataset) -> list[tuple]:
    d = ds[:]
    return list(zip(d["sample_id"], d["text"], d["label"], d["language"]))


def write_sib(root: Path, langs: dict[str, list[tuple[str, str]]], split: str = "train", labels_txt=True) -> Path:
    for lang, items in langs.items():
        (root / lang).mkdir(parents=True, exist_ok=True)
        body = "".join(f"{i}\t{cat}\t{text}\n" for i, (cat, text) in enumerate(items))
        (root / lang / f"{split}.tsv").write_text("index_id\tcategory\ttext\n" + body, encoding="utf-8")
    if labels_txt:
        (root / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    return root


# ---------------------------------------------------------------------------------------------
# SIB-200 style directories
# ---------------------------------------------------------------------------------------------


def test_sib_directory_rows_labels_and_languages(tmp_path):
    write_sib(
        tmp_path,
        {
            "fra_Latn": [("travel", "Il a dit \"oui\"."), ("sports", "Le match.")],
            "deu_Latn": [("health", "Gesund.")],
        },
    )
    loaded = load_split(str(tmp_path), "train")
    assert loaded.dataset.features == {**CANONICAL_FEATURES, "index_id": Value("int64")}
    assert loaded.label_names == LABELS  # labels.txt order, not sorted
    # Languages in sorted folder order; ids are positions.
    assert rows(loaded.dataset) == [
        (0, "Gesund.", 2, "deu_Latn"),
        (1, 'Il a dit "oui".', 1, "fra_Latn"),
        (2, "Le match.", 0, "fra_Latn"),
    ]
    assert loaded.languages == ["deu_Latn", "fra_Latn"]
    assert "SIB-200" in loaded.source


def test_sib_language_order_does_not_change_ids_and_limit(tmp_path):
    write_sib(tmp_path, {"b": [("travel", "b0"), ("travel", "b1")], "a": [("sports", "a0"), ("health", "a1")]})
    one = load_split(str(tmp_path), "train", languages=["b", "a"], limit_per_language=1)
    two = load_split(str(tmp_path), "train", languages=["a", "b"], limit_per_language=1)
    assert rows(one.dataset) == rows(two.dataset)
    assert [row[3] for row in rows(one.dataset)] == ["a", "b"]


def test_limit_takes_a_sample_across_a_sorted_file_not_its_head(tmp_path):
    # SIB-200's test split is sorted by topic: the first rows would all share one label.
    sorted_rows = [("sports", f"s{i}") for i in range(50)] + [("travel", f"t{i}") for i in range(50)]
    write_sib(tmp_path, {"a": sorted_rows})
    loaded = load_split(str(tmp_path), "train", limit_per_language=20)
    labels = [row[2] for row in rows(loaded.dataset)]
    assert len(labels) == 20 and 0 < labels.count(labels[0]) < 20
    again = load_split(str(tmp_path), "train", limit_per_language=20)
    assert rows(again.dataset) == rows(loaded.dataset)


def test_index_id_is_kept_with_its_row_through_language_selection_and_the_limit(tmp_path):
    # write_sib numbers each language's rows 0, 1, 2...: row i of one language translates row i of the other.
    write_sib(tmp_path, {"b": [("travel", f"b{i}") for i in range(6)], "a": [("travel", f"a{i}") for i in range(6)]})
    loaded = load_split(str(tmp_path), "train", limit_per_language=3).dataset[:]
    assert [(text, index) for text, index in zip(loaded["text"], loaded["index_id"])] == [
        (text, int(text[1:])) for text in loaded["text"]]
    assert len(loaded["text"]) == 6


def test_index_id_that_is_not_an_integer_is_kept_as_text_and_a_file_without_it_has_none(tmp_path):
    (tmp_path / "with.jsonl").write_text('{"text": "a", "index_id": "s-1"}\n{"text": "b", "index_id": 7}\n')
    (tmp_path / "without.jsonl").write_text('{"text": "a"}\n')
    with_ids = load_split(str(tmp_path / "with.jsonl"), "train", label_column=None).dataset
    assert with_ids.features["index_id"] == Value("string") and with_ids["index_id"][:] == ["s-1", "7"]
    assert "index_id" not in load_split(str(tmp_path / "without.jsonl"), "train", label_column=None).dataset.column_names


def test_sib_labels_from_train_split_when_no_labels_txt(tmp_path):
    write_sib(tmp_path, {"x": [("travel", "t"), ("health", "h"), ("sports", "s")]}, labels_txt=False)
    write_sib(tmp_path, {"x": [("sports", "s2")]}, split="dev", labels_txt=False)
    dev = load_split(str(tmp_path), "dev")
    assert dev.label_names == ["health", "sports", "travel"]  # sorted labels of train, not of dev
    assert rows(dev.dataset) == [(0, "s2", 1, "x")]


def test_tsv_fields_in_csv_quoted_form_are_decoded_and_others_kept_literally(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "train.tsv").write_text(
        "index_id\tcategory\ttext\n"
        '1\ttravel\t"""Yes,"" he said."\n'  # CSV-quoted form: decoded
        '2\ttravel\t5" screen, "quoted" word\n'  # stray quotes: literal, and must not eat the next row
        '3\ttravel\t"unclosed quote\n'
        "4\ttravel\tlast row\n",
        encoding="utf-8",
    )
    ds = load_split(str(tmp_path), "train", label_names=LABELS).dataset
    assert ds["text"][:] == ['"Yes," he said.', '5" screen, "quoted" word', '"unclosed quote', "last row"]


def test_tsv_row_with_wrong_field_count_names_file_and_row(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "train.tsv").write_text("index_id\tcategory\ttext\n1\ttravel\ta\tb\n", encoding="utf-8")
    with pytest.raises(DataSourceError, match=r"train\.tsv: data row 1 has 4 fields but the header has 3"):
        load_split(str(tmp_path), "train", label_names=LABELS)


# ---------------------------------------------------------------------------------------------
# Files: tsv / csv / jsonl / json / parquet
# ---------------------------------------------------------------------------------------------

RECORDS = [
    {"sentence": 'She said "hi", then left', "topic": "travel", "lang": "fr"},
    {"sentence": "second", "topic": "sports", "lang": "de"},
    {"sentence": "third", "topic": "travel", "lang": "fr"},
]
EXPECTED_ALL = [
    (0, 'She said "hi", then left', 1, "fr"),
    (1, "second", 0, "de"),
    (2, "third", 1, "fr"),
]


def write_format(path: Path, fmt: str) -> Path:
    if fmt == "tsv":
        path.write_text(
            "sentence\ttopic\tlang\n" + "".join(f"{r['sentence']}\t{r['topic']}\t{r['lang']}\n" for r in RECORDS),
            encoding="utf-8",
        )
    elif fmt == "csv":
        path.write_text(
            'sentence,topic,lang\n"She said ""hi"", then left",travel,fr\nsecond,sports,de\nthird,travel,fr\n',
            encoding="utf-8",
        )
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "\n", encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(RECORDS), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(RECORDS), path)
    return path


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "json", "parquet"])
def test_single_file_each_format(tmp_path, fmt):
    file = write_format(tmp_path / f"data.{fmt}", fmt)
    loaded = load_split(
        str(file),
        "train",
        text_column="sentence",
        label_column="topic",
        language_column="lang",
        label_names=["sports", "travel"],
    )
    assert loaded.dataset.features == CANONICAL_FEATURES
    assert rows(loaded.dataset) == EXPECTED_ALL
    assert loaded.languages == ["fr", "de"]


@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "parquet"])
def test_directory_of_files_picks_split_and_filters_languages(tmp_path, fmt):
    write_format(tmp_path / f"dev.{fmt}", fmt)
    (tmp_path / "train.csv").write_text("sentence,topic,lang\nx,travel,fr\ny,sports,de\n", encoding="utf-8")
    loaded = load_split(
        str(tmp_path), "dev", text_column="sentence", label_column="topic", language_column="lang", languages=["fr"]
    )
    # No labels.txt: names are the sorted labels of the train split, ids are positions after filtering.
    assert loaded.label_names == ["sports", "travel"]
    assert loaded.dataset["sample_id"][:] == [0, 1]
    assert loaded.dataset["text"][:] == ['She said "hi", then left', "third"]


def test_directory_label_names_from_train_file(tmp_path):
    (tmp_path / "train.csv").write_text("text,category\na,travel\nb,sports\nc,health\n", encoding="utf-8")
    (tmp_path / "test.csv").write_text("text,category\nz,sports\n", encoding="utf-8")
    loaded = load_split(str(tmp_path), "test", languages=["fr"])
    assert loaded.label_names == ["health", "sports", "travel"]
    assert rows(loaded.dataset) == [(0, "z", 1, "fr")]  # single language entry names the language


def test_limit_per_language_keeps_first_rows_of_each(tmp_path):
    file = write_format(tmp_path / "d.jsonl", "jsonl")
    ds = load_split(
        str(file), "x", text_column="sentence", label_column="topic", language_column="lang", limit_per_language=1
    ).dataset
    assert rows(ds) == [(0, 'She said "hi", then left', 1, "fr"), (1, "second", 0, "de")]


def test_unlabelled_and_und_language(tmp_path):
    file = tmp_path / "u.jsonl"
    file.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    loaded = load_split(str(file), "train", label_column=None)
    assert rows(loaded.dataset) == [(0, "a", -1, "und"), (1, "b", -1, "und")]
    assert loaded.label_names == []


def test_integer_labels_and_missing_labels(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"text": "a", "label": 2}, {"text": "b", "label": None}]), tmp_path / "t.parquet")
    loaded = load_split(str(tmp_path / "t.parquet"), "train", label_column="label")
    assert loaded.label_names == ["0", "1", "2"]
    assert loaded.dataset["label"][:] == [2, -1]
    # Integer labels index into given names.
    named = load_split(str(tmp_path / "t.parquet"), "train", label_column="label", label_names=["a", "b", "c"])
    assert named.dataset["label"][:] == [2, -1]
    with pytest.raises(DataSourceError, match=r"label 2 .* out of range for 2 label names"):
        load_split(str(tmp_path / "t.parquet"), "train", label_column="label", label_names=["a", "b"])


def test_labels_txt_beside_a_single_file(tmp_path):
    (tmp_path / "labels.txt").write_text("travel\nsports\n", encoding="utf-8")
    file = write_format(tmp_path / "d.csv", "csv")
    loaded = load_split(str(file), "train", text_column="sentence", label_column="topic", language_column="lang")
    assert loaded.label_names == ["travel", "sports"]
    assert loaded.dataset["label"][:] == [0, 1, 0]


# ---------------------------------------------------------------------------------------------
# Errors say what to change
# ---------------------------------------------------------------------------------------------


def test_missing_text_column_names_column_file_columns_and_config_key(tmp_path):
    file = write_format(tmp_path / "d.csv", "csv")
    with pytest.raises(DataSourceError) as err:
        load_split(str(file), "train", label_column="topic")
    msg = str(err.value)
    for part in ("'text'", str(file), "sentence, topic, lang", "data.text_column"):
        assert part in msg


def test_missing_label_column_suggests_label_config_key(tmp_path):
    file = write_format(tmp_path / "d.parquet", "parquet")
    with pytest.raises(DataSourceError, match=r"'category' not found .*sentence, topic, lang.*data\.label_column"):
        load_split(str(file), "train", text_column="sentence")


def test_missing_language_column(tmp_path):
    file = write_format(tmp_path / "d.jsonl", "jsonl")
    with pytest.raises(DataSourceError, match=r"'language'.*data\.language_column"):
        load_split(str(file), "train", text_column="sentence", label_column="topic", language_column="language")


def test_several_languages_without_language_column(tmp_path):
    file = write_format(tmp_path / "d.csv", "csv")
    with pytest.raises(DataSourceError, match=r"data\.language_column"):
        load_split(str(file), "train", text_column="sentence", label_column="topic", languages=["fr", "de"])


def test_unknown_language_lists_present_languages(tmp_path):
    write_sib(tmp_path / "sib", {"fra_Latn": [("travel", "a")], "deu_Latn": [("travel", "b")]})
    with pytest.raises(DataSourceError, match=r"xho_Latn not found .*data\.languages.*deu_Latn, fra_Latn"):
        load_split(str(tmp_path / "sib"), "train", languages=["fra_Latn", "xho_Latn"])
    file = write_format(tmp_path / "d.jsonl", "jsonl")
    with pytest.raises(DataSourceError, match=r"es not found .*languages present: de, fr"):
        load_split(str(file), "t", text_column="sentence", label_column="topic", language_column="lang", languages=["es"])


def test_unknown_label_names_label_file_and_known_labels(tmp_path):
    write_sib(tmp_path, {"fra_Latn": [("travel", "a"), ("cooking", "b")]})
    with pytest.raises(DataSourceError) as err:
        load_split(str(tmp_path), "train")
    msg = str(err.value)
    for part in ("'cooking'", str(tmp_path / "fra_Latn" / "train.tsv"), "sports, travel, health", "labels.txt"):
        assert part in msg


def test_missing_split_and_missing_path(tmp_path):
    write_sib(tmp_path, {"fra_Latn": [("travel", "a")]})
    with pytest.raises(DataSourceError, match=r"validation\.tsv; splits present: train"):
        load_split(str(tmp_path), "validation")
    with pytest.raises(DataSourceError, match=r"does not exist"):
        load_split(str(tmp_path / "nope"), "train")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "train.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    with pytest.raises(DataSourceError, match=r"no file for split 'dev' .*train\.jsonl"):
        load_split(str(tmp_path / "flat"), "dev", label_column=None)


def test_hub_name_goes_to_load_dataset_per_language_config(monkeypatch):
    from datasets import ClassLabel, Features

    calls = []

    def fake_load_dataset(name, config=None, *, split):
        calls.append((name, config, split))
        feats = Features({"text": Value("string"), "category": ClassLabel(names=["a", "b"])})
        return Dataset.from_dict({"text": [f"{config}-1", f"{config}-2"], "category": [1, 0]}, features=feats)

    monkeypatch.setattr(sd.datasets, "load_dataset", fake_load_dataset)
    loaded = load_split("someone/sib", "train", languages=["yo", "ha"], limit_per_language=1)
    assert calls == [("someone/sib", "yo", "train"), ("someone/sib", "ha", "train")]
    assert loaded.label_names == ["a", "b"]
    assert rows(loaded.dataset) == [(0, "yo-1", 1, "yo"), (1, "ha-1", 1, "ha")]


# ---------------------------------------------------------------------------------------------
# The real data
# ---------------------------------------------------------------------------------------------


@needs_data
def test_real_sib200_train_every_row_loads():
    loaded = load_split(str(SIB), "train")
    langs = sorted(p.name for p in SIB.iterdir() if (p / "train.tsv").is_file())
    ds = loaded.dataset
    assert len(ds) == 701 * len(langs)
    assert loaded.label_names == (SIB / "labels.txt").read_text(encoding="utf-8").split()
    assert len(loaded.label_names) == 7
    assert loaded.dataset["sample_id"][:] == list(range(len(ds)))
    per_lang = {}
    for lang in ds["language"]:
        per_lang[lang] = per_lang.get(lang, 0) + 1
    assert per_lang == {lang: 701 for lang in langs}
    labels = ds["label"][:]
    assert min(labels) == 0 and max(labels) == 6
    texts = ds["text"][:]
    # The file stores this sentence CSV-quoted; its quotes come back as in FLORES.
    assert (
        '"She’s very cute and sings quite well, too," he said according to a transcript of the news conference.'
        in texts
    )
    assert sum('"' in t for t in texts) > 500
    assert all(t and "\t" not in t and "\n" not in t for t in texts)


@needs_data
def test_real_sib200_index_id_names_the_same_sentence_in_every_language():
    from polydistill.cluster.config import DataConfig
    from polydistill.storage.job_data import load_job_split

    # Through the job's loading (cleaning included), as the feeder and the evaluation load it.
    split = load_job_split(DataConfig(path=str(SIB), languages=["eng_Latn", "fra_Latn", "zho_Hans"]), "train")
    rows = split.dataset.with_format(None)[:]
    by_language: dict[str, dict[int, tuple[str, int]]] = {}
    for index_id, language, text, label in zip(rows["index_id"], rows["language"], rows["text"], rows["label"]):
        by_language.setdefault(language, {})[index_id] = (text, label)
    assert all(len(sentences) == 701 for sentences in by_language.values())
    assert by_language["eng_Latn"].keys() == by_language["fra_Latn"].keys() == by_language["zho_Hans"].keys()
    # Row 1 of every SIB-200 file (index_id 403): the submarines of the war, in English and in Chinese.
    english, label = by_language["eng_Latn"][403]
    assert english.startswith("In the beginning of the war they mostly travelled on top of the sea")
    assert by_language["zho_Hans"][403][1] == by_language["fra_Latn"][403][1] == label
    assert "潜" in by_language["zho_Hans"][403][0]


@needs_data
def test_real_sib200_dev_test_and_language_subset():
    assert len(load_split(str(SIB), "dev", languages=["eng_Latn"]).dataset) == 99
    test = load_split(str(SIB), "test", languages=["yor_Latn", "eng_Latn"], limit_per_language=10).dataset
    assert test["language"][:] == ["eng_Latn"] * 10 + ["yor_Latn"] * 10


@needs_tatoeba
def test_real_tatoeba_pairs():
    ds = load_parallel(str(TATOEBA), "fra")
    assert len(ds) == 1000
    assert ds.column_names == ["sample_id", "text", "english", "language"]
    assert ds[0] == {
        "sample_id": 0,
        "text": "Au commencement, Dieu créa le ciel et la terre.",
        "english": "In the beginning God created the heaven and the earth.",
        "language": "fra",
    }
    assert len(load_parallel(str(TATOEBA), "jpn", limit=5)) == 5


def test_parallel_line_count_mismatch_and_unknown_language(tmp_path):
    (tmp_path / "tatoeba.fra-eng.fra").write_text("un\ndeux\n", encoding="utf-8")
    (tmp_path / "tatoeba.fra-eng.eng").write_text("one\n", encoding="utf-8")
    with pytest.raises(DataSourceError, match=r"has 2 lines but .* has 1"):
        load_parallel(str(tmp_path), "fra")
    with pytest.raises(DataSourceError, match=r"'deu'.*languages present: fra"):
        load_parallel(str(tmp_path), "deu")


def test_parallel_splits_on_newline_only(tmp_path):
    (tmp_path / "tatoeba.fra-eng.fra").write_text("a\u2028b\nc\n", encoding="utf-8")
    (tmp_path / "tatoeba.fra-eng.eng").write_text("x\ny\n", encoding="utf-8")
    ds = load_parallel(str(tmp_path), "fra")
    assert ds["text"][:] == ["a\u2028b", "c"]


def test_hub_failure_is_reported_as_a_data_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(sd.datasets, "load_dataset", offline)
    with pytest.raises(DataSourceError, match=r"'data/sib' is not a local path.*no network.*data\.path"):
        load_split("data/sib", "train")
