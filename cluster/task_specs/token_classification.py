"""Token classification's spec: one tag per word (data.word_tags), learnt from a tagger teacher's
class probabilities at every token. Its behaviour: student/task_kinds/token_classification.py."""

from __future__ import annotations

from polydistill.cluster.task_specs.spec import JobSettings, TaskSpec


def check(config: JobSettings) -> None:
    wrong = {
        "data.label_column": config.data.label_column is None,
        "data.withhold_labels": config.data.withhold_labels,
        "distill.pseudo_label_threshold": config.distill.pseudo_label_threshold is not None,
        "distill.top_k": config.distill.top_k is not None,  # a tag set is small: every tag's logit travels
        "compress": config.compress is not None,
        # Cached records keep each sample's knowledge and ids, not its per-token tags.
        "knowledge_cache.enabled": config.knowledge_cache.enabled,
    }
    if any(wrong.values()):
        raise ValueError("task token-classification learns from the tags of labelled words and the teacher's "
                         "per-token probabilities; " + ", ".join(
                             "give data.label_column" if key == "data.label_column" else f"unset {key}"
                             for key, bad in wrong.items() if bad))


SPEC = TaskSpec(name="token-classification", auto_class="AutoModelForTokenClassification", check=check,
                classes=True, word_tags=True)
