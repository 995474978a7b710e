"""Sentence embedding's spec: a sentence encoder's mean-pooled embeddings, learnt from parallel
sentences (data.parallel). Its behaviour: student/task_kinds/sentence_embedding.py."""

from __future__ import annotations

from polydistill.cluster.task_specs.spec import JobSettings, TaskSpec, refuse_settings


def check(config: JobSettings) -> None:
    distill = config.distill
    wrong = {
        "distill.soft_weight": distill.soft_weight > 0,
        "distill.hard_weight": distill.hard_weight > 0,
        "distill.pseudo_label_threshold": distill.pseudo_label_threshold is not None,
        "evaluation.ablation": config.evaluation.ablation,
        "teacher.finetune_epochs": config.teacher.finetune_epochs > 0,
        "compress": config.compress is not None,
        "data.withhold_labels": config.data.withhold_labels,
        "distill.hidden_weight": distill.hidden_weight > 0,  # the embedding loss is the one this task trains
        "distill.attention_weight": distill.attention_weight > 0,
    }
    refuse_settings(wrong, "task sentence-embedding has no classes and learns the pooled embeddings only")
    if distill.embedding_weight <= 0:
        raise ValueError("task sentence-embedding learns the teacher's embeddings: set distill.embedding_weight > 0")


SPEC = TaskSpec(name="sentence-embedding", auto_class="AutoModel", check=check, sequence_level=True,
                parallel_data=True)
