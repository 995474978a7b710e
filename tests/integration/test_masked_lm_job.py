"""Masked-LM distillation over the whole vocabulary: masked inputs travel in the work batch, the
teacher ships per-token top-k, the student learns the masked positions; pseudo-perplexity per
language for teacher and student; every sample exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForMaskedLM

from polydistill.cluster.config import ConfigError, load_config
from polydistill.cluster.driver import run_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_masked_lm.yaml"


def test_masked_lm_example_learns_the_masked_positions(tmp_path, redis_server, local_ray):
    config = load_config(EXAMPLE, [f"transport.redis_url={redis_server.url}", "data.languages=[eng_Latn, swh_Latn]",
                                   "data.limit_per_language=96", "evaluation.latency=false",
                                   "training.epochs=1"],
                         output_dir=str(tmp_path / "out"))
    report = run_job(config, show_progress=False)
    assert report["samples_distilled"] == report["samples_expected"] == 2 * 96
    assert report["duplicates_dropped"] == 0 and report["batches_missing"] == 0
    assert report["metric"] == "masked-token accuracy"
    last = report["loss_history"][-1]
    assert {"soft", "hard"} <= set(last) and last["loss"] == last["loss"]  # both terms, not NaN
    for language in ("eng_Latn", "swh_Latn"):
        row = report["per_language"][language]
        assert row["teacher"]["agreement"] == 1.0 and 0 <= row["student"]["agreement"] <= 1
        assert row["student"]["perplexity"] > 1 and row["student"]["tokens"] > 0
        # Both scored on the same masked positions.
        assert row["student"]["tokens"] == row["teacher"]["tokens"]
    model = AutoModelForMaskedLM.from_pretrained(report["student_path"])
    assert model.config.num_hidden_layers == 2
    # Per-token top-16 soft labels: 16 x (4 + 4) + 4 bytes a token, plus the batch with its labels.
    assert report["wire_bytes_per_sample_by_part"]["soft"] > 100


def test_masked_lm_needs_top_k_and_plain_text(tmp_path):
    with pytest.raises(ConfigError, match="distill.top_k"):
        load_config(EXAMPLE, ["distill.top_k=null"], output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="data.label_column"):
        load_config(EXAMPLE, ["data.label_column=category"], output_dir=str(tmp_path))
