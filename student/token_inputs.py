"""Which token ids a student reads in training: the teacher's, or its own tokenizer's of the same text.

A student must train on exactly the ids it reads in use. Evaluation, the hard-label ablation and a
user of the saved student read each text through the student's own saved tokenizer, and that
tokenizer differs from the teacher's in two cases:
- ``student.tokenizer`` gives the student a tokenizer of its own;
- ``student.trim_vocabulary`` keeps only the pieces of the training text: the trimmed tokenizer
  segments a word whose pieces were dropped into pieces it kept, where the teacher's ids mapped
  through the trimmed vocabulary's id map would give ``<unk>`` (on SIB-200 with vocab_min_count 2,
  63 % of the training rows differ and the student saw 22k ``<unk>`` against the ablation's 1.8k).

A student that learns sentence-level knowledge then reads the feeder's ``student_input_ids``: the
same text through the tokenizer saved with the student. Token-level knowledge (a tagger's per-token
soft labels, hidden states, attention maps) is tied to the teacher's token positions, so such a
student keeps reading the teacher's ids, through the id map when its vocabulary is trimmed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from polydistill.cluster.config import JobConfig
from polydistill.storage import wire
from polydistill.storage.model_sources import resolve_model_source
from polydistill.student.contract import ContractError

# The folder a student's initial weights and tokenizer are saved in, under its own folder.
STUDENT_INIT_FOLDER = "student_init"


def reads_own_token_ids(config: JobConfig) -> bool:
    """Whether the student (``config.student``) reads the work batch's ``student_input_ids``."""
    if config.student.tokenizer is not None:  # the config allows it for sentence-level knowledge only
        return True
    token_level = config.distill.hidden_weight > 0 or config.distill.attention_weight > 0
    return config.student.trim_vocabulary and config.task == "sequence-classification" and not token_level


def student_tokenizer_source(config: JobConfig) -> str | None:
    """The tokenizer the feeder reads the student's ids with; None when the student reads the teacher's.

    A trimmed vocabulary is the main student's, saved in ``<output_dir>/student_init`` by the driver
    before the feeder starts (cluster/prepare.py ``prepare_student``)."""
    if not reads_own_token_ids(config):
        return None
    if config.student.tokenizer is not None:
        return resolve_model_source(config.student.tokenizer)
    folder = Path(config.output_dir).resolve() / STUDENT_INIT_FOLDER
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"the student's trimmed tokenizer is not in {folder}: the driver saves it there (prepare_student) "
            "before the feeder starts; run the job with `polydistill run`, or prepare the student first")
    return str(folder)


def check_students_read_alike(config: JobConfig) -> None:
    """Work batches carry one tokenization for the students: every student that reads its own ids must
    read the main student's (the same tokenizer, or a vocabulary trimmed alike)."""
    def token_source(seen_as: JobConfig) -> tuple:
        student = seen_as.student
        return (student.tokenizer, student.trim_vocabulary, student.vocab_min_count)

    main = token_source(config) if reads_own_token_ids(config) else None
    for name in config.student_names[1:]:
        seen_as = config.for_student(name)
        if reads_own_token_ids(seen_as) and token_source(seen_as) != main:
            raise ValueError(
                f"extra student {name!r} reads its own token ids (tokenizer {seen_as.student.tokenizer}, "
                f"trim_vocabulary {seen_as.student.trim_vocabulary}, vocab_min_count {seen_as.student.vocab_min_count}), "
                "but the work batches carry the main student's: give it the main student's tokenizer, "
                "trim_vocabulary and vocab_min_count, or train it in a job of its own")


def student_inputs(work: wire.WorkBatch, config: JobConfig) -> tuple[np.ndarray, np.ndarray]:
    """The (token ids, attention mask) of the batch that the student of ``config`` reads."""
    if not reads_own_token_ids(config):
        return work.input_ids, work.attention_mask
    if work.student_input_ids is None:
        raise ContractError(
            f"batch {work.batch_id} of epoch {work.epoch} carries no student_input_ids, which this student reads "
            "(student.tokenizer or student.trim_vocabulary): do the feeder and the student run the same job config?")
    return work.student_input_ids, work.student_attention_mask
