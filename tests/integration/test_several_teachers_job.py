"""The several-teachers example runs as a job (shortened) with exact accounting and reports which
teacher labelled how many samples of each language; a language no teacher serves is refused
before any actor starts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from polydistill.cluster.config import load_config
from polydistill.cluster.driver import run_job
from polydistill.student.contract import ContractError

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_two_teachers.yaml"


def second_teacher(languages: str) -> str:
    """An override giving the example's second teacher other languages."""
    return ("extra_teachers=[{name: africa, model: random, replicas: 1, num_cpus: 0.5, weight: 2.0, "
            f"languages: {languages}, config: {{model_type: bert, hidden_size: 96, num_hidden_layers: 2, "
            "num_attention_heads: 4, intermediate_size: 192, max_position_embeddings: 128}}]")


def two_teacher_config(tmp_path: Path, redis_url: str, *overrides: str):
    return load_config(EXAMPLE, [
        f"transport.redis_url={redis_url}", "data.limit_per_language=60", "training.epochs=2",
        "training.batch_size=16", "evaluation.latency=false", "training.log_every=1", *overrides,
    ], output_dir=str(tmp_path / "out"))


def test_two_teachers_routed_by_language(tmp_path, redis_server, redis_client, local_ray):
    config = two_teacher_config(tmp_path, redis_server.url)
    report = run_job(config, show_progress=False)
    assert report["samples_distilled"] == report["samples_expected"] == 2 * 4 * 60
    assert report["duplicates_dropped"] == 0 and report["batches_missing"] == 0 and report["dead_letters"] == 0
    assert report["student_steps"] == report["batches_expected"]
    # Counted by the student, once per sample and epoch: the main teacher labelled everything, the
    # second one Swahili and Yoruba only.
    assert report["teacher_samples_per_language"] == {
        "teacher": {"eng_Latn": 120, "fra_Latn": 120, "swh_Latn": 120, "yor_Latn": 120},
        "africa": {"swh_Latn": 120, "yor_Latn": 120},
    }
    by_teacher: dict[str, int] = {}
    for replica in report["teachers"]:
        by_teacher[replica["teacher"]] = by_teacher.get(replica["teacher"], 0) + replica["samples"]
    assert by_teacher == {"teacher": 480, "africa": 240}
    assert set(report["teacher_pools"]) == {"teacher", "africa"}
    assert report["wire_bytes_per_sample_by_part"]["soft"] > 0
    assert "teacher:africa" in report["per_language"]["swh_Latn"]
    assert "## Teachers" in (tmp_path / "out" / "report.md").read_text()
    assert list(redis_client.scan_iter(match=f"polydistill:{config.resolved_job_id}:*")) == []


def test_a_language_no_teacher_serves_is_refused_before_anything_starts(tmp_path, redis_server):
    config = two_teacher_config(tmp_path, redis_server.url, "teacher.languages=[eng_Latn, fra_Latn]",
                                second_teacher("[swh_Latn]"))
    started = time.monotonic()
    with pytest.raises(ContractError, match=r"no teacher serves \['yor_Latn'\]"):
        run_job(config, show_progress=False)
    assert time.monotonic() - started < 60


def test_a_routed_language_the_data_lacks_is_named(tmp_path, redis_server):
    config = two_teacher_config(tmp_path, redis_server.url, second_teacher("[swh_Latn, hau_Latn]"))
    with pytest.raises(ContractError, match=r"extra_teachers\[0\].languages lists \['hau_Latn'\]"):
        run_job(config, show_progress=False)


def test_two_teachers_with_chunked_knowledge_keep_exact_accounting(tmp_path, redis_server, redis_client, local_ray):
    """Only the last teacher in line splits a batch: a chunk carries every teacher's vote and is
    gathered once by the student."""
    config = two_teacher_config(tmp_path, redis_server.url, "distill.knowledge_message_bytes=4096",
                                "training.epochs=1")
    report = run_job(config, show_progress=False)
    assert report["samples_distilled"] == report["samples_expected"] == 4 * 60
    assert report["duplicates_dropped"] == 0 and report["batches_missing"] == 0 and report["dead_letters"] == 0
    assert report["teacher_samples_per_language"]["africa"] == {"swh_Latn": 60, "yor_Latn": 60}
