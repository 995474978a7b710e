"""Multi-task jobs (``extra_tasks``): one student encoder, a head per task, a teacher per task.

Before anything starts: every extra task's teacher is prepared (built, fine-tuned or loaded; a Ray task
with the teacher's stage resources, cluster/stages.py) and
must read the main teacher's token ids (the student reads them all through one embedding); the
student's head for each task is made on a copy of the student's initial encoder and saved under
``student_init/tasks/<task>``, so that a restarted student starts every head from the same point.
The student trainer ties every head to the one encoder (``student.trainer``); after training each
head is saved as a model of its own that loads with its task's auto class, and evaluated on its
task's held-out data beside its teacher.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from polydistill.cluster.config import JobConfig
from polydistill.cluster.prepare import prepare_teacher
from polydistill.cluster.teachers import reading_main_ids, same_tokenizer
from polydistill.storage.job_data import JobSplit, load_job_split
from polydistill.student.build import TASKS_FOLDER, label_maps, model_class, task_folder
from polydistill.student.contract import ContractError, check_contract, save_teacher_config
from polydistill.student.devices import CPU


def prepare_task_teachers(config: JobConfig, out_dir: Path, main_teacher_dir: Path, show_progress: bool = True,
                          device: torch.device = CPU) -> dict[str, tuple[Path, JobSplit]]:
    """Each extra task's teacher folder and training split (fine-tuned, where its config asks, on ``device``)."""
    main_vocab = AutoTokenizer.from_pretrained(main_teacher_dir).get_vocab()
    prepared: dict[str, tuple[Path, JobSplit]] = {}
    for index, section in enumerate(config.extra_tasks):
        seen_as = config.for_task(section.name)
        train = load_job_split(seen_as.data, seen_as.data.train_split)
        # The student reads every task's token ids through one embedding.
        seen_as = reading_main_ids(seen_as, main_teacher_dir, index + 1)
        teacher_dir = prepare_teacher(seen_as, out_dir / TASKS_FOLDER / section.name, train, show_progress, device)
        if not same_tokenizer(teacher_dir, main_vocab):
            raise ContractError(
                f"extra_tasks[{index}].teacher ({section.name}) has another tokenizer than the main teacher: the "
                "student reads every task's token ids through one embedding, so every task's teacher needs the main "
                "teacher's tokenizer (extra_tasks[].teacher.tokenizer)")
        prepared[section.name] = (teacher_dir, train)
    return prepared


def prepare_task_heads(config: JobConfig, student_init_dir: Path, task_teachers: dict[str, tuple[Path, JobSplit]]) -> None:
    """Each extra task's student: the student's initial encoder with the task's head (classes from its
    teacher), saved under ``student_init/tasks/<task>``; its contract checked against its teacher."""
    main = model_class(config.task).from_pretrained(student_init_dir)
    encoder_state = main.base_model.state_dict()
    tokenizer = AutoTokenizer.from_pretrained(student_init_dir)
    for index, section in enumerate(config.extra_tasks):
        teacher_config = AutoConfig.from_pretrained(task_teachers[section.name][0])
        head_config = copy.deepcopy(main.config)
        if section.task != "sentence-embedding":
            labels = [teacher_config.id2label[i] for i in range(teacher_config.num_labels)]
            for key, value in label_maps(labels).items():
                setattr(head_config, key, value)
        torch.manual_seed(config.training.seed + 1000 + index)
        head = model_class(section.task).from_config(head_config)
        missing, _ = head.base_model.load_state_dict(encoder_state, strict=False)
        if any("pooler" not in key for key in missing):
            raise ContractError(f"extra_tasks[{index}] ({section.name}): the student's encoder does not fit the "
                                f"{section.task} model built from it (missing {missing[:3]})")
        folder = task_folder(student_init_dir, section.name)
        head.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        save_teacher_config(folder, task_teachers[section.name][0])  # sizes the task's embedding projection
        check_contract(config.for_task(section.name), teacher_config, head.config)


def evaluate_tasks(config: JobConfig, task_teachers: dict[str, tuple[Path, JobSplit]], student_dir: Path,
                   **placement) -> dict:
    """Every extra task's student head and teacher side by side on that task's held-out data; ``placement``:
    the threads and device of the evaluation stage (student/evaluate.py ``evaluate_job``)."""
    from polydistill.student.evaluate import evaluate_job

    results = {}
    for section in config.extra_tasks:
        seen_as = config.for_task(section.name)
        if seen_as.data.eval_split is None:
            continue
        teacher_dir, train = task_teachers[section.name]
        results[section.name] = evaluate_job(seen_as, teacher_dir, task_folder(student_dir, section.name),
                                             train.label_names, **placement)
    return results
