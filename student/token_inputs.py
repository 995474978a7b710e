"""Which token ids a student reads in training: the teacher's, or its own tokenizer's of the same text.

A student must train on exactly the ids it reads in use. Evaluation, the hard-label ablation and a
user of the saved student read each text through the student's own saved tokenizer, and that
tokenizer differs from the teacher's in two cases:
- ``student.tokenizer`` gives the student a tokenizer of its own;
- ``student.trim_vocabulary`` keeps only the pieces of the training text: the trimmed tokenizer
  segments a word whose pieces were dropped into pieces it kept, where the teacher's ids mapped
  through the trimmed vocabulary's id map would give ``<unk>`` (on SIB-200 with vocab_min_count 2,
  63 % of the training rows differ and the student saw 22k ``<unk>`` against the ablation's 1.8k).

A student that learns sentence-level knowledge then reads the same text through the tokenizer saved
with it: the feeder adds to every work batch one ``StudentTokens`` per tokenizer that some student of
the job reads (``student_tokens``), named by ``token_source``, so that students of one teacher pass can
each have a vocabulary of their own (a 4-layer student over 57k pieces beside a 2-layer one over 17k).
Token-level knowledge (a tagger's per-token soft labels, hidden states, attention maps) is tied to the
teacher's token positions, so such a student keeps reading the teacher's ids, through the id map when
its vocabulary is trimmed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from polydistill.cluster.config import MAIN_STUDENT, JobConfig
from polydistill.storage import wire
from polydistill.storage.model_sources import resolve_model_source
from polydistill.student.contract import ContractError

# The folder a student's initial weights and tokenizer are saved in, under its own folder.
STUDENT_INIT_FOLDER = "student_init"


def student_dir(out_dir: Path, name: str) -> Path:
    """Where a student's files live: the main student at the top, extra students under students/."""
    return out_dir if name == MAIN_STUDENT else out_dir / "students" / name


def reads_own_token_ids(config: JobConfig) -> bool:
    """Whether the student (``config.student``) reads its own tokenizer's ids rather than the teacher's."""
    if config.student.tokenizer is not None:  # the config allows it for sentence-level knowledge only
        return True
    token_level = config.distill.hidden_weight > 0 or config.distill.attention_weight > 0
    return config.student.trim_vocabulary and config.task == "sequence-classification" and not token_level


def token_source(config: JobConfig) -> str | None:
    """The name of the tokenizer whose ids the student of ``config`` reads; None for the teacher's.

    Students whose settings give the same tokenizer share one tokenization of each batch: a vocabulary
    trimmed from the same training text with the same ``vocab_min_count`` is the same vocabulary."""
    if not reads_own_token_ids(config):
        return None
    student = config.student
    base = student.tokenizer or "teacher"
    return f"{base} trimmed to pieces used {student.vocab_min_count}+ times" if student.trim_vocabulary else base


def student_tokenizer_sources(config: JobConfig) -> dict[str, str]:
    """Each tokenizer the job's students read instead of the teacher's: its ``token_source`` name and
    where to load it from, in the order of ``config.student_names``.

    A trimmed vocabulary is loaded from the ``student_init`` folder of the first student that asks for it,
    which the driver saves before the feeder starts (cluster/prepare.py ``prepare_student``)."""
    out_dir = Path(config.output_dir).resolve()
    sources: dict[str, str] = {}
    for name in config.student_names:
        seen_as = config.for_student(name)
        source = token_source(seen_as)
        if source is None or source in sources:
            continue
        if not seen_as.student.trim_vocabulary:
            sources[source] = resolve_model_source(seen_as.student.tokenizer)
            continue
        folder = student_dir(out_dir, name) / STUDENT_INIT_FOLDER
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"student {name!r}'s trimmed tokenizer is not in {folder}: the driver saves it there "
                "(prepare_student) before the feeder starts; run the job with `polydistill run`, or prepare the "
                "student first")
        sources[source] = str(folder)
    return sources


def tokens_for(work: wire.WorkBatch, source: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The (token ids, attention mask) of the batch in the tokenizer ``source`` names (None: the teacher's)."""
    if source is None:
        return work.input_ids, work.attention_mask
    for tokens in work.student_tokens:
        if tokens.source == source:
            return tokens.input_ids, tokens.attention_mask
    if not work.student_tokens and work.student_input_ids is not None:
        # Written before batches named their tokenizations: the one the job's students all read.
        return work.student_input_ids, work.student_attention_mask
    carried = ", ".join(tokens.source for tokens in work.student_tokens) or "only the teacher's"
    raise ContractError(
        f"batch {work.batch_id} of epoch {work.epoch} carries no ids of the student's tokenizer ({source}; it "
        f"carries {carried}): do the feeder and the student run the same job config?")


def student_inputs(work: wire.WorkBatch, config: JobConfig) -> tuple[np.ndarray, np.ndarray]:
    """The (token ids, attention mask) of the batch that the student of ``config`` reads."""
    return tokens_for(work, token_source(config))
