"""data.balance: the feeder's epochs draw the languages by temperature sampling, and its plan says exactly
how many samples of each language every epoch holds (what the students' accounting checks)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from polydistill.actors.feeder import Feeder
from polydistill.cluster.config import ConfigError, DataConfig, load_config
from polydistill.storage.job_data import load_job_split
from polydistill.student.build import materialize_random_teacher

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NO_REDIS = "redis://127.0.0.1:1/0"  # the feeder connects lazily; nothing here reaches Redis
LABELS = ["sports", "travel"]


def write_languages(root: Path, rows: dict[str, int]) -> Path:
    """A SIB-200 style folder with ``rows[language]`` training rows in each language."""
    for language, n in rows.items():
        (root / language).mkdir(parents=True)
        body = "".join(f"{i}\t{LABELS[i % 2]}\t{language} sentence number {i} of the set\n" for i in range(n))
        (root / language / "train.tsv").write_text("index_id\tcategory\ttext\n" + body, encoding="utf-8")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    return root


def feeder(tmp_path: Path, *overrides: str) -> Feeder:
    data = write_languages(tmp_path / "data", {"big_Latn": 90, "small_Latn": 10})
    config = load_config(EXAMPLES / "tiny.yaml", [
        f"transport.redis_url={NO_REDIS}", f"data.path={data}", "data.languages=null", "data.eval_split=null",
        "training.batch_size=8", "teacher.vocab_size=200", *overrides], output_dir=str(tmp_path / "out"))
    train = load_job_split(config.data, config.data.train_split)
    teacher = materialize_random_teacher(config.teacher, train.label_names, train.dataset["text"], tmp_path / "teacher",
                                         config.training.seed)
    return Feeder(config, str(teacher), NO_REDIS)


def drawn_per_language(feeder: Feeder, epoch: int) -> Counter:
    return Counter(feeder.rows.languages[row] for batch in feeder.epoch_batches(epoch) for row in batch)


def test_a_balanced_epoch_holds_the_planned_samples_of_each_language_hand_computed(tmp_path):
    # n = 90 and 10 at alpha 0.5: 90^0.5 : 10^0.5 = 3 : 1, so 75 and 25 of 100 samples a epoch; the small
    # language's 10 rows each come 2 or 3 times (25 = 2 x 10 + 5), the big one's 75 of 90 rows once.
    balanced = feeder(tmp_path, "data.balance={alpha: 0.5}")
    plan = balanced.plan()
    assert plan.samples_per_language == {"big_Latn": 75, "small_Latn": 25}
    assert (plan.samples_per_epoch, plan.batches_per_epoch) == (100, 13)
    for epoch in range(2):
        assert drawn_per_language(balanced, epoch) == plan.samples_per_language
        batches = balanced.epoch_batches(epoch)
        assert len(batches) == plan.batches_per_epoch
        small = Counter(row for batch in batches for row in batch if balanced.rows.languages[row] == "small_Latn")
        assert sorted(small.values()) == [2] * 5 + [3] * 5
    # The same epoch is planned the same way in any process; the next epoch draws other big rows.
    assert [b.tolist() for b in balanced.epoch_batches(1)] == [b.tolist() for b in balanced.epoch_batches(1)]
    assert {row for b in balanced.epoch_batches(0) for row in b} != {row for b in balanced.epoch_batches(1) for row in b}


def test_samples_per_epoch_sets_the_length_of_a_balanced_epoch(tmp_path):
    # alpha 0: both languages half of 40 samples.
    balanced = feeder(tmp_path, "data.balance={alpha: 0, samples_per_epoch: 40}")
    assert balanced.plan().samples_per_language == {"big_Latn": 20, "small_Latn": 20}
    assert balanced.plan().batches_per_epoch == 5 and drawn_per_language(balanced, 0) == {"big_Latn": 20,
                                                                                           "small_Latn": 20}


def test_without_balance_every_row_is_one_sample_of_every_epoch(tmp_path):
    plain = feeder(tmp_path)
    assert plain.plan().samples_per_language == {"big_Latn": 90, "small_Latn": 10}
    assert sorted(row for batch in plain.epoch_batches(0) for row in batch) == list(range(100))


def test_balance_is_checked_where_it_is_configured(tmp_path):
    assert DataConfig(path="x").balance is None  # off unless asked for
    with pytest.raises(ValidationError, match="alpha"):
        DataConfig(path="x", balance={"alpha": 1.5})
    with pytest.raises(ValidationError, match="alpha"):
        DataConfig(path="x", balance={})
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(EXAMPLES / "tiny.yaml", ["data.balance={alpha: 0.3, temperature: 2}"])
    with pytest.raises(ConfigError, match="knowledge_cache.enabled: false"):  # refused when the config loads
        load_config(EXAMPLES / "tiny.yaml", ["data.balance={alpha: 0.3}", "knowledge_cache.enabled=true"])
