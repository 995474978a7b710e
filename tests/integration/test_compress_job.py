"""The tiny job with a compression chain: distil → prune → recover → quantise, a report row per stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification

from polydistill.cluster.config import load_config
from polydistill.cluster.driver import run_job
from polydistill.student.quantize import METHOD_WITH_EMBEDDINGS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ROW_KEYS = {"name", "params", "disk_bytes", "latency_ms_batch1", "latency_ms_batch32", "accuracy", "retention",
            "per_language"}
CHAIN = (
    "compress={stages: [{name: distil, kind: measure}, "
    "{name: pruned, kind: prune, head_sparsity: 0.5, ffn_sparsity: 0.5, calibration_batches: 4}, "
    "{name: recovered, kind: recover}, {name: int8, kind: quantize}], "
    "recover_epochs: 0.5, recover_lr: 3.0e-4, calibration_rows: 128}"
)


def test_compress_chain_reports_a_row_per_stage_and_shrinks(tmp_path, redis_server, local_ray):
    config = load_config(
        EXAMPLES / "tiny.yaml",
        [f"transport.redis_url={redis_server.url}", "data.languages=[eng_Latn, swh_Latn]",
         "data.limit_per_language=100", "training.epochs=1", "training.batch_size=16",
         "evaluation.latency=false", CHAIN],
        output_dir=str(tmp_path / "out"),
    )
    run_job(config, show_progress=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    stages = report["stages"]
    assert [stage["name"] for stage in stages] == ["distil", "pruned", "recovered", "int8"]
    for stage in stages:
        assert ROW_KEYS <= set(stage), stage["name"]
        assert set(stage["per_language"]) == {"eng_Latn", "swh_Latn"}
        assert 0 <= stage["accuracy"] <= 1 and stage["latency_ms_batch1"] > 0 and stage["latency_ms_batch32"] > 0
    distil, pruned, recovered, int8 = stages
    assert pruned["params"] < distil["params"] and pruned["disk_bytes"] < distil["disk_bytes"]
    assert recovered["params"] == pruned["params"]
    assert int8["disk_bytes"] < recovered["disk_bytes"]
    assert int8["details"]["method"] == METHOD_WITH_EMBEDDINGS  # the default: embedding tables per-row 8-bit too
    assert "bert.embeddings.word_embeddings" in int8["details"]["embedding_modules"]
    assert report["compression"]["calibration_rows"] == 128
    assert "## Compression stages" in (tmp_path / "out" / "report.md").read_text()
    # each float stage is an HF checkpoint with the pruned shapes
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "compress" / "recovered")
    assert model.config.intermediate_size < config.student.config["intermediate_size"]
