"""The driver: runs one distillation job from a validated config to its report.

    prepare models ─▶ start feeder, teacher replicas, student ─▶ watch progress ─▶ stop actors
    ─▶ evaluate ─▶ report.json (+ report.md, plots)

Every check that can fail fast (config, data, model shapes) runs before any actor starts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import ray

from actors.shells import FeederActor, StudentActor, TeacherActor
from cluster.config import JobConfig
from cluster.progress import ProgressDisplay
from cluster.services import ray_for, redis_for
from storage.keys import TEACHER_GROUP, JobKeys
from storage.streams import JobStreams, connect, redact_url
from student.build import check_classifier_labels, materialize_random_teacher
from storage.job_data import load_job_split
from storage.model_sources import resolve_model_source

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """The job ran but did not complete with exact accounting."""


def prepare_teacher(config: JobConfig, out_dir: Path) -> tuple[Path, list[str]]:
    """Returns the directory every teacher replica loads, and the label names in model order."""
    train = load_job_split(config.data, config.data.train_split)
    teacher_dir = out_dir / "teacher"
    if config.teacher.model == "random":
        if not (teacher_dir / "config.json").exists():
            materialize_random_teacher(config.teacher, train.label_names, train.dataset.with_format(None)["text"][:], teacher_dir,
                                       config.training.seed)
        return teacher_dir, train.label_names
    from student.finetune import ensure_finetuned_teacher  # heavy import, only for pretrained teachers

    source = resolve_model_source(config.teacher.model)
    teacher_dir = ensure_finetuned_teacher(config, source, train, teacher_dir)
    from transformers import AutoConfig

    check_classifier_labels(AutoConfig.from_pretrained(teacher_dir), train.label_names, "teacher.model")
    return teacher_dir, train.label_names


def _actor_options(num_cpus: float, num_gpus: float, resources: dict[str, float]) -> dict:
    return {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": dict(resources), "max_restarts": 0}


def run_job(config: JobConfig, show_progress: bool = True) -> dict:
    out_dir = Path(config.output_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    teacher_dir, label_names = prepare_teacher(config, out_dir)
    with redis_for(config) as redis_url, ray_for(config):
        log.info("job %s: redis %s", config.resolved_job_id, redact_url(redis_url))
        result = _distill(config, teacher_dir, redis_url, out_dir, show_progress)
    result["wall_seconds"] = round(time.perf_counter() - started, 2)
    report = _report(config, result, label_names)
    if config.data.eval_split:
        from student.evaluate import evaluate_job  # imports the metrics stack only when needed

        report.update(evaluate_job(config, teacher_dir, Path(report["student_path"]), label_names))
    _write_report(report, out_dir)
    if report["samples_distilled"] != report["samples_expected"] or report["batches_missing"]:
        raise JobFailed(
            f"accounting mismatch: {report['samples_distilled']} samples distilled, "
            f"{report['samples_expected']} expected; see {out_dir / 'report.json'}"
        )
    return report


def _distill(config: JobConfig, teacher_dir: Path, redis_url: str, out_dir: Path, show_progress: bool) -> dict:
    keys = JobKeys(config.resolved_job_id, config.transport.namespace)
    streams = JobStreams(
        connect(redis_url, password=config.transport.password, tls_ca_file=config.transport.tls_ca_file), keys
    )
    # A fresh run starts from empty streams: leftovers of an earlier run under the same job id
    # would otherwise be distilled twice.
    streams.delete_job_keys()
    streams.ensure_group(keys.work_stream, TEACHER_GROUP)
    streams.ensure_group(keys.knowledge_stream, keys.student_group("student"))

    feeder = FeederActor.options(num_cpus=0, max_restarts=0).remote(config, str(teacher_dir), redis_url)
    plan, _, cleaning = ray.get(feeder.plan.remote())
    teacher_opts = _actor_options(config.teacher.num_cpus, config.teacher.num_gpus, config.teacher.resources)
    teachers = [
        TeacherActor.options(**teacher_opts).remote(f"teacher-{i}", config, str(teacher_dir), redis_url)
        for i in range(config.teacher.replicas)
    ]
    student_opts = _actor_options(config.student.num_cpus, config.student.num_gpus, config.student.resources)
    student = StudentActor.options(**student_opts).remote(
        config, str(teacher_dir), plan.batches_per_epoch, redis_url, str(out_dir / "student")
    )
    feed_ref = feeder.feed.remote()
    serve_refs = [teacher.serve.remote() for teacher in teachers]
    train_ref = student.train.remote()

    expected = plan.samples_per_epoch * plan.epochs
    with ProgressDisplay(expected, enabled=show_progress) as display:
        try:
            training = _wait_for_student(train_ref, [feed_ref, *serve_refs], streams, keys, display)
            display.update({"samples": str(training["samples_distilled"]), "loss": str(training["final_loss"])})
        finally:
            streams.client.hset(keys.control, "stop", "1")
    teacher_stats = ray.get(serve_refs, timeout=120)
    batches_fed = ray.get(feed_ref, timeout=120)
    dead_letters = streams.client.xlen(keys.dead_letter_stream)
    streams.delete_job_keys()
    for actor in [feeder, student, *teachers]:
        ray.kill(actor)
    return {
        "plan": asdict(plan),
        "cleaning": cleaning,
        "training": training,
        "teachers": teacher_stats,
        "batches_fed": batches_fed,
        "dead_letters": dead_letters,
    }


def _wait_for_student(train_ref, helper_refs, streams: JobStreams, keys: JobKeys, display: ProgressDisplay) -> dict:
    """Waits for the student while surfacing the first failure of any actor at once."""
    watching = list(helper_refs)
    while True:
        ready, _ = ray.wait([train_ref], timeout=0.5)
        if ready:
            return ray.get(train_ref)
        done, watching = ray.wait(watching, num_returns=len(watching), timeout=0)
        for ref in done:
            ray.get(ref)  # raises the actor's error; a feeder that finished cleanly returns here
        progress = streams.client.hgetall(keys.progress)
        display.update({k.decode(): v.decode() for k, v in progress.items()})


def _report(config: JobConfig, result: dict, label_names: list[str]) -> dict:
    plan, training = result["plan"], result["training"]
    expected = plan["samples_per_epoch"] * plan["epochs"]
    return {
        "job_id": config.resolved_job_id,
        "samples_expected": expected,
        "samples_distilled": training["samples_distilled"],
        "samples_per_epoch": training["samples_per_epoch"],
        "batches_expected": plan["batches_per_epoch"] * plan["epochs"],
        "batches_applied": training["batches_applied"],
        "batches_missing": plan["batches_per_epoch"] * plan["epochs"] - training["batches_applied"],
        "batches_fed": result["batches_fed"],
        "duplicates_dropped": training["duplicates_dropped"],
        "dead_letters": result["dead_letters"],
        "epochs": plan["epochs"],
        "teacher_replicas": config.teacher.replicas,
        "teachers": result["teachers"],
        "wall_seconds": result["wall_seconds"],
        "student_seconds": {
            "total": training["wall_seconds"],
            "waiting_for_knowledge": training["wait_seconds"],
            "training": training["compute_seconds"],
        },
        "student_path": training["student_path"],
        "final_loss": training["final_loss"],
        "loss_history": training["loss_history"],
        "labels": label_names,
        "samples_per_language": plan["samples_per_language"],
        "cleaning": result["cleaning"],
        "config": config.model_dump(mode="json", exclude={"transport": {"password", "redis_url"}}),
    }


def _write_report(report: dict, out_dir: Path) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    from student.report import write_report

    write_report(report, out_dir)
