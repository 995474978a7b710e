"""The heavy stages of a job as Ray tasks, so that the driver only orchestrates.

On a cluster the driver lives on the head node, which ``ray_cluster.yaml`` keeps free of work: preparing
the teacher (fine-tuning it, the teacher gate), the extra tasks' teachers, the teacher's alignment targets
(``distill.align_language``), the hard-label ablations, the evaluation of every model and compression each
run as a Ray task that asks for the resources the config names
(``JobConfig.finetune_resources``: the teacher replicas' by default; ``JobConfig.evaluation_resources``:
the student's), on the GPU Ray gives the task when it asks for one (student/devices.py), with as many
torch threads as ``threads`` says (every core of its node by default, as in one process before).

Every stage answers with its result and where it ran (``StagePlacement``): the report's
``stage_placement`` section names the node and device of each, and the Ray dashboard shows each task
under its stage's name. The stages read and write the job's output directory, which on several nodes
must be storage they all share, as the checkpoints already require (docs/cluster.md).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray

from polydistill.cluster.config import ConfigError, JobConfig, StageResources
from polydistill.cluster.failures import exit_status_of
from polydistill.storage.job_data import JobSplit, load_job_split


@dataclass(frozen=True)
class StagePlacement:
    """Where a stage ran: the Ray node (its id and address), the torch device, its threads, and how long."""

    node_id: str
    node_ip: str
    device: str
    threads: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stage_options(name: str, resources: StageResources, *, gpus: bool = True, num_cpus: float | None = None) -> dict:
    """The Ray task options of a stage. ``gpus=False``: a stage that runs on CPU whatever it is given
    (compression) asks for no GPU; ``num_cpus``: what the stage claims instead of ``resources.num_cpus``."""
    return {
        "name": f"polydistill:{name}",
        "num_cpus": resources.num_cpus if num_cpus is None else num_cpus,
        "num_gpus": resources.num_gpus if gpus else 0,
        "resources": dict(resources.resources),
        "max_retries": 0,  # a stage that failed would fail the same way again; the driver reports it
    }


def log_like_the_driver(level: int) -> None:
    """In a stage's worker, the project's log records at the driver's level (``--verbose``: INFO, such as
    each dev score of fine-tuning) go to stderr, which Ray forwards to the driver; a Ray worker's root
    logger has no handler, and Python's last resort prints warnings only."""
    logger = logging.getLogger("polydistill")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


@ray.remote
def _stage_task(function: Callable[..., Any], args: tuple, kwargs: dict, num_gpus: float,
                threads: int | None, log_level: int) -> tuple[Any, StagePlacement]:
    import torch

    from polydistill.cluster.quiet import quiet_libraries
    from polydistill.student.devices import stage_device

    quiet_libraries()
    log_like_the_driver(log_level)
    started = time.perf_counter()
    device = stage_device(num_gpus)
    threads = threads or os.cpu_count() or 1  # Ray sets OMP_NUM_THREADS to the task's CPUs; the config decides
    torch.set_num_threads(threads)
    result = function(*args, **kwargs, device=device, threads=threads)
    context = ray.get_runtime_context()
    node_ip = ray.util.get_node_ip_address()
    return result, StagePlacement(context.get_node_id(), node_ip, device.type, threads,
                                  round(time.perf_counter() - started, 2))


def submit_stage(name: str, function: Callable[..., Any], *args: Any, resources: StageResources, gpus: bool = True,
                 num_cpus: float | None = None, **kwargs: Any) -> ray.ObjectRef:
    """Starts ``function(*args, **kwargs, device=..., threads=...)`` as the Ray task of stage ``name``."""
    options = stage_options(name, resources, gpus=gpus, num_cpus=num_cpus)
    log_level = logging.getLogger("polydistill").getEffectiveLevel()
    return _stage_task.options(**options).remote(function, args, kwargs, options["num_gpus"], resources.threads,
                                                 log_level)


def stage_result(ref: ray.ObjectRef) -> tuple[Any, StagePlacement]:
    """A stage's result and placement; the stage's own error as it was raised (a refused teacher, a config
    error: what the user must change, not a Ray traceback). Ctrl-C cancels the stage and passes on."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        # A refused teacher, a bad config or input: the one line the command line prints. Anything else is
        # a bug, raised with the worker's traceback (the RayTaskError's text).
        if exit_status_of(error.cause) is not None:
            raise error.cause from None
        raise
    except KeyboardInterrupt:
        ray.cancel(ref, force=True)
        raise


def runs_beside_actors(resources: StageResources) -> bool:
    """Whether a stage with these resources can run while the job's actors hold theirs: one that asks
    for no GPU and no custom resource claims only (zero) CPU beside them (the ablations, on one thread)."""
    return resources.num_gpus == 0 and not resources.resources


def check_stage_resources(config: JobConfig, offered: Mapping[str, float]) -> None:
    """Refuses, before any stage waits forever, a stage resource the Ray this job started does not offer
    (``offered``: ``ray.cluster_resources()`` of a local Ray; a cluster's autoscaler may add nodes later)."""
    stages = (("teacher.finetune_resources", config.teacher.finetune_resources, config.finetune_resources,
               "teacher.num_gpus / teacher.resources"),
              ("evaluation.resources", config.evaluation.resources, config.evaluation_resources,
               "student.num_gpus / student.resources"))
    for setting, given, resources, default_from in stages:
        wanted = {"GPU": resources.num_gpus, **resources.resources}
        short = {key: value for key, value in wanted.items() if value > offered.get(key, 0.0)}
        if short:
            what = ", ".join(f"{key} {value:g} (offered: {offered.get(key, 0.0):g})" for key, value in short.items())
            source = setting if given is not None else f"{setting} (by default {default_from})"
            raise ConfigError(f"{source} asks for {what}, which the local Ray on this machine does not have: "
                              "ask for less, or run on a Ray cluster that offers it (RAY_ADDRESS)")


def run_stage(name: str, function: Callable[..., Any], *args: Any, resources: StageResources, gpus: bool = True,
              **kwargs: Any) -> tuple[Any, StagePlacement]:
    """Runs stage ``name`` as a Ray task and waits for it."""
    return stage_result(submit_stage(name, function, *args, resources=resources, gpus=gpus, **kwargs))


# -- the stages: each takes the device and threads its task was given -----------------------------------
def prepare_teachers_stage(config: JobConfig, out_dir: Path, train: JobSplit, show_progress: bool, *,
                           device, threads: int) -> dict[str, Path]:
    from polydistill.cluster.teachers import prepare_teachers

    return prepare_teachers(config, out_dir, train, show_progress, device)


def task_teachers_stage(config: JobConfig, out_dir: Path, main_teacher_dir: Path, show_progress: bool, *,
                        device, threads: int) -> dict[str, tuple[Path, JobSplit]]:
    from polydistill.cluster.tasks import prepare_task_teachers

    return prepare_task_teachers(config, out_dir, main_teacher_dir, show_progress, device)


def alignment_targets_stage(config: JobConfig, teacher_dir: Path, out_dir: Path, *, device,
                            threads: int) -> Path | None:
    from polydistill.cluster.prepare import prepare_alignment_targets

    train = load_job_split(config.data, config.data.train_split)
    return prepare_alignment_targets(config, teacher_dir, out_dir, train, device)


def ablation_stage(config: JobConfig, student_init_dir: str, out_dir: str, *, device, threads: int) -> str:
    from polydistill.student.evaluate import train_ablation

    train = load_job_split(config.data, config.data.train_split)
    return str(train_ablation(config, Path(student_init_dir), Path(out_dir), train, show_progress=False,
                              threads=threads, device=device))


def evaluate_stage(config: JobConfig, teacher_dir: Path, student_dir: Path, label_names: list[str],
                   extra_models: dict[str, Path], task_teachers: dict[str, tuple[Path, JobSplit]], *,
                   device, threads: int) -> tuple[dict, dict[str, dict]]:
    """The job's held-out evaluation of every model, and each extra task's."""
    from polydistill.cluster.tasks import evaluate_tasks
    from polydistill.student.evaluate import evaluate_job

    report = evaluate_job(config, teacher_dir, student_dir, label_names, extra_models, threads=threads,
                          device=device)
    tasks = evaluate_tasks(config, task_teachers, student_dir, threads=threads, device=device) if task_teachers else {}
    return report, tasks


def compress_stage(config: JobConfig, teacher_dir: Path, student_dir: Path, label_names: list[str], out_dir: Path, *,
                   device, threads: int) -> dict:
    from polydistill.student.compress_job import compress_job

    return compress_job(config, teacher_dir, student_dir, label_names, out_dir, threads=threads)
