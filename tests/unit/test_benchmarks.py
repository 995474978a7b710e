"""The benchmark harness's pure helpers: medians, ratios, epoch windows, the result and its table.

No timing here: benchmarks/run.py measures, these tests check the arithmetic and the format.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import summary  # noqa: E402
from benchmarks.summary import Mark, epoch_windows  # noqa: E402


def test_median_odd_even_and_empty():
    assert summary.median([3, 1, 2]) == 2
    assert summary.median([4, 1, 3, 2]) == 2.5
    assert summary.median((5.0,)) == 5.0
    with pytest.raises(ValueError, match="no repeats"):
        summary.median([])


def test_ratio_guards_missing_and_non_positive_denominators():
    assert summary.ratio(3.0, 4.0) == 0.75
    assert summary.ratio(None, 1.0) is None
    assert summary.ratio(1.0, None) is None
    assert summary.ratio(1.0, 0.0) is None
    assert summary.ratio(1.0, -2.0) is None
    assert summary.ratio(math.nan, 1.0) is None


def test_ratio_of_medians_uses_each_side_median():
    # medians 2 and 8, not the mean ratio of pairs
    assert summary.ratio_of_medians([1, 2, 30], [8, 7, 100]) == 0.25
    assert summary.ratio_of_medians([], [1.0]) is None


def test_gbps_and_spread():
    assert summary.gbps(2e9, 2.0) == 1.0
    assert summary.gbps(1, 0) is None
    assert summary.spread([3, 1, 2]) == {"median": 2, "min": 1, "max": 3, "n": 3}


def _mark(t, batches, samples, wait=0.0, compute=0.0, cpu=0.0):
    return Mark(t=t, batches=batches, samples=samples, wait_seconds=wait, compute_seconds=compute, cpu_seconds=cpu)


def test_epoch_windows_cut_every_batches_per_epoch_and_drop_partial_tail():
    start = _mark(10.0, 0, 0)
    marks = [_mark(10.0 + i, i, 32 * i, wait=0.1 * i, compute=0.5 * i, cpu=0.75 * i) for i in range(1, 8)]
    windows = epoch_windows(start, marks, batches_per_epoch=3)
    assert len(windows) == 2  # batches 1-3, 4-6; batch 7 is a partial epoch
    first, second = windows
    assert first.seconds == pytest.approx(3.0) and first.samples == 96
    assert first.wait_seconds == pytest.approx(0.3) and first.compute_seconds == pytest.approx(1.5)
    assert first.cpu_seconds == pytest.approx(2.25)
    assert second.samples_per_s == pytest.approx(32.0)
    assert second.wait_share == pytest.approx(0.1)


def test_epoch_windows_measure_uneven_samples_and_reject_bad_sizes():
    start = _mark(0.0, 0, 0)
    marks = [_mark(1.0, 1, 32), _mark(2.0, 2, 40)]  # last batch of the epoch is short
    (window,) = epoch_windows(start, marks, batches_per_epoch=2)
    assert window.samples == 40 and window.samples_per_s == 20.0
    assert epoch_windows(start, [], batches_per_epoch=2) == []
    with pytest.raises(ValueError):
        epoch_windows(start, marks, batches_per_epoch=0)


def _result(**overrides):
    headline = {
        "student_pace_retention": 0.81234567,
        "student_pace_retention_cached": 0.98,
        "inline_over_pipeline_time": 1.5,
        "transport_share_of_step": 0.008,
        "topk32_wire_ratio": 1866.13459,
        "topk128_bytes_per_token": 315.2,
        "topk128_kl_v1_vs_v2": 0.00043,
        "codec_over_memcpy_1mb": 0.61,
        "fanout": None,
        "cache_speedup": None,
        **overrides,
    }
    reasons = {"fanout": "not supported yet", "cache_speedup": "no cache yet"}
    return summary.build_result(headline, reasons, {"cpu_count": 2}, {"pace": {}}, mode="quick",
                                secondary=[summary.secondary_row("wait share", 0.00412345, "wait / wall")])


def test_result_has_every_required_key_and_survives_json():
    result = _result()
    assert summary.missing_keys(result) == []
    assert set(summary.REQUIRED_KEYS) <= set(result)
    assert result["null_reasons"] == {"fanout": "not supported yet", "cache_speedup": "no cache yet"}
    assert result["student_pace_retention"] == 0.8123  # four significant digits
    assert result["topk32_wire_ratio"] == 1866.0
    assert json.loads(json.dumps(result)) == result
    assert summary.missing_keys({"machine": {}}) == list(summary.HEADLINE_KEYS)


def test_result_refuses_missing_figures_and_unexplained_nulls():
    with pytest.raises(ValueError, match="missing"):
        summary.build_result({"fanout": None}, {"fanout": "x"}, {}, {})
    headline = {key: 1.0 for key in summary.HEADLINE_KEYS} | {"cache_speedup": None}
    with pytest.raises(ValueError, match="cache_speedup"):
        summary.build_result(headline, {}, {}, {})


def test_goals_are_judged_in_the_right_direction():
    assert summary.meets_goal("student_pace_retention", 0.96) is True
    assert summary.meets_goal("student_pace_retention", 0.5) is False
    assert summary.meets_goal("transport_share_of_step", 0.01) is True
    assert summary.meets_goal("transport_share_of_step", 0.02) is False
    assert summary.meets_goal("topk128_bytes_per_token", 321) is False
    assert summary.meets_goal("topk128_kl_v1_vs_v2", 0.0004) is True
    assert summary.meets_goal("codec_over_memcpy_1mb", 0.11) is False
    assert summary.meets_goal("topk32_wire_ratio", 999) is False
    assert summary.meets_goal("fanout", None) is None
    assert summary.meets_goal("inline_over_pipeline_time", 2.0) is None  # no goal stated


def test_table_has_a_row_per_figure_and_explains_nulls():
    table = summary.render_table(_result())
    lines = table.splitlines()
    assert lines[0].startswith("| figure | value | goal | met |")
    assert len(lines) == 2 + len(summary.HEADLINE_KEYS) + 1
    by_key = {key: next(line for line in lines if f"`{key}`" in line) for key in summary.HEADLINE_KEYS}
    assert "| 0.812 | >= 0.95 | no |" in by_key["student_pace_retention"]
    assert "| 1,866 | >= 1000 | yes |" in by_key["topk32_wire_ratio"]
    assert "| 0.0080 | <= 0.01 | yes |" in by_key["transport_share_of_step"]
    assert "| 315 | <= 320 | yes |" in by_key["topk128_bytes_per_token"]
    assert "null: not supported yet" in by_key["fanout"]
    assert lines[-1].startswith("| wait share | 0.0041 |")
    assert all(line.count("|") == 6 for line in lines)  # no stray pipes from the notes


def test_table_escapes_pipes_in_notes():
    result = _result()
    result["secondary"] = [summary.secondary_row("a", 1.0, "x | y")]
    assert "x \\| y" in summary.render_table(result)


def test_topk_rebuild_kl_matches_a_brute_force_rebuild():
    from benchmarks.wire_size import rebuild_kl

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=generator) * 3
    kl = rebuild_kl(logits, ks=(5, 50), temperatures=(1.0, 2.0))
    for temperature in (1.0, 2.0):
        p = torch.softmax(logits.double() / temperature, -1)
        values, indices = logits.double().topk(5, -1)
        lse = torch.logsumexp(logits.double(), -1)
        tail_mass = 1 - torch.exp(torch.logsumexp(values, -1) - lse)
        rebuilt = (lse + torch.log(tail_mass) - math.log(45))[:, None].expand(4, 50).clone()
        rebuilt.scatter_(1, indices, values)
        q = torch.softmax(rebuilt / temperature, -1)
        expected = (p * (p.log() - q.log())).sum(-1)
        assert torch.allclose(kl[(5, temperature, "fp32")], expected, atol=1e-6)
        assert torch.allclose(kl[(50, temperature, "fp32")], torch.zeros(4, dtype=torch.float64), atol=1e-9)


def test_lm_knowledge_hits_its_target_size():
    from benchmarks.transport import lm_knowledge
    from polydistill.storage import wire

    for target in (10_000, 1_000_000):
        size = len(wire.encode(lm_knowledge(target)))
        assert 0.9 * target <= size <= 1.1 * target
    assert np.all(np.diff(lm_knowledge(10_000).soft.topk_values, axis=-1) <= 0)  # descending, as the wire says


def test_repeated_runs_are_summarised_per_setup_by_median():
    def run(retention, wait):
        figures = {key: None for key in summary.SETUP_FIGURES}
        return {**figures, "retention": retention, "wait_share": {"median": wait, "min": 0, "max": 1, "n": 3}}

    per_run = {"colocated_r1#1": run(0.5, 0.4), "colocated_r2#1": run(0.9, 0.1),
               "colocated_r1#2": run(0.7, 0.2), "teachers_ahead": run(0.95, 0.0)}
    setups = summary.summarize_setups(per_run)
    assert list(setups) == ["colocated_r1", "colocated_r2", "teachers_ahead"]
    assert setups["colocated_r1"]["runs"] == 2
    assert setups["colocated_r1"]["retention"] == pytest.approx(0.6)
    assert setups["colocated_r1"]["retention_per_run"] == [0.5, 0.7]
    assert setups["colocated_r1"]["wait_share"] == pytest.approx(0.3)  # medians of each run's median
    assert setups["colocated_r1"]["cpu_retention"] is None  # not measured: stays None, no crash
    assert summary.setup_name("colocated_r1#2") == "colocated_r1" and summary.setup_name("teachers_ahead") == "teachers_ahead"
