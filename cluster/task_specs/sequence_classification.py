"""Sequence classification's spec: one class per text, from a classifier teacher's class
probabilities (and features); the only kind several teachers serve together. Its behaviour:
student/task_kinds/sequence_classification.py."""

from __future__ import annotations

from polydistill.cluster.task_specs.spec import JobSettings, TaskSpec


def check(config: JobSettings) -> None:
    """Labels where a setting needs them, and some loss for unlabelled text."""
    data, distill = config.data, config.distill
    if data.label_column is None:
        if data.withhold_labels:
            raise ValueError("data.withhold_labels is true but data.label_column is null: there are no labels "
                             "to withhold")
        needs = {
            "data.eval_split": data.eval_split is not None,
            "evaluation.ablation": config.evaluation.ablation,
            "teacher.finetune_epochs": config.teacher.finetune_epochs > 0,
            "teacher.model 'random' (it takes its classes from the labels)": config.teacher.model == "random",
        }
        wanting = [key for key, wants in needs.items() if wants]
        if wanting:
            raise ValueError(
                f"data.label_column is null (unlabelled text), but these settings need labels: "
                f"{', '.join(wanting)}. Give data.label_column and set data.withhold_labels: true to keep the "
                "labels from the student only, or set data.eval_split: null, evaluation.ablation: false, "
                "teacher.finetune_epochs: 0 and a trained classifier as teacher.model"
            )
    unlabelled = data.label_column is None or data.withhold_labels
    if config.compress is not None and data.eval_split is None:
        raise ValueError("compress is set but data.eval_split is null: every stage is measured on the held-out "
                         "rows; give data.eval_split or drop compress")
    if config.compress is not None and unlabelled and config.compress.recover_loss == "hard":
        raise ValueError("compress.recover_loss is 'hard' but the student gets no labels (data.label_column is "
                         "null or data.withhold_labels is true): use compress.recover_loss: distill")
    teacher_terms = (distill.soft_weight, distill.hidden_weight, distill.attention_weight, distill.embedding_weight,
                     distill.align_weight)
    if unlabelled and not any(teacher_terms) and distill.pseudo_label_threshold is None:
        raise ValueError(
            "the student gets no labels (data.label_column is null or data.withhold_labels is true) and "
            "distill.hard_weight is the only loss: set distill.soft_weight, or distill.pseudo_label_threshold "
            "so that the teacher's confident predictions serve as hard labels"
        )


SPEC = TaskSpec(name="sequence-classification", auto_class="AutoModelForSequenceClassification", check=check,
                classes=True, sequence_level=True, several_teachers=True)
