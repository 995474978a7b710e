"""Teacher-labelled views (data.augment.translation_swaps): hand-checked halves and splices, the views a
split gains, and where they go (the distilled student's batches) and do not go (fine-tuning, the ablation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from polydistill.actors.feeder import Feeder
from polydistill.cluster.config import ConfigError, load_config
from polydistill.storage.augmentation import AugmentationDataError, halves, splice, translation_swaps
from polydistill.storage.job_data import load_job_split
from polydistill.student.build import materialize_random_teacher

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NO_REDIS = "redis://127.0.0.1:1/0"


@pytest.mark.parametrize("text, expected", [
    ("one two three four five", ("one two three", "four five")),
    ("one two", ("one", "two")),
    ("我们今天去", ("我们今", "天去")),  # no spaces: cut at the middle character
    ("word", ("wo", "rd")),
])
def test_a_text_is_cut_at_its_middle_word_or_character(text, expected):
    assert halves(text) == expected


def test_a_splice_joins_the_first_half_of_one_translation_to_the_second_half_of_another():
    assert splice("the cat sat on the mat", "le chat était sur le tapis") == "the cat sat sur le tapis"
    assert splice("我们今天去", "私たちは今日行く") == "我们今" + "今日行く"
    assert splice("a b", "x") == "a"  # nothing left of the second half


def parallel_rows() -> Dataset:
    return Dataset.from_dict({
        "sample_id": [0, 1, 2, 3, 4],
        "text": ["a b c d", "w x y z", "p q", "r s", "lonely row"],
        "label": [1, 1, 0, 0, 2],
        "language": ["eng", "fra", "eng", "fra", "eng"],
        "index_id": [10, 10, 20, 20, 30],
    })


def test_views_follow_the_rows_unlabelled_with_new_ids_and_their_sentence():
    augmented = translation_swaps(parallel_rows(), views_per_row=0.8, seed=0).with_format(None)
    assert len(augmented) == 5 + 4
    views = {name: augmented[name][5:] for name in augmented.column_names}
    # Starts: the rows whose sentence has a translation (0, 1, 2, 3), in turn; the only other language is drawn.
    assert views["text"] == ["a b y z", "w x c d", "p s", "r q"]
    assert views["label"] == [-1, -1, -1, -1]
    assert views["sample_id"] == [5, 6, 7, 8]
    assert views["language"] == ["eng", "fra", "eng", "fra"]
    assert views["index_id"] == [10, 10, 20, 20]
    assert augmented["text"][:5] == parallel_rows()["text"]  # the rows themselves are untouched


def test_views_are_the_same_in_every_process_and_change_with_the_seed():
    rows = Dataset.from_dict({"sample_id": list(range(6)), "text": [f"s{i} t{i}" for i in range(6)],
                              "label": [0] * 6, "language": ["a", "b", "c"] * 2, "index_id": [1, 1, 1, 2, 2, 2]})
    first = translation_swaps(rows, 2.0, seed=3)["text"]
    assert first == translation_swaps(rows, 2.0, seed=3)["text"]
    assert any(translation_swaps(rows, 2.0, seed=s)["text"] != first for s in range(4, 8))


def test_data_without_translations_is_refused_with_what_to_change():
    with pytest.raises(AugmentationDataError, match="needs an index_id column"):
        translation_swaps(parallel_rows().remove_columns("index_id"), 1.0, 0)
    lonely = parallel_rows().select([0, 2, 4])
    with pytest.raises(AugmentationDataError, match="no sentence in two languages"):
        translation_swaps(lonely, 1.0, 0)


def tiny_job(tmp_path: Path, *overrides: str):
    """tiny.yaml on 30 training rows in each of English and French, with a Redis URL nothing listens on."""
    return load_config(EXAMPLES / "tiny.yaml", [
        f"transport.redis_url={NO_REDIS}", "data.languages=[eng_Latn, fra_Latn]", "data.limit_per_language=30",
        *overrides,
    ], output_dir=str(tmp_path / "out"))


def feeder_and_training_split(config, tmp_path: Path):
    """The job's feeder over a random-weight teacher, and the training split fine-tuning and the ablation read."""
    train = load_job_split(config.data, config.data.train_split)
    teacher_dir = materialize_random_teacher(config.teacher, train.label_names, train.dataset["text"],
                                             tmp_path / "teacher", config.training.seed)
    return Feeder(config, str(teacher_dir), NO_REDIS), train


def tiny(tmp_path: Path, *overrides: str):
    return tiny_job(tmp_path, "data.augment={translation_swaps: 0.5}", *overrides)


def test_the_feeder_sends_the_views_and_the_ablation_split_has_none(tmp_path):
    feeder, train = feeder_and_training_split(tiny(tmp_path), tmp_path)
    assert len(train.dataset) == 60 and (np.asarray(train.dataset["label"]) >= 0).all()
    assert len(feeder.rows) == 90 and (feeder.rows.labels[60:] == -1).all()
    assert feeder.plan().samples_per_epoch == 90
    fed = np.concatenate([feeder.rows.sample_ids[rows] for rows in feeder.epoch_batches(0)])
    assert sorted(fed.tolist()) == sorted(feeder.rows.sample_ids.tolist())  # each row and view once per epoch


def test_views_without_a_soft_label_term_are_refused_with_what_to_change(tmp_path):
    with pytest.raises(ConfigError, match="only the teacher's soft labels teach them: set distill.soft_weight"):
        tiny(tmp_path, "distill.soft_weight=0")
