from pathlib import Path

import pytest
import yaml

from polydistill.cluster.config import ConfigError, apply_overrides, load_config, validate_config

MINIMAL = {"teacher": {"model": "random", "config": {"model_type": "bert"}}, "data": {"path": "/data"}}


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_defaults_fill_in_from_one_place():
    config = validate_config(MINIMAL)
    assert config.distill.temperature == 2.0
    assert config.transport.redis_url is None
    assert config.training.epochs == 1
    assert config.teacher.replicas == 1


def test_unknown_key_names_the_field_path(tmp_path):
    raw = {**MINIMAL, "distill": {"temprature": 3}}
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, raw))
    assert "distill.temprature" in str(info.value)
    assert "unknown key" in str(info.value)


def test_every_problem_is_listed_with_its_path():
    raw = {**MINIMAL, "training": {"epochs": 0, "batch_size": -1}}
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    message = str(info.value)
    assert "training.epochs" in message and "training.batch_size" in message
    assert "2 problem(s)" in message


def test_missing_required_section():
    with pytest.raises(ConfigError, match=r"data: required"):
        validate_config({"teacher": {"model": "x"}})


def test_both_loss_weights_zero_is_refused():
    with pytest.raises(ConfigError, match="learn nothing"):
        validate_config({**MINIMAL, "distill": {"soft_weight": 0, "hard_weight": 0}})


def test_overrides_parse_yaml_values(tmp_path):
    config = load_config(
        write(tmp_path, MINIMAL),
        ["training.epochs=3", "data.languages=[eng_Latn, fra_Latn]", "distill.top_k=null", "transport.max_work_backlog=4"],
    )
    assert config.training.epochs == 3
    assert config.data.languages == ["eng_Latn", "fra_Latn"]
    assert config.distill.top_k is None
    assert config.transport.max_work_backlog == 4


def test_override_errors_say_what_is_expected():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides({}, ["training.epochs"])
    with pytest.raises(ConfigError, match="holds a value"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_override_does_not_mutate_the_input():
    raw = {"training": {"epochs": 1}}
    apply_overrides(raw, ["training.epochs=5"])
    assert raw == {"training": {"epochs": 1}}


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    raw = {**MINIMAL, "data": {"path": "../data"}}
    config = load_config(write(tmp_path, raw))
    assert config.data.path == str((tmp_path / "../data").resolve())


def test_hub_names_are_not_treated_as_paths(tmp_path):
    raw = {**MINIMAL, "teacher": {"model": "intfloat/multilingual-e5-small"}}
    assert load_config(write(tmp_path, raw)).teacher.model == "intfloat/multilingual-e5-small"


def test_job_id_defaults_to_output_dir_name():
    config = validate_config({**MINIMAL, "output_dir": "/tmp/my run"})
    assert config.resolved_job_id == "my-run"


def test_bad_job_id_and_redis_scheme():
    with pytest.raises(ConfigError) as info:
        validate_config({**MINIMAL, "job_id": "a:b", "transport": {"redis_url": "http://x"}})
    assert "job_id" in str(info.value) and "transport.redis_url" in str(info.value)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_example_configs_are_valid():
    examples = Path(__file__).resolve().parents[2] / "examples"
    for path in sorted(examples.glob("*.yaml")):
        load_config(path)


def test_teacher_autoscaling_is_optional_and_strict():
    assert validate_config(MINIMAL).teacher.autoscaling is None
    raw = {**MINIMAL, "teacher": {**MINIMAL["teacher"], "replicas": 2,
                                  "autoscaling": {"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 5}}}
    scaling = validate_config(raw).teacher.autoscaling
    assert (scaling.min_replicas, scaling.max_replicas, scaling.upscale_delay_s) == (1, 4, 5)
    assert scaling.downscale_delay_s == 300.0  # the policy's own default, defined once in cluster/autoscaling.py
    with pytest.raises(ConfigError, match="teacher.autoscaling.max_replica: unknown key"):
        validate_config({**MINIMAL, "teacher": {**MINIMAL["teacher"], "autoscaling": {"max_replica": 3}}})


def test_initial_replicas_must_lie_within_the_autoscaling_bounds():
    raw = {**MINIMAL, "teacher": {**MINIMAL["teacher"], "replicas": 5, "autoscaling": {"max_replicas": 4}}}
    with pytest.raises(ConfigError, match=r"teacher.replicas \(5\) is the initial pool size"):
        validate_config(raw)


def test_password_env_names_a_variable_and_excludes_a_literal_password():
    from polydistill.cluster.config import with_redis_password

    config = validate_config({**MINIMAL, "transport": {"redis_url": "redis://h:1", "password_env": "PD_REDIS_PW"}})
    assert config.transport.password is None
    resolved = with_redis_password(config, {"PD_REDIS_PW": "s3cret"})
    assert resolved.transport.password == "s3cret" and resolved.transport.password_env == "PD_REDIS_PW"
    assert with_redis_password(validate_config(MINIMAL), {}) is not None
    with pytest.raises(ConfigError, match="names PD_REDIS_PW, but that environment variable is not set"):
        with_redis_password(config, {})
    with pytest.raises(ConfigError, match="in one place"):
        validate_config({**MINIMAL, "transport": {"password": "x", "password_env": "PD_REDIS_PW"}})
    with pytest.raises(ConfigError, match="transport.password_env"):
        validate_config({**MINIMAL, "transport": {"password_env": "not a name"}})


def test_balanced_epochs_and_the_knowledge_cache_are_refused_together_at_load():
    examples = Path(__file__).resolve().parents[2] / "examples"
    with pytest.raises(ConfigError, match="data.balance.*knowledge_cache.enabled: false"):
        load_config(examples / "tiny.yaml", ["data.balance={alpha: 0.3}", "knowledge_cache.enabled=true"])
