"""Several teachers in one job (``extra_teachers``): each one prepared, and all of them checked
before any actor starts: one set of classes, one tokenizer, every language routed to a teacher.

At run time the teachers stand in line (``JobKeys.stage_streams``): each pool reads the stream the
one before it writes and adds its soft labels for the rows of its languages (``wire.TeacherVote``);
the student distils towards their weighted mixture (``student.losses.ensemble_log_probs``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from polydistill.cluster.config import JobConfig
from polydistill.cluster.prepare import prepare_teacher
from polydistill.storage.job_data import JobSplit
from polydistill.student.build import check_classifier_labels
from polydistill.student.contract import ContractError
from polydistill.student.devices import CPU


def reading_main_ids(seen_as: JobConfig, main_teacher_dir: Path, seed_offset: int) -> JobConfig:
    """A job as one more teacher sees it, adjusted so that teacher reads the main teacher's token ids:
    a random-weight teacher without a tokenizer of its own takes the main one's (and its own seed)."""
    if seen_as.teacher.model != "random" or seen_as.teacher.tokenizer is not None:
        return seen_as
    return seen_as.model_copy(update={
        "teacher": seen_as.teacher.model_copy(update={"tokenizer": str(main_teacher_dir)}),
        "training": seen_as.training.model_copy(update={"seed": seen_as.training.seed + seed_offset})})


def same_tokenizer(teacher_dir: Path, main_vocab: dict[str, int]) -> bool:
    return AutoTokenizer.from_pretrained(teacher_dir).get_vocab() == main_vocab


def prepare_teachers(config: JobConfig, out_dir: Path, train: JobSplit, show_progress: bool = True,
                     device: torch.device = CPU) -> dict[str, Path]:
    """Every teacher's directory, the main teacher first, fine-tuned and checked on ``device``. An extra
    teacher routed to some languages is fine-tuned (when asked) on those languages only: a specialist."""
    dirs = {"teacher": prepare_teacher(config, out_dir, train, show_progress, device)}
    for index, extra in enumerate(config.extra_teachers):
        seen_as = config.for_teacher(extra.name)
        if extra.languages is not None:
            wanted = set(extra.languages)
            seen_as = seen_as.model_copy(update={"data": config.data.model_copy(update={"languages": extra.languages})})
            train_for = dataclasses.replace(train, dataset=train.dataset.filter(lambda row: row["language"] in wanted))
        else:
            train_for = train
        seen_as = reading_main_ids(seen_as, dirs["teacher"], index + 1)
        dirs[extra.name] = prepare_teacher(seen_as, out_dir / "teachers" / extra.name, train_for, show_progress,
                                           device)
    return dirs


def check_teachers(config: JobConfig, teacher_dirs: dict[str, Path], train: JobSplit) -> None:
    """Several teachers: the same classes and tokenizer as the main teacher, and every language of the
    data routed to at least one of them; refused before any actor starts, naming the field."""
    if not config.extra_teachers:
        return
    main = AutoConfig.from_pretrained(teacher_dirs["teacher"])
    main_vocab = AutoTokenizer.from_pretrained(teacher_dirs["teacher"]).get_vocab()
    for index, extra in enumerate(config.extra_teachers):
        where = f"extra_teachers[{index}] ({extra.name})"
        other = AutoConfig.from_pretrained(teacher_dirs[extra.name])
        labels = [main.id2label[i] for i in range(main.num_labels)]
        check_classifier_labels(other, labels, f"{where}.model")
        if not same_tokenizer(teacher_dirs[extra.name], main_vocab):
            raise ContractError(
                f"{where}.tokenizer differs from the main teacher's: every teacher reads the same token ids of a "
                "batch, so all teachers need one tokenizer (teacher.tokenizer / extra_teachers[].tokenizer)")
    languages = set(train.dataset.with_format(None)["language"])
    for name in config.teacher_names:
        listed = config.teacher_section(name).languages
        field_name = "teacher.languages" if name == "teacher" else             f"extra_teachers[{config.teacher_names.index(name) - 1}].languages"
        unknown = sorted(set(listed or ()) - languages)
        if unknown:
            raise ContractError(f"{field_name} lists {unknown}, which the training data does not have "
                                f"(it has {sorted(languages)})")
    orphans = sorted(language for language in languages
                     if not any(config.teacher_stage(name).serves(language) for name in config.teacher_names))
    if orphans:
        raise ContractError(f"no teacher serves {orphans}: add them to teacher.languages or to an extra teacher's "
                            "languages (or leave one teacher's languages null: all of them)")
