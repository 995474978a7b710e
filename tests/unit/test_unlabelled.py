"""Unlabelled text (data.unlabelled): read from a data file or Tatoeba pair files, appended to the distilled
student's rows with label -1, and kept away from fine-tuning and the ablation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from polydistill.cluster.config import ConfigError, UnlabelledConfig
from polydistill.storage.unlabelled import append_unlabelled, load_unlabelled
from tests.unit.test_augmentation import EXAMPLES, feeder_and_training_split, tiny_job


def test_rows_join_after_the_training_rows_unlabelled_with_no_sentence():
    train = Dataset.from_dict({"sample_id": [0, 4], "text": ["a", "b"], "label": [1, 0], "language": ["eng", "fra"],
                               "index_id": [7, 8]})
    extra = Dataset.from_dict({"text": ["x", "y", "z"], "language": ["deu", "deu", "eng"]})
    joined = append_unlabelled(train, extra).with_format(None)
    assert joined["sample_id"] == [0, 4, 5, 6, 7]
    assert joined["label"] == [1, 0, -1, -1, -1]
    assert joined["text"] == ["a", "b", "x", "y", "z"] and joined["language"][2:] == ["deu", "deu", "eng"]
    assert joined["index_id"] == [7, 8, -1, -1, -1]


def test_a_tsv_file_and_a_tatoeba_folder_both_give_text_and_language(tmp_path):
    file = tmp_path / "text.tsv"
    file.write_text("text\tlang\nguten Tag\tdeu\nbonjour\tfra\n\t fra\n", encoding="utf-8")
    rows = load_unlabelled(UnlabelledConfig(path=str(file), language_column="lang"), "NFKC").with_format(None)
    assert rows["text"] == ["guten Tag", "bonjour"] and rows["language"] == ["deu", "fra"]  # the empty row cleaned
    assert set(rows["label"]) == {-1}
    tatoeba = load_unlabelled(UnlabelledConfig(path=str(EXAMPLES / "data" / "tatoeba"), languages=["fra", "deu"],
                                               limit_per_language=3), "NFKC").with_format(None)
    assert tatoeba["language"] == ["fra"] * 3 + ["deu"] * 3
    french = (EXAMPLES / "data" / "tatoeba" / "tatoeba.fra-eng.fra").read_text(encoding="utf-8").splitlines()[:3]
    assert tatoeba["text"][:3] == [line.strip() for line in french]


def tiny(tmp_path: Path, *overrides: str):
    return tiny_job(tmp_path, "data.unlabelled={path: ./data/tatoeba, languages: [fra, deu], limit_per_language: 5}",
                    *overrides)


def test_the_feeder_sends_the_text_and_the_ablation_split_has_none(tmp_path):
    config = tiny(tmp_path)
    assert Path(config.data.unlabelled.path).is_absolute()  # ./ is relative to the config file
    feeder, train = feeder_and_training_split(config, tmp_path)
    assert len(train.dataset) == 60 and (np.asarray(train.dataset["label"]) >= 0).all()
    assert len(feeder.rows) == 70 and (feeder.rows.labels[60:] == -1).all()
    assert feeder.plan().samples_per_language == {"eng_Latn": 30, "fra_Latn": 30, "fra": 5, "deu": 5}


def test_unlabelled_text_without_a_soft_label_term_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="only the teacher's soft labels teach it"):
        tiny(tmp_path, "distill.soft_weight=0")
