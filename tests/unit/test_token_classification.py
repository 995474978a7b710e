"""Token classification from data to loss: word tags read and checked, aligned to each word's first
sub-token by a real fast tokenizer, and the per-token loss terms against direct computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from polydistill.cluster.config import ConfigError, validate_config
from polydistill.storage.cleaning import clean_dataset
from polydistill.storage.datasets import DataSourceError, load_split
from polydistill.storage.job_data import pad_labels, tokenize_split
from polydistill.storage.vocab import train_wordpiece_tokenizer
from polydistill.storage.wire import Knowledge, SoftLabels, WorkBatch
from polydistill.student.objectives import distillation_losses, student_labels

ROWS = [
    {"text": "Le chat dort here now", "tags": "fra fra fra eng eng", "language": "fra"},
    {"text": "I see das Haus 42", "tags": "eng eng deu deu other", "language": "deu"},
]
NAMES = ["deu", "eng", "fra", "other"]


def write_tagged(folder: Path, rows=ROWS, names=NAMES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "labels.txt").write_text("\n".join(names) + "\n")
    return folder


def test_word_tags_load_as_ids_in_label_file_order(tmp_path):
    loaded = load_split(str(write_tagged(tmp_path / "d")), "train", text_column="text", label_column="tags",
                        language_column="language", word_tags=True)
    assert loaded.label_names == NAMES
    assert loaded.dataset["tags"] == [[2, 2, 2, 1, 1], [1, 1, 0, 0, 3]]
    assert loaded.dataset["label"] == [-1, -1]


@pytest.mark.parametrize("row, message", [
    ({"text": "one two three", "tags": "eng eng", "language": "eng"}, r"row 1: 3 words but 2 tags"),
    ({"text": "one two", "tags": "eng xyz", "language": "eng"}, r"row 1: tags \['xyz'\] are not among"),
])
def test_bad_word_tags_name_the_row(tmp_path, row, message):
    folder = write_tagged(tmp_path / "d", rows=[row])
    with pytest.raises(DataSourceError, match=message):
        load_split(str(folder), "train", label_column="tags", language_column="language", word_tags=True)


def test_cleaning_drops_a_row_whose_words_it_changed():
    dataset = Dataset.from_dict({"sample_id": [0, 1], "text": ["a <b>bold</b>word", "plain words"],
                                 "label": [-1, -1], "language": ["x", "x"], "tags": [[0, 0, 0], [0, 0]]})
    cleaned, report = clean_dataset(dataset)
    assert cleaned["text"] == ["plain words"]
    assert report.languages["x"].dropped["words_changed"] == 1


def test_tags_land_on_each_words_first_sub_token(tmp_path):
    tokenizer = train_wordpiece_tokenizer(["le chat dort", "i see das haus"] * 5, 120, tmp_path / "tok")
    loaded = load_split(str(write_tagged(tmp_path / "d")), "train", label_column="tags",
                        language_column="language", word_tags=True)
    rows = tokenize_split(loaded.dataset, tokenizer, max_length=32)
    for i, row in enumerate(ROWS):
        words = row["text"].split()
        word_ids = rows.word_ids[i]
        assert word_ids[0] == -1 and word_ids[-1] == -1  # [CLS] ... [SEP]
        assert sorted(set(word_ids[word_ids >= 0].tolist())) == list(range(len(words)))
        labelled = np.flatnonzero(rows.token_labels[i] != -100)
        # one label per word, at the first token of that word, with that word's tag id
        assert word_ids[labelled].tolist() == list(range(len(words)))
        assert rows.token_labels[i][labelled].tolist() == loaded.dataset["tags"][i]
        assert all(word_ids[p - 1] != word_ids[p] for p in labelled)
    # Truncation keeps the alignment of the words that remain.
    short = tokenize_split(loaded.dataset, tokenizer, max_length=4)
    assert set(short.word_ids[0][short.word_ids[0] >= 0].tolist()) <= {0, 1, 2}
    np.testing.assert_array_equal(pad_labels([np.array([1, 2]), np.array([3])]), [[1, 2], [3, -100]])


def _tagging_config(**distill):
    return validate_config({
        "task": "token-classification", "teacher": {"model": "random", "config": {"model_type": "bert"}},
        "data": {"path": "/d", "label_column": "tags", "word_tags": True},
        "distill": {"temperature": 2.0, **distill}})


def test_per_token_losses_count_real_tokens_and_labelled_words():
    config = _tagging_config(soft_weight=1.0, hard_weight=1.0)
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((2, 4, 3)).astype(np.float32)
    student = torch.from_numpy(rng.standard_normal((2, 4, 3)).astype(np.float32))
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=np.uint8)
    token_labels = np.array([[-100, 2, -100, 0], [-100, 1, -100, -100]])
    work = WorkBatch(job_id="j", epoch=0, batch_id=0, sample_ids=np.arange(2), languages=("a", "b"),
                     input_ids=np.ones((2, 4), np.int32), attention_mask=mask, token_labels=token_labels)
    knowledge = Knowledge(work=work, teacher_id="t", soft=SoftLabels.full(teacher))
    _, values = distillation_losses(student, knowledge, config)

    t = torch.log_softmax(torch.from_numpy(teacher) / 2, -1)
    s = torch.log_softmax(student / 2, -1)
    kl = (t.exp() * (t - s)).sum(-1)  # [2, 4]
    expected_soft = float(kl[torch.from_numpy(mask.astype(bool))].mean() * 4)
    log_p = torch.log_softmax(student, -1)
    expected_hard = float(-(log_p[0, 1, 2] + log_p[0, 3, 0] + log_p[1, 1, 1]) / 3)
    assert values["soft"] == pytest.approx(expected_soft, rel=1e-5)
    assert values["hard"] == pytest.approx(expected_hard, rel=1e-5)
    assert student_labels(work, config).tolist() == [[-1, 2, -1, 0], [-1, 1, -1, -1]]


@pytest.mark.parametrize("changes, message", [
    ({"data": {"path": "/d", "label_column": "tags"}}, "data.word_tags: true"),
    ({"distill": {"top_k": 2}}, "unset distill.top_k"),
    ({"knowledge_cache": {"enabled": True}}, "unset knowledge_cache.enabled"),
])
def test_token_classification_settings_are_checked(changes, message):
    raw = {"task": "token-classification", "teacher": {"model": "random", "config": {"model_type": "bert"}},
           "data": {"path": "/d", "label_column": "tags", "word_tags": True}, **changes}
    with pytest.raises(ConfigError, match=message):
        validate_config(raw)
