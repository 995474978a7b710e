"""The fine-tuned teacher's cache key: settings and the content of the rows, never their path; and a
fine-tuning run that records its dev curve and is reused by the next job with the same recipe."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from polydistill.cluster.config import JobConfig, TeacherConfig
from polydistill.storage.job_data import load_job_split
from polydistill.storage.teacher_splits import teacher_splits
from polydistill.student import finetune
from polydistill.student.build import materialize_random_teacher
from polydistill.student.finetune import ensure_finetuned_teacher, finetune_recipe, recipe_digest

LABELS = ["science", "sports", "travel"]
SPLITS = {"train": 12, "dev": 3, "test": 3}  # rows per label


def write_data(root: Path, splits=SPLITS) -> Path:
    for language in ("aaa_Latn", "bbb_Latn"):
        (root / language).mkdir(parents=True)
        for split, per_label in splits.items():
            lines = [f"{i}\t{label}\t{split} {language} {label} word{i} other{i % 3}"
                     for label in LABELS for i in range(per_label)]
            (root / language / f"{split}.tsv").write_text("index_id\tcategory\ttext\n" + "\n".join(lines) + "\n",
                                                          encoding="utf-8")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    return root


def job(data_path: Path, *, teacher: dict | None = None, **data) -> JobConfig:
    return JobConfig.model_validate({
        "teacher": {"model": "unused", "finetune_epochs": 2, **(teacher or {})},
        "data": {"path": str(data_path), **data},
        "training": {"batch_size": 8},
    })


def tiny_teacher(train, folder: Path, encoder_only: bool = False) -> Path:
    """A small random BERT with a tokenizer trained on the rows: a stand-in for a pretrained checkpoint
    (``encoder_only``: without a classification head, as pretrained encoders come)."""
    tiny = TeacherConfig(model="random", vocab_size=100, config={
        "model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 32})
    materialize_random_teacher(tiny, train.label_names, train.dataset["text"], folder, seed=0)
    if encoder_only:
        from transformers import AutoModel, AutoTokenizer

        encoder = folder.with_name(folder.name + "-encoder")
        AutoModel.from_pretrained(folder).save_pretrained(encoder)
        AutoTokenizer.from_pretrained(folder).save_pretrained(encoder)
        return encoder
    return folder


def key(config: JobConfig, source: str = "some/teacher") -> str:
    train = load_job_split(config.data, config.data.train_split)
    return recipe_digest(finetune_recipe(config, source, teacher_splits(config.data, train)))


@pytest.fixture
def data(tmp_path) -> Path:
    return write_data(tmp_path / "one")


def test_the_same_rows_at_two_paths_share_a_key(data, tmp_path):
    copy = shutil.copytree(data, tmp_path / "elsewhere" / "two")
    assert key(job(data)) == key(job(copy))


def test_a_changed_row_changes_the_key(data, tmp_path):
    copy = shutil.copytree(data, tmp_path / "two")
    train = copy / "bbb_Latn" / "train.tsv"
    train.write_text(train.read_text(encoding="utf-8").replace("word5 ", "changed "), encoding="utf-8")
    assert key(job(data)) != key(job(copy))
    dev = copy / "bbb_Latn" / "dev.tsv"
    shutil.copy(data / "bbb_Latn" / "train.tsv", train)
    dev.write_text(dev.read_text(encoding="utf-8").replace("word1 ", "changed "), encoding="utf-8")
    assert key(job(data)) != key(job(copy))  # the rows fine-tuning chooses its checkpoint on count too


def test_settings_that_leave_the_rows_alone_leave_the_key_alone(data):
    base = key(job(data))
    # The data has its own dev split, so the carving settings pick no row; the test split is never read.
    assert key(job(data, dev_seed=7, dev_fraction=0.3, eval_split="other")) == base
    assert key(job(data, max_length=64)) != base
    assert key(job(data, languages=["aaa_Latn"])) != base
    assert key(job(data), source="another/teacher") != base
    for setting in ({"finetune_epochs": 3}, {"finetune_lr": 1e-4}, {"finetune_eval_every": 0.5},
                    {"finetune_patience": 5}, {"finetune_schedule": "constant"}):
        assert key(job(data, teacher=setting)) != base, setting


def test_a_carved_dev_split_keys_by_the_rows_it_carves(tmp_path):
    data = write_data(tmp_path / "no-dev", {"train": 12, "test": 3})
    base = key(job(data))  # no dev.tsv: rows carved from train, for the teacher only
    assert key(job(data, dev_seed=1)) != base
    assert key(job(data, dev_fraction=0.3)) != base
    assert key(job(data, dev_from_train=True)) == base  # the same carve, asked for explicitly


def test_fine_tuning_records_its_dev_curve_and_a_second_run_reuses_it(data, tmp_path, monkeypatch):
    config = job(data, teacher={"finetune_epochs": 3, "finetune_eval_every": 0.5, "finetune_patience": 2,
                                "finetune_lr": 1e-3}, max_length=16)
    train = load_job_split(config.data, config.data.train_split)
    source = tiny_teacher(train, tmp_path / "pretrained")
    splits = teacher_splits(config.data, train)
    teacher_dir, record = ensure_finetuned_teacher(config, str(source), splits, tmp_path / "cache", show_progress=False)
    # 72 training rows, batch 8: 9 steps an epoch, scored every round(4.5) = 4 steps and at step 27, the last.
    steps = [point["step"] for point in record["curve"]]
    assert steps[0] == 4 and all(b - a == 4 for a, b in zip(steps, steps[1:-1])) and steps[-1] <= 27
    assert record["max_steps"] == 27 and record["eval_every_steps"] == 4 and not record["reused"]
    best = max(record["curve"], key=lambda point: point["accuracy"])
    assert record["dev_accuracy"] == best["accuracy"]
    assert record["chosen_step"] == min(p["step"] for p in record["curve"] if p["accuracy"] == best["accuracy"])
    assert set(record["curve"][0]["per_language"]) == {"aaa_Latn", "bbb_Latn"}
    assert record["stopped_early"] == (steps[-1] < 27)
    assert (teacher_dir / "config.json").exists() and teacher_dir.parent == tmp_path / "cache"

    def must_not_train(*args, **kwargs):
        raise AssertionError("the cached teacher should have been reused")

    monkeypatch.setattr(finetune, "finetune_teacher", must_not_train)
    again, reused = ensure_finetuned_teacher(config, str(source), splits, tmp_path / "cache", show_progress=False)
    assert again == teacher_dir and reused == {**record, "reused": True}


def test_the_fine_tuned_weights_are_the_recipes_whatever_ran_before_in_the_process(data, tmp_path):
    import torch
    from safetensors.torch import load_file

    config = job(data, teacher={"finetune_epochs": 1, "finetune_lr": 1e-3}, max_length=16)
    splits = teacher_splits(config.data, load_job_split(config.data, config.data.train_split))
    source = tiny_teacher(splits.train, tmp_path / "pretrained", encoder_only=True)  # a new head is drawn
    for run, draws in (("first", 0), ("second", 1000)):
        torch.rand(draws)  # another caller's use of torch's generator before fine-tuning
        finetune.finetune_teacher(config, str(source), splits, tmp_path / run, show_progress=False)
    first, second = (load_file(tmp_path / run / "model.safetensors") for run in ("first", "second"))
    assert all(torch.equal(first[name], second[name]) for name in first)
