"""Heavy stages as Ray tasks (cluster/stages.py) on a local Ray: the result and where it ran come back,
the stage gets the threads it asked for, and a stage's own error reaches the driver as itself (what
the user must change), not wrapped in a Ray traceback. Placement across nodes: tests/cluster/test_multinode.py."""

from __future__ import annotations

import sys

import pytest
import ray

from polydistill.cluster.config import ConfigError, StageResources
from polydistill.cluster.stages import log_like_the_driver, run_stage, stage_options

pytestmark = pytest.mark.integration

# The stage functions below live in this test module, which Ray's workers cannot import: send them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _threads_and_device(label: str, *, device, threads: int) -> tuple[str, str, int]:
    import torch

    return label, device.type, torch.get_num_threads()


def _refuses(*, device, threads: int) -> None:
    raise ConfigError("data.max_length is 1024, longer than the teacher's 512 positions: set it to 512 at most")


def test_a_stage_returns_its_result_and_where_it_ran(local_ray):
    result, where = run_stage("probe", _threads_and_device, "x", resources=StageResources(num_cpus=1, threads=2))
    assert result == ("x", "cpu", 2)
    assert where.node_id == ray.get_runtime_context().get_node_id()  # the only node here
    assert where.device == "cpu" and where.threads == 2 and where.seconds >= 0


def test_a_stages_own_error_reaches_the_driver_unwrapped(local_ray):
    with pytest.raises(ConfigError, match="set it to 512 at most") as caught:
        run_stage("refuses", _refuses, resources=StageResources(num_cpus=1))
    assert not isinstance(caught.value, ray.exceptions.RayError)


def test_stage_options_name_the_task_and_ask_for_what_the_config_says():
    asked = StageResources(num_cpus=2, num_gpus=1, resources={"trainer": 1})
    assert stage_options("evaluate", asked) == {"name": "polydistill:evaluate", "num_cpus": 2, "num_gpus": 1,
                                                "resources": {"trainer": 1}, "max_retries": 0}
    # Compression runs on CPU whatever it is given; an ablation beside distillation claims no CPU.
    assert stage_options("compress", asked, gpus=False)["num_gpus"] == 0
    assert stage_options("ablation", asked, num_cpus=0)["num_cpus"] == 0


def test_a_stage_logs_at_the_drivers_level(capfd):
    import logging

    logger = logging.getLogger("polydistill")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    try:
        logger.handlers.clear()
        log_like_the_driver(logging.INFO)  # as in a stage's worker, whose root logger has no handler
        logging.getLogger("polydistill.student.supervised").info("fine-tuning teacher: step 132/526: dev 80.1%")
        assert "INFO polydistill.student.supervised: fine-tuning teacher: step 132/526: dev 80.1%" in capfd.readouterr().err
    finally:
        logger.setLevel(saved[0])
        logger.handlers[:] = saved[1]
        logger.propagate = saved[2]


def _finetune(config, source: str, splits, out_dir, *, device, threads: int) -> dict:
    from polydistill.student.finetune import finetune_teacher

    return finetune_teacher(config, source, splits, out_dir, show_progress=False, device=device)


@pytest.mark.slow
def test_fine_tuning_in_a_stage_gives_the_weights_it_gives_in_the_driver(tmp_path, local_ray):
    """The stage move changes where the teacher is fine-tuned, not what comes out: the same recipe, on the same
    machine and threads, gives bit-identical weights in a Ray task and in the driver's own process, whatever
    the driver did with torch's generator before."""
    import torch
    from safetensors.torch import load_file

    from polydistill.storage.job_data import load_job_split
    from polydistill.storage.teacher_splits import teacher_splits
    from tests.unit.test_finetune_cache import job, tiny_teacher, write_data

    config = job(write_data(tmp_path / "data"), teacher={"finetune_epochs": 1, "finetune_lr": 1e-3}, max_length=16)
    splits = teacher_splits(config.data, load_job_split(config.data, config.data.train_split))
    source = tiny_teacher(splits.train, tmp_path / "pretrained", encoder_only=True)  # a new head is drawn
    threads = 2
    run_stage("finetune", _finetune, config, str(source), splits, tmp_path / "in-stage",
              resources=StageResources(num_cpus=1, threads=threads))
    torch.set_num_threads(threads)
    torch.rand(1000)  # the driver's generator, moved on by whatever ran before
    _finetune(config, str(source), splits, tmp_path / "in-driver", device=torch.device("cpu"), threads=threads)
    in_stage, in_driver = (load_file(tmp_path / where / "model.safetensors") for where in ("in-stage", "in-driver"))
    assert in_stage.keys() == in_driver.keys()
    assert all(torch.equal(in_stage[name], in_driver[name]) for name in in_stage)
