"""Every knowledge-type example runs as a job (shortened here) with exact accounting, writes its
loss terms and bytes per sample into report.json, and ships exactly the knowledge it names."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import BertConfig

from polydistill.cluster.config import load_config
from polydistill.cluster.driver import run_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KNOWLEDGE = Path(__file__).resolve().parents[2] / "examples" / "knowledge"
# example -> (loss terms in the log, knowledge parts on the wire besides the batch itself)
EXPECTED = {
    "hidden_states": ({"soft", "hard", "hidden"}, {"soft", "hidden_states"}),
    "attention_maps": ({"soft", "hard", "attention"}, {"soft", "attentions"}),
    "attention_relations": ({"soft", "hard", "attention"}, {"soft", "hidden_states"}),
    "pooled_embeddings": ({"soft", "hard", "embedding"}, {"soft", "embeddings"}),
    "topk_soft_labels": ({"soft", "hard"}, {"soft"}),
}


# Hidden states and attention maps also run end to end in test_knowledge_pipeline.py (both in one
# job); here their examples are checked as configs and contracts, the other three run as jobs.
# Two of the three are in the heavy tier: their losses have hand-computed unit tests, their configs
# and contracts are checked above, and the embedding loss also runs as a job in test_embedding_job.py.
RUN_AS_JOBS = (pytest.param("attention_relations", marks=pytest.mark.heavy),
               pytest.param("pooled_embeddings", marks=pytest.mark.heavy), "topk_soft_labels")


@pytest.mark.parametrize("example", sorted(EXPECTED))
def test_every_knowledge_example_asks_for_its_knowledge(example, tmp_path):
    from polydistill.student.contract import resolve_contract

    config = load_config(KNOWLEDGE / f"{example}.yaml", output_dir=str(tmp_path))
    teacher = BertConfig(num_hidden_layers=4, hidden_size=128, num_attention_heads=4)
    student = BertConfig(num_hidden_layers=2, hidden_size=64,
                         num_attention_heads=config.student.config["num_attention_heads"])
    request = resolve_contract(config.distill, teacher, student).request
    shipped = {"soft"} | ({"hidden_states"} if request.hidden_layers else set()) | (
        {"attentions"} if request.attention_layers else set()) | ({"embeddings"} if request.embeddings else set())
    assert shipped == EXPECTED[example][1]


@pytest.mark.parametrize("example", RUN_AS_JOBS)
def test_knowledge_example(example, tmp_path, redis_server, local_ray):
    config = load_config(KNOWLEDGE / f"{example}.yaml", [
        f"transport.redis_url={redis_server.url}", "data.languages=[eng_Latn, swh_Latn]",
        "data.limit_per_language=64", "training.epochs=1", "training.batch_size=16", "evaluation.latency=false",
        "evaluation.ablation=false", "training.log_every=1",
    ], output_dir=str(tmp_path / "out"))
    report = run_job(config, show_progress=False)
    assert report["samples_distilled"] == report["samples_expected"] == 128
    assert report["duplicates_dropped"] == 0 and report["batches_missing"] == 0
    terms, parts = EXPECTED[example]
    logged = set(report["loss_history"][-1]) - {"step", "epoch", "loss", "total"}
    assert terms <= logged, logged
    shipped = {part for part, size in report["wire_bytes_per_sample_by_part"].items() if size}
    assert parts <= shipped, report["wire_bytes_per_sample_by_part"]
    assert report["wire_bytes_per_sample"] > 0
