"""The translation example runs as a job (shortened) in both distillation modes with exact
accounting: word-level (the teacher's top-k along the reference) and sequence-level (the teacher's
beam output as the target); the student loads with AutoModelForSeq2SeqLM and translates."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from polydistill.cluster.config import load_config
from polydistill.cluster.driver import run_job
from polydistill.student.translation_eval import translate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_seq2seq.yaml"


# Sequence-level distillation (the teacher's own beams) is the heavier variant: the heavy tier runs it.
@pytest.mark.parametrize("target", ["reference", pytest.param("teacher", marks=pytest.mark.heavy)])
def test_seq2seq_example(target, tmp_path, redis_server, redis_client, local_ray):
    config = load_config(EXAMPLE, [
        f"transport.redis_url={redis_server.url}", "data.limit_per_language=48", "data.parallel_test_rows=16",
        "data.max_length=24", "training.epochs=1", "distill.num_beams=2", f"distill.seq2seq_target={target}",
        "evaluation.latency=false", "training.log_every=1",
    ], output_dir=str(tmp_path / "out"))
    report = run_job(config, show_progress=False)
    assert report["samples_distilled"] == report["samples_expected"] == 2 * 48
    assert report["duplicates_dropped"] == 0 and report["batches_missing"] == 0
    assert report["student_steps"] == report["batches_expected"]
    assert {"soft", "hard"} <= set(report["loss_history"][-1])
    # top-8 per target token (values, ids, log-sum-exp) and the target itself travel with every batch
    assert report["wire_bytes_per_sample_by_part"]["soft"] > 8 * 8
    assert report["metric"] == "chrF"
    for language in ("fra", "deu"):
        scores = report["per_language"][language]["student"]
        assert scores["n"] == 16 and 0 <= scores["chrf"] <= 100 and 0 <= scores["bleu"] <= 100
    student = AutoModelForSeq2SeqLM.from_pretrained(report["student_path"])
    tokenizer = AutoTokenizer.from_pretrained(report["student_path"])
    assert student.config.decoder_layers == 1
    assert len(translate(student, tokenizer, ["<2fra> Good morning.", "<2deu> Thank you."], max_new_tokens=8)) == 2
    assert list(redis_client.scan_iter(match=f"polydistill:{config.resolved_job_id}:*")) == []
