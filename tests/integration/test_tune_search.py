"""The search loop end to end: two Ray Tune trials of the tiny job, each a whole distillation job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polydistill.cluster.tune import (
    REPORT_JSON,
    REPORT_MD,
    cache_supported,
    run_tune,
    validate_tune_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.heavy]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

SEARCH = {
    "space": {
        "temperature": {"choice": [1.0, 4.0]},
        "hidden_layers": {"choice": [None, "uniform"]},
        "hidden_weight": {"choice": [0.5]},
        "lr": {"loguniform": [1.0e-4, 1.0e-3]},
        "more": {"student.config.num_hidden_layers": {"choice": [1, 2]}},
    },
    "num_samples": 2,
    "seed": 3,
    "minimize": ["params", "latency_share_batch32"],
    "set": [  # a job of a few seconds: one language, 64 rows, one teacher, one epoch
        "teacher.replicas=1",
        "data.languages=[eng_Latn]",
        "data.limit_per_language=64",
        "training.epochs=1",
        "evaluation.latency=false",
    ],
}


def test_two_trials_report_metrics_best_and_pareto_front(tmp_path, redis_server, redis_client, local_ray, capsys):
    out = tmp_path / "tune"
    result = run_tune(EXAMPLES / "tiny.yaml", validate_tune_config(SEARCH), out,
                      [f"transport.redis_url={redis_server.url}"])

    rows = result["trials"]
    assert len(rows) == 2 and [row["status"] for row in rows] == ["ok", "ok"], [row.get("error") for row in rows]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["retention"] is not None
        assert row["params"] > 0 and row["disk_bytes"] > 0  # counted even with evaluation.latency: false
        assert row["samples_distilled"] == 64
        assert set(row["config"]) == set(result["searched"])
        assert Path(row["output_dir"], "report.json").is_file()
        assert row["overrides"] and not any(item.startswith("transport.") for item in row["overrides"])
    assert len({row["output_dir"] for row in rows}) == 2

    # The best trial is the argmax (equals: the smaller student); the front is non-dominated and holds it.
    top = max(row["accuracy"] for row in rows)
    best = min((row for row in rows if row["accuracy"] == top), key=lambda row: row["params"])
    assert result["best_trial"] == best["trial"] and result["best"] == best
    assert result["pareto_costs"] == ["params"]  # latency was not measured
    front = [row for row in rows if row["trial"] in result["pareto_front"]]
    assert best in front
    for a in front:
        for b in front:
            assert not (a["accuracy"] >= b["accuracy"] and a["params"] <= b["params"]
                        and (a["accuracy"] > b["accuracy"] or a["params"] < b["params"]))

    # Report files, and the table printed.
    on_disk = json.loads((out / REPORT_JSON).read_text())
    assert on_disk["best_trial"] == result["best_trial"] and len(on_disk["trials"]) == 2
    assert "redis://" not in (out / REPORT_JSON).read_text()
    markdown = (out / REPORT_MD).read_text()
    assert all(row["trial"] in markdown for row in rows) and "★" in markdown
    assert (out / "pareto.png").read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "| trial " in printed and f"best trial: {best['trial']}" in printed

    # Every trial distilled the one teacher built for the search.
    teachers = {json.loads(Path(row["output_dir"], "report.json").read_text())["teacher_path"] for row in rows}
    assert teachers == {str((out / "teacher").resolve())}

    cache = result["knowledge_cache"]
    if cache_supported():
        # The warm-up computed the base contract (soft labels only); a trial without a hidden-state
        # loss asks for the same knowledge and reads it instead of running its teacher.
        assert result["warmup"]["teacher_samples_computed"] == 64 and cache["enabled"]
        for row in rows:
            if row["config"]["distill.hidden_layers"] is None:
                assert row["knowledge_from_cache"] and row["teacher_samples_computed"] == 0, row
        assert cache["trials_from_cache"] == [row["trial"] for row in rows if row["knowledge_from_cache"]]
    else:
        assert result["warmup"] is None and not cache["enabled"]

    # Nothing of any trial is left in the shared Redis.
    assert list(redis_client.scan_iter(match="polydistill:tune-*")) == []


def test_asha_stops_the_trials_that_fall_behind_at_a_rung_and_leaves_nothing_in_redis(
        tmp_path, redis_server, redis_client, local_ray):
    # Seed 1 draws the learning rates in the order [3e-3, 1e-12, 1e-12]: the first trial learns, the two after it
    # score the untrained student's dev accuracy after their first epoch, below the first's there, and stop.
    search = {
        "space": {"lr": {"choice": [3.0e-3, 1.0e-12]}},
        "num_samples": 3, "seed": 1, "minimize": ["params"],
        "scheduler": {"asha": {"grace_period_epochs": 1, "reduction_factor": 2}},
        "set": ["teacher.replicas=1", "data.languages=[eng_Latn]", "data.limit_per_language=160",
                "training.epochs=3", "training.batch_size=16", "evaluation.latency=false"],
    }
    result = run_tune(EXAMPLES / "tiny.yaml", validate_tune_config(search), tmp_path / "tune",
                      [f"transport.redis_url={redis_server.url}"], show_table=False)

    rows = {row["trial"]: row for row in result["trials"]}
    learnt, *slow = rows.values()
    assert learnt["config"]["training.lr"] == 3.0e-3 and learnt["status"] == "ok" and learnt["epochs"] == 3
    assert [row["config"]["training.lr"] for row in slow] == [1.0e-12, 1.0e-12]
    for row in slow:
        assert row["status"] == "stopped" and row["epochs"] == 1 and row["dev_accuracy"] < learnt["dev_accuracy"]
        assert row.get("accuracy") is None  # no final score: it cannot be chosen
    assert result["best_trial"] == learnt["trial"] and result["tune_config"]["scheduler"]["asha"]["reduction_factor"] == 2
    assert list(redis_client.scan_iter(match="polydistill:tune-*")) == []


def test_under_asha_a_failing_trial_is_a_row_and_the_search_goes_on(tmp_path, local_ray):
    # The failing trial's result carries no dev score, which Tune's strict metric check would end the search on.
    search = {
        "space": {"more": {"student.config.num_attention_heads": {"choice": [3]}}},
        "num_samples": 1, "scheduler": {"asha": {"grace_period_epochs": 1, "reduction_factor": 2}},
        "set": ["teacher.replicas=1", "data.languages=[eng_Latn]", "data.limit_per_language=64",
                "training.epochs=2", "training.batch_size=16", "evaluation.latency=false"],
    }
    result = run_tune(EXAMPLES / "tiny.yaml", validate_tune_config(search), tmp_path / "tune", show_table=False)
    [row] = result["trials"]
    assert row["status"] == "error" and "not divisible by num_attention_heads 3" in row["error"]
    assert result["best_trial"] is None and (tmp_path / "tune" / REPORT_JSON).is_file()
