"""A teacher not worth distilling stops `polydistill run` before any actor starts (exit status 2, a
message with the numbers); with teacher.allow_weak the same teacher is distilled and the report
says what it is worth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polydistill.cluster.cli import main
from polydistill.cluster.config import load_config
from polydistill.cluster.exit_codes import EXIT_BAD_INPUT
from polydistill.storage.job_data import load_job_split
from polydistill.student.build import materialize_random_teacher

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"
pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Two languages, 80 training rows each (5 batches of 32 an epoch), 80 of the data's own dev rows each.
SMALL = ["data.languages=[eng_Latn, swh_Latn]", "data.limit_per_language=80", "training.epochs=1",
         "teacher.replicas=1", "evaluation.latency=false", "evaluation.ablation=true"]


def pretrained_stand_in(folder: Path) -> Path:
    """A tiny BERT with random weights saved as a checkpoint, as a pretrained encoder would be."""
    config = load_config(TINY, SMALL)
    train = load_job_split(config.data, config.data.train_split)
    return materialize_random_teacher(config.teacher, train.label_names, train.dataset["text"], folder, seed=0)


def run(out: Path, *settings: str) -> int:
    return main(["run", str(TINY), "--output", str(out), "--no-progress",
                 *(part for setting in [*SMALL, *settings] for part in ("--set", setting))])


def test_an_under_trained_teacher_is_refused_and_distilled_only_when_allowed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POLYDISTILL_CACHE", str(tmp_path / "cache"))  # the fine-tuned teacher's cache
    one_step = [f"teacher.model={pretrained_stand_in(tmp_path / 'pretrained')}", "teacher.finetune_epochs=0.2"]

    refused = tmp_path / "refused"
    assert run(refused, *one_step) == EXIT_BAD_INPUT
    message = capsys.readouterr().err
    assert "is not worth distilling: on the dev split 'dev' (160 rows, the data's own) it scores" in message
    assert "teacher.min_margin asks for 2 points above the strongest baseline (baselines: majority class" in message
    assert "short hard-label student" in message and "%" in message
    assert "teacher.finetune_epochs, the most epochs, is 0.2" in message and "teacher.allow_weak: true" in message
    record = json.loads((refused / "teacher_finetune.json").read_text())
    assert record["gate"]["status"] == "refused" and record["fine_tuning"]["steps_trained"] == 1
    assert [point["step"] for point in record["fine_tuning"]["curve"]] == [1]
    assert record["gate"]["teacher"]["overall"] == record["fine_tuning"]["dev_accuracy"]  # the kept step's score
    assert f"{100 * record['gate']['teacher']['overall']:.1f}%" in message
    assert not (refused / "report.json").exists()  # nothing was distilled

    allowed = tmp_path / "allowed"
    assert run(allowed, *one_step, "teacher.allow_weak=true") == 0
    report = json.loads((allowed / "report.json").read_text())
    section = report["teacher_finetune"]
    assert section["gate"]["status"] == "weak_allowed" and section["fine_tuning"]["reused"]
    assert section["gate"]["teacher"] == record["gate"]["teacher"]  # the same teacher, from the cache
    assert set(section["gate"]["baselines"]) == {"majority_class", "hard_label_student"}
    markdown = (allowed / "report.md").read_text()
    assert markdown.startswith("# Distillation report\n\n## Teacher, baselines and flags")
    assert "Teacher gate NOT passed (distilled anyway: teacher.allow_weak)" in markdown
    assert "- overall: teacher not 2 points above the" in markdown
