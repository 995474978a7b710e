"""Feature distillation end to end: hidden states and attention maps of a 128-wide teacher streamed to a
64-wide student, with the labels withheld from the student (pseudo-labels instead), exact accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from polydistill.cluster.config import load_config
from polydistill.cluster.driver import run_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_hidden_states_and_attention_across_widths_with_withheld_labels(tmp_path, redis_server, redis_client,
                                                                         local_ray):
    config = load_config(
        EXAMPLES / "tiny.yaml",
        [
            f"transport.redis_url={redis_server.url}",
            "data.languages=[eng_Latn, swh_Latn]",
            "data.limit_per_language=96",
            "data.withhold_labels=true",
            "training.epochs=1",
            "training.batch_size=16",
            "student.config.num_attention_heads=4",  # equal head counts: attention KL on the maps themselves
            "distill.hidden_layers=uniform",
            "distill.hidden_weight=1.0",
            "distill.attention_layers=[[2, 4]]",
            "distill.attention_weight=1.0",
            # A random teacher is near uniform over 7 classes: a low threshold lets every prediction through.
            "distill.pseudo_label_threshold=0.05",
            "evaluation.latency=false",
        ],
        output_dir=str(tmp_path / "out"),
    )
    report = run_job(config, show_progress=False)

    assert report["samples_distilled"] == report["samples_expected"] == 192
    assert report["batches_missing"] == 0 and report["duplicates_dropped"] == 0 and report["dead_letters"] == 0
    assert sum(t["samples"] for t in report["teachers"]) == 192
    # Every loss term the config weighs is logged, each with its own value.
    last = report["loss_history"][-1]
    assert {"soft", "hard", "hidden", "attention", "total"} <= set(last)  # hard: from pseudo-labels only
    assert all(value == value for value in last.values())  # no NaN
    # Per sample: 3 hidden layers of 128 fp16 values per token and one 4-head L x L map dominate the message.
    parts = report["wire_bytes_per_sample_by_part"]
    assert parts["hidden_states"] > parts["soft"] and parts["attentions"] > 0 and parts["embeddings"] == 0
    assert report["wire_bytes_per_sample"] > sum(parts.values())
    # Each sample reached the pseudo-label count exactly once; the withheld labels only score them.
    pseudo = report["pseudo_labels"]
    assert {lang: (p["passed"], p["total"]) for lang, p in pseudo.items()} == {"eng_Latn": (96, 96),
                                                                               "swh_Latn": (96, 96)}
    assert all(0 <= p["correct"] <= p["passed"] for p in pseudo.values())
    # Evaluation still scores the labelled test split.
    assert report["eval_samples"] > 0 and "student" in report["overall"]

    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["wire_bytes_per_sample"] == report["wire_bytes_per_sample"]
    student_dir = Path(report["student_path"])
    assert not any("projection" in key for key in load_file(student_dir / "model.safetensors"))
    assert AutoModelForSequenceClassification.from_pretrained(student_dir).config.hidden_size == 64
