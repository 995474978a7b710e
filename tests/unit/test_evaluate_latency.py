"""The report's speed-ups: the teacher and every distilled student timed in the same rounds, each ratio
taken from those latencies; ablations not timed."""

from __future__ import annotations

import shutil

import pytest

from polydistill.storage.job_data import load_job_split
from polydistill.student import evaluate
from tests.unit.test_finetune_cache import job, tiny_teacher, write_data


def test_teacher_and_students_are_timed_together_and_the_speedups_are_their_ratios(tmp_path, monkeypatch):
    config = job(write_data(tmp_path / "data"))
    train = load_job_split(config.data, config.data.train_split)
    teacher = tiny_teacher(train, tmp_path / "teacher")
    for name in ("student", "tiny", "ablation"):
        shutil.copytree(teacher, tmp_path / name)

    calls = []
    # Milliseconds a unit: the teacher 100 at batch 1 and 800 at batch 32, each student a fraction of it.
    fraction = {"teacher": 1.0, "student": 0.25, "tiny": 0.125}

    def timed_together(work, *, rounds):
        calls.append((sorted(work), rounds))
        for unit in work.values():
            unit.run()  # the work is real: each model's forward passes over the latency sample
        return {(name, figure): (100.0 if figure.endswith("batch1") else 800.0) * fraction[name]
                for name, figure in work}

    monkeypatch.setattr(evaluate, "interleaved_latency_ms", timed_together)
    report = evaluate.evaluate_job(config.model_copy(update={"evaluation": config.evaluation.model_copy(
        update={"latency_rounds": 7})}), teacher, tmp_path / "student", train.label_names,
        {"tiny": tmp_path / "tiny", "ablation": tmp_path / "ablation"}, threads=1)

    figures = ["latency_ms_batch1", "latency_ms_batch32"]
    assert calls == [(sorted((name, figure) for name in ("teacher", "student", "tiny") for figure in figures), 7)]
    costs = report["efficiency"]
    assert "ablation" not in costs
    assert costs["teacher"]["latency_ms_batch32"] == 800.0
    assert costs["tiny"]["samples_per_s_batch32"] == pytest.approx(32e3 / 100.0)
    assert (costs["speedup_batch1"], costs["speedup_batch32"]) == (4.0, 4.0)
    assert (costs["tiny"]["speedup_batch1"], costs["tiny"]["speedup_batch32"]) == (8.0, 8.0)
