"""ray_cluster.yaml passes Ray's own cluster-launcher validation, offline, and agrees with
examples/cluster.yaml on the custom resources that steer teachers and students to their nodes.

The validation is the one `ray up` runs before it talks to the cloud: prepare_config (merge with
the provider's defaults.yaml, merge setup commands, fill per-type worker counts) followed by
validate_config (ray-schema.json plus the cross-field checks). Neither needs credentials or network.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from polydistill.cluster.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
JOB_YAML = ROOT / "examples" / "cluster.yaml"

pytest.importorskip("jsonschema", reason="Ray's config validation needs jsonschema (ray[default])")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def prepared(raw: dict) -> dict:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def node_types(config: dict) -> dict:
    return config["available_node_types"]


def test_passes_ray_schema_validation(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["cluster_name"] == "polydistill"


def test_validation_would_catch_a_misspelt_key(raw):
    """Guards the guard: the schema check really runs on our file's shape."""
    import jsonschema

    broken = copy.deepcopy(raw)
    broken["available_node_types"]["teacher"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_head_runs_no_work(raw, prepared):
    head = node_types(raw)[raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert "GPU" not in head["resources"]
    assert node_types(prepared)[raw["head_node_type"]]["max_workers"] == 0


def test_teacher_nodes_autoscale_from_zero_with_gpu_and_teacher_slot(raw):
    teacher = node_types(raw)["teacher"]
    assert teacher["min_workers"] == 0
    assert teacher["max_workers"] >= 1
    assert teacher["resources"]["GPU"] >= 1
    assert teacher["resources"]["teacher_slot"] >= 1
    assert "student_slot" not in teacher["resources"]


def test_student_nodes_carry_student_slot_only(raw):
    student = node_types(raw)["student"]
    assert student["resources"]["student_slot"] >= 1
    assert "teacher_slot" not in student["resources"]


def test_node_type_bounds_fit_the_global_max(raw):
    assert sum(t.get("max_workers", 0) for t in node_types(raw).values()) <= raw["max_workers"]
    assert raw["idle_timeout_minutes"] > 0


def test_setup_installs_the_project_with_cuda_torch_on_workers(prepared):
    workers = " ".join(prepared["worker_setup_commands"])
    assert '--index-url "$TORCH_CUDA_INDEX"' in workers
    assert workers.index("torch") < workers.index("~/polydistill")
    assert any("polydistill" in cmd for cmd in prepared["head_setup_commands"])


def test_job_config_validates_and_names_the_cluster_resources(raw):
    job = load_config(JOB_YAML)
    types = node_types(raw)
    teacher_types = [name for name, t in types.items() if set(job.teacher.resources) <= set(t["resources"])]
    student_types = [name for name, t in types.items() if set(job.student.resources) <= set(t["resources"])]
    assert job.teacher.resources == {"teacher_slot": 1}
    assert job.student.resources == {"student_slot": 1}
    assert teacher_types == ["teacher"], "teacher replicas must fit exactly one node type"
    assert student_types == ["student"], "the student must fit exactly one node type"
    assert job.teacher.num_gpus <= types["teacher"]["resources"]["GPU"]
    assert job.teacher.num_cpus <= types["teacher"]["resources"]["CPU"]
    assert job.student.num_gpus <= types["student"]["resources"].get("GPU", 0)
    assert job.student.num_cpus <= types["student"]["resources"]["CPU"]
    assert job.transport.redis_url and job.transport.redis_url.startswith("rediss://")
