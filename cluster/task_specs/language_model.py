"""The checks both language-model kinds (causal-lm, masked-lm) share: they learn token distributions
from plain text, whose own tokens are the hard labels."""

from __future__ import annotations

from polydistill.cluster.task_specs.spec import JobSettings, refuse_settings


def check_language_model(config: JobSettings) -> None:
    distill = config.distill
    wrong = {
        "data.label_column": config.data.label_column is not None,  # the text is its own label
        "data.withhold_labels": config.data.withhold_labels,
        "distill.pseudo_label_threshold": distill.pseudo_label_threshold is not None,
        "distill.hidden_weight": distill.hidden_weight > 0,
        "distill.attention_weight": distill.attention_weight > 0,
        "distill.embedding_weight": distill.embedding_weight > 0,
        "evaluation.ablation": config.evaluation.ablation,
        "teacher.finetune_epochs": config.teacher.finetune_epochs > 0,
        "compress": config.compress is not None,
        # The student predicts the teacher's vocabulary, piece for piece.
        "student.trim_vocabulary": config.student.trim_vocabulary
        or any(extra.trim_vocabulary for extra in config.extra_students),
        # Cached records are per sample, but a long sample's knowledge may travel in token windows.
        "knowledge_cache.enabled": config.knowledge_cache.enabled,
    }
    refuse_settings(wrong, f"task {config.task} learns token distributions from plain text (hard labels are the "
                           "text's own tokens, weighed by distill.hard_weight)")
    if any(student.workers > 1 for student in (config.student, *config.extra_students)):
        # Data-parallel workers apply whole messages; a batch sent in chunks needs the one-worker gather.
        raise ValueError(f"task {config.task} trains each student on one worker: set student.workers to 1")
    if distill.soft_weight > 0 and distill.top_k is None:
        raise ValueError(
            f"task {config.task} needs distill.top_k (e.g. 16 to 64): a teacher's full logits for every token (a "
            "250k-piece vocabulary is 1 MB a token) are never shipped, only its top-k and their log-sum-exp"
        )
