"""The multi-task example runs as a job (shortened): three tasks, each with its own teacher pool and
work stream, one student encoder; every sample of every task once per epoch; each head loads with its
task's auto class and shares the trained encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

from polydistill.cluster.config import load_config
from polydistill.cluster.driver import run_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_multitask.yaml"


def test_multitask_example(tmp_path, redis_server, redis_client, local_ray):
    config = load_config(EXAMPLE, [
        f"transport.redis_url={redis_server.url}", "data.limit_per_language=64", "training.epochs=1",
        "training.batch_size=16", "evaluation.latency=false", "training.log_every=1",
    ], output_dir=str(tmp_path / "out"))
    report = run_job(config, show_progress=False)
    tasks = report["tasks"]
    assert report["samples_distilled"] == report["samples_expected"] == 3 * 64 + 2 * 150 + 2 * 150
    assert report["duplicates_dropped"] == 0 and report["batches_missing"] == 0
    assert report["student_steps"] == report["batches_expected"]
    assert {name: (task["samples_expected"], task["samples_distilled"]) for name, task in tasks.items()} == {
        "main": (192, 192), "tagging": (300, 300), "embedding": (300, 300)}
    assert tasks["tagging"]["samples_per_language"] == {"fra": 150, "swh": 150}
    logged = {key for entry in report["loss_history"] for key in entry}
    assert {"main.soft", "main.hard", "tagging.soft", "tagging.hard", "embedding.embedding"} <= logged
    # each extra task evaluated on its own held-out data beside its own teacher
    assert tasks["tagging"]["metric"] == "word tagging accuracy" and "fra" in tasks["tagging"]["per_language"]
    assert tasks["embedding"]["metric"] == "bitext retrieval accuracy"
    assert "## Task tagging" in (tmp_path / "out" / "report.md").read_text()
    # The extra tasks' teachers were prepared in a stage of their own, not in the driver.
    assert {"prepare_teacher", "prepare_task_teachers", "evaluate"} <= set(report["stage_placement"])

    student = Path(report["student_path"])
    main = AutoModelForSequenceClassification.from_pretrained(student)
    tagger = AutoModelForTokenClassification.from_pretrained(student / "tasks" / "tagging")
    embedder = AutoModel.from_pretrained(student / "tasks" / "embedding")
    assert tagger.config.id2label[3] == "eng"
    for name, weight in main.bert.encoder.state_dict().items():  # one encoder, trained by all three tasks
        assert torch.equal(weight, tagger.bert.encoder.state_dict()[name])
        assert torch.equal(weight, embedder.encoder.state_dict()[name])
    assert list(redis_client.scan_iter(match=f"polydistill:{config.resolved_job_id}:*")) == []
