"""The tiny job with a compression chain: distil → prune → recover → quantise, a report row per stage."""

from __future__ import annotations

import json
import subprocess
import sys
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
    "{name: recovered, kind: recover, export: onnx}, {name: int8, kind: quantize, export: onnx}], "
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
    check_onnx_stages_run_without_polydistill(config, tmp_path / "out", report)


# Run by a bare interpreter that cannot import polydistill (nor torch): the shipped ONNX graph, its
# tokenizer and label names, and the held-out rows as plain text are all it needs.
STANDALONE = r"""
import csv, json, sys
sys.modules["polydistill"] = None
sys.modules["torch"] = None
import numpy as np, onnxruntime
from tokenizers import Tokenizer
folder, rows_file, graph = sys.argv[1], sys.argv[2], sys.argv[3]
config = json.load(open(f"{folder}/config.json"))
label_of = {name: int(i) for i, name in config["id2label"].items()}
tokenizer = Tokenizer.from_file(f"{folder}/tokenizer.json")
tokenizer.enable_truncation(64)
session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
right = total = 0
for row in csv.DictReader(open(rows_file), delimiter="\t", quoting=csv.QUOTE_NONE):
    ids = np.array([tokenizer.encode(row["text"]).ids], dtype=np.int64)
    logits = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    right += int(logits.argmax()) == label_of[row["category"]]
    total += 1
print(json.dumps({"accuracy": right / total, "rows": total}))
"""


def check_onnx_stages_run_without_polydistill(config, out: Path, report: dict) -> None:
    """The stages that name ``export: onnx`` left graphs that onnxruntime runs with no polydistill (nor
    torch) importable, scoring on the job's held-out rows (as plain text) what the report says."""
    from polydistill.storage.job_data import load_job_split

    held_out = load_job_split(config.data, config.data.eval_split)
    rows_file = out / "held_out.tsv"
    with rows_file.open("w", encoding="utf-8") as handle:
        handle.write("category\ttext\n")
        for text, label in zip(held_out.dataset["text"], held_out.dataset["label"]):
            handle.write(f"{held_out.label_names[label]}\t{text}\n")
    stages = {stage["name"]: stage for stage in report["stages"]}
    assert "onnx" not in stages["pruned"]["details"]
    for name, graph in (("recovered", "model.onnx"), ("int8", "model.int8.onnx")):
        shipped = stages[name]["details"]["onnx"]
        folder = out / "compress" / name / "onnx"
        assert shipped["file"] == f"onnx/{graph}" and shipped["latency_ms_batch32"] > 0
        assert shipped["max_abs_diff"] < (1e-3 if name == "recovered" else 0.5)
        result = subprocess.run([sys.executable, "-c", STANDALONE, str(folder), str(rows_file), str(folder / graph)],
                                capture_output=True, text=True, check=True)
        standalone = json.loads(result.stdout)
        assert standalone["rows"] == len(held_out.dataset) == 200
        assert standalone["accuracy"] == pytest.approx(shipped["accuracy"], abs=1e-9), (name, standalone, shipped)
    # The pruned graph keeps the pruned shapes: smaller than the distilled student's float graph would be.
    assert stages["recovered"]["details"]["onnx"]["disk_bytes"] < stages["distil"]["disk_bytes"]
    assert "recovered → onnx/model.onnx" in (out / "report.md").read_text()
