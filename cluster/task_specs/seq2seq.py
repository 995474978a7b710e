"""Sequence-to-sequence's spec: an encoder-decoder translating the English side of parallel data
(data.parallel) into each language, learning the teacher's top-k per target token and/or its beam
output. Its behaviour: student/task_kinds/seq2seq.py."""

from __future__ import annotations

from collections.abc import Mapping

from polydistill.cluster.task_specs.spec import JobSettings, TaskSpec, Tokenizer, decoder_markers, refuse_settings


def check(config: JobSettings) -> None:
    distill, student = config.distill, config.student
    wrong = {
        "distill.pseudo_label_threshold": distill.pseudo_label_threshold is not None,
        "distill.hidden_weight": distill.hidden_weight > 0,
        "distill.attention_weight": distill.attention_weight > 0,
        "distill.embedding_weight": distill.embedding_weight > 0,
        "evaluation.ablation": config.evaluation.ablation,
        "teacher.finetune_epochs": config.teacher.finetune_epochs > 0,
        "compress": config.compress is not None,
        "knowledge_cache.enabled": config.knowledge_cache.enabled,
        # The student writes the teacher's vocabulary, piece for piece, as the teacher's own target.
        "student.trim_vocabulary": student.trim_vocabulary or any(s.trim_vocabulary for s in config.extra_students),
        "student.tokenizer": student.tokenizer is not None,
        "student.init_from_teacher_layers": student.init_from_teacher_layers is not None,
    }
    refuse_settings(wrong, "task seq2seq learns the teacher's target-token distributions and/or its translations")
    if distill.soft_weight > 0 and distill.top_k is None:
        raise ValueError("task seq2seq needs distill.top_k (e.g. 16 to 64): the teacher ships its top-k per "
                         "target token, never the whole vocabulary's logits")
    if distill.seq2seq_target == "reference" and distill.soft_weight == 0:
        raise ValueError("distill.seq2seq_target 'reference' with soft_weight 0 learns from the data alone, no "
                         "teacher: give soft_weight a value, or set seq2seq_target: teacher")
    if any(s.workers > 1 for s in (student, *config.extra_students)):
        raise ValueError("task seq2seq trains each student on one worker: set student.workers to 1")


def translation_markers(tokenizer: Tokenizer) -> Mapping[str, int]:
    """The decoder starts from the tokenizer's start marker and stops at its end marker ([CLS] and [SEP]
    of a trained WordPiece tokenizer)."""
    start, end = decoder_markers(tokenizer)
    return {"bos_token_id": start, "decoder_start_token_id": start, "eos_token_id": end, "forced_eos_token_id": end}


SPEC = TaskSpec(name="seq2seq", auto_class="AutoModelForSeq2SeqLM", check=check, parallel_data=True,
                translation=True, random_model_fields=translation_markers)
