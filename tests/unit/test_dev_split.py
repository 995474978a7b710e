"""The dev split settings are chosen on: the data's own, or rows carved from the training split with a
fixed seed, stratified by language and label, which the training split then loads without."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset

from polydistill.cluster.config import ConfigError, DataConfig, load_config
from polydistill.storage.datasets import has_split
from polydistill.storage.job_data import carve_dev_rows, has_own_split, load_job_split

LABELS = ["science", "sports", "travel"]
# Rows per label in each language's train.tsv: uneven, and one label of one language has a single row.
TRAIN_ROWS = {"aaa_Latn": {"science": 20, "sports": 10, "travel": 5}, "bbb_Latn": {"science": 12, "sports": 2,
                                                                                  "travel": 1}}
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write_split(root: Path, language: str, split: str, counts: dict[str, int], text: str = "row") -> None:
    (root / language).mkdir(parents=True, exist_ok=True)
    lines = [f"{i}\t{label}\t{text} {language} {label} {i}" for label, n in counts.items() for i in range(n)]
    (root / language / f"{split}.tsv").write_text("index_id\tcategory\ttext\n" + "\n".join(lines) + "\n",
                                                  encoding="utf-8")


@pytest.fixture
def sib_without_dev(tmp_path) -> Path:
    for language, counts in TRAIN_ROWS.items():
        write_split(tmp_path, language, "train", counts)
        write_split(tmp_path, language, "test", {label: 2 for label in LABELS})
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    return tmp_path


def carved(path: Path, **settings) -> DataConfig:
    return DataConfig(path=str(path), dev_from_train=True, **settings)


def groups(split) -> Counter:
    columns = split.dataset.with_format(None)
    return Counter(zip(columns["language"][:], (split.label_names[i] for i in columns["label"][:])))


def ids(split) -> list[int]:
    return split.dataset.with_format(None)["sample_id"][:]


def test_carve_is_the_same_for_the_same_seed_and_covers_every_language_and_label(sib_without_dev):
    data = carved(sib_without_dev)
    dev = load_job_split(data, "dev")
    assert ids(load_job_split(data, "dev")) == ids(dev)
    assert ids(load_job_split(carved(sib_without_dev, dev_seed=1), "dev")) != ids(dev)
    # 10% of each (language, label) group, at least one row; a single row stays in training.
    assert groups(dev) == {("aaa_Latn", "science"): 2, ("aaa_Latn", "sports"): 1, ("aaa_Latn", "travel"): 1,
                           ("bbb_Latn", "science"): 1, ("bbb_Latn", "sports"): 1}
    assert groups(load_job_split(carved(sib_without_dev, dev_fraction=0.5), "dev"))[("aaa_Latn", "science")] == 10


def test_carved_rows_are_taken_out_of_training_and_nothing_else_is(sib_without_dev):
    data = carved(sib_without_dev)
    dev, train = load_job_split(data, "dev"), load_job_split(data, "train")
    whole = load_job_split(DataConfig(path=str(sib_without_dev)), "train")
    assert not set(ids(dev)) & set(ids(train))
    assert sorted(ids(dev) + ids(train)) == ids(whole)
    assert dev.label_names == train.label_names == LABELS
    assert ids(load_job_split(data, "test")) == ids(load_job_split(DataConfig(path=str(sib_without_dev)), "test"))


def test_carve_rows_of_a_dataset_by_hand():
    dataset = Dataset.from_dict({"sample_id": list(range(23)), "language": ["x"] * 20 + ["y"] * 3,
                                 "label": [0] * 10 + [1] * 10 + [-1] * 3, "text": [""] * 23})
    rows = carve_dev_rows(dataset, fraction=0.2, seed=7)
    assert list(rows) == sorted(rows) and len(set(rows)) == len(rows)
    assert Counter((dataset[int(i)]["language"], dataset[int(i)]["label"]) for i in rows) == {
        ("x", 0): 2, ("x", 1): 2, ("y", -1): 1}  # unlabelled rows: stratified by language alone
    assert list(carve_dev_rows(dataset, fraction=0.2, seed=7)) == list(rows)
    with pytest.raises(ValueError, match="data.dev_fraction"):
        carve_dev_rows(dataset, fraction=1.0, seed=7)


def test_the_data_s_own_dev_split_is_read_as_it_is(sib_without_dev):
    for language in TRAIN_ROWS:
        write_split(sib_without_dev, language, "dev", {"sports": 3}, text="dev")
    data = DataConfig(path=str(sib_without_dev))
    assert has_own_split(data, "dev")
    dev = load_job_split(data, "dev")
    assert set(dev.dataset.with_format(None)["text"][:]) == {f"dev {lang} sports {i}" for lang in TRAIN_ROWS
                                                             for i in range(3)}


def test_has_split_in_each_layout(sib_without_dev, tmp_path):
    path = str(sib_without_dev)
    assert has_split(path, "train") and has_split(path, "test") and not has_split(path, "dev")
    write_split(sib_without_dev, "aaa_Latn", "dev", {"sports": 1})
    assert has_split(path, "dev", languages=["aaa_Latn"])
    assert not has_split(path, "dev") and not has_split(path, "dev", languages=["aaa_Latn", "bbb_Latn"])
    files = tmp_path / "files"
    files.mkdir()
    (files / "train.jsonl").write_text('{"text": "a", "category": "sports"}\n', encoding="utf-8")
    assert has_split(str(files), "train") and not has_split(str(files), "dev")
    assert not has_split(str(files / "train.jsonl"), "dev")  # a single file has no named splits
    assert not has_own_split(load_config(EXAMPLES / "tiny_embedding.yaml").data, "dev")  # parallel data: carved


def test_carving_the_training_split_into_itself_is_refused():
    with pytest.raises(ConfigError, match="dev_split"):
        load_config(EXAMPLES / "tiny.yaml", ["data.dev_from_train=true", "data.dev_split=train"])
    with pytest.raises(ConfigError, match="data.dev_fraction"):
        load_config(EXAMPLES / "tiny.yaml", ["data.dev_fraction=0.9"])
