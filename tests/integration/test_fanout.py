"""Several students from one teacher pass: the teacher computes each batch once, and every
student, each through its own consumer group, learns from every sample exactly once."""

from __future__ import annotations

import pytest
from transformers import AutoModelForSequenceClassification

from polydistill.cluster.config import ConfigError, load_config
from polydistill.cluster.driver import run_job
from tests.integration.test_pipeline import EXAMPLES, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = "{name: small, config: {num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}}"


def test_two_students_learn_from_one_teacher_pass(tmp_path, redis_server, redis_client, local_ray):
    # Hidden states mapped 'uniform' ask different teacher layers of the two students: the teacher
    # ships the union, each student takes its own, each through a projection to the teacher's width.
    config = tiny_config(tmp_path, redis_server.url, f"extra_students=[{SMALL}]", "distill.hidden_layers=uniform",
                         "distill.hidden_weight=1.0", "transport.max_knowledge_backlog=4")
    report = run_job(config, show_progress=False)

    expected = report["samples_expected"]
    assert expected == 800
    # The teacher pass happened once: the replicas computed each sample once, not once per student.
    assert sum(t["samples"] for t in report["teachers"]) == expected
    small = report["extra_students"]["small"]
    for student in (report, small):
        assert student["samples_distilled"] == expected
        assert student["samples_per_epoch"] == {"0": 400, "1": 400}
        assert student["duplicates_dropped"] == 0
    assert small["student_path"].endswith("students/small/student")
    # Evaluated beside the teacher and the main student on the same held-out rows.
    assert 0 <= report["per_language"]["eng_Latn"]["small"]["accuracy"] <= 1
    assert "small" in report["overall"]["language_average"]

    model = AutoModelForSequenceClassification.from_pretrained(small["student_path"])
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32
    assert list(redis_client.scan_iter(match=f"polydistill:{config.resolved_job_id}:*")) == []


def test_extra_student_names_must_be_distinct(tmp_path):
    with pytest.raises(ConfigError, match="extra_students.*'small' is taken"):
        load_config(EXAMPLES / "tiny.yaml", [f"extra_students=[{SMALL}, {SMALL}]"], output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="'student' is taken|is taken"):
        load_config(EXAMPLES / "tiny.yaml", ["extra_students=[{name: student}]"], output_dir=str(tmp_path))


@pytest.mark.heavy
def test_a_killed_student_of_two_comes_back_and_neither_loses_a_sample(tmp_path, redis_server, local_ray):
    from tests.integration.test_faults import Injector, assert_exact, fault_config, kill_one

    config = fault_config(tmp_path, redis_server.url, f"extra_students=[{SMALL}]")
    # The injector watches the main student's progress; the victim is either student, at random.
    injector = Injector("fanout", config, redis_server.url, lambda: kill_one("StudentActor", injector.rng))
    injector.start()
    report = run_job(config, show_progress=False)
    injector.check()
    assert_exact(report)
    small = report["extra_students"]["small"]
    assert small["samples_distilled"] == 400 and small["samples_per_epoch"] == {"0": 200, "1": 200}
    assert small["steps"] == report["batches_expected"], "a batch was applied twice (or skipped)"
    [recovery] = report["recoveries"]
    assert recovery["student_restarted"]
