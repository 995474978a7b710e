"""What the heavy stages ask Ray for (cluster/stages.py, cluster/config.py): pure decisions, no Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from polydistill.cluster.config import ConfigError, StageResources, load_config
from polydistill.cluster.services import logical_cpus_needed
from polydistill.cluster.stages import check_stage_resources, runs_beside_actors

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"


def test_stages_default_to_the_teachers_and_the_students_resources():
    config = load_config(TINY, ["teacher.num_gpus=1", "teacher.resources={teacher_slot: 1}",
                                "student.num_cpus=4", "student.resources={student_slot: 1}"])
    assert config.finetune_resources == StageResources(num_cpus=0.5, num_gpus=1, resources={"teacher_slot": 1})
    assert config.evaluation_resources == StageResources(num_cpus=4, resources={"student_slot": 1})
    own = load_config(TINY, ["evaluation.resources={num_cpus: 2, threads: 3}"])
    assert own.evaluation_resources == StageResources(num_cpus=2, threads=3)


def test_only_a_stage_that_needs_nothing_the_student_holds_runs_beside_it():
    assert runs_beside_actors(StageResources(num_cpus=1))
    assert not runs_beside_actors(StageResources(num_gpus=1))
    assert not runs_beside_actors(StageResources(resources={"student_slot": 1}))


def test_a_local_ray_counts_the_largest_stage_and_refuses_what_it_lacks():
    config = load_config(TINY, ["evaluation.resources={num_cpus: 8}"])
    assert logical_cpus_needed(config) == 8
    check_stage_resources(config, {"CPU": 8.0})
    wants_gpu = load_config(TINY, ["teacher.finetune_resources={num_gpus: 1}"])
    with pytest.raises(ConfigError, match=r"teacher.finetune_resources asks for GPU 1 \(offered: 0\)"):
        check_stage_resources(wants_gpu, {"CPU": 2.0})
    wants_slot = load_config(TINY, ["student.resources={student_slot: 1}"])  # evaluation's default
    with pytest.raises(ConfigError, match=r"evaluation.resources \(by default student.num_gpus / student.resources\) "
                                          "asks for student_slot 1"):
        check_stage_resources(wants_slot, {"CPU": 2.0})
