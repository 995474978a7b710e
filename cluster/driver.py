"""The driver: runs one distillation job from a validated config to its report.

    prepare models ─▶ start feeder, teacher replicas, student ─▶ watch progress ─▶ stop actors
    ─▶ evaluate ─▶ report.json (+ report.md, plots)

Preparing the models is cluster/prepare.py's (several teachers: cluster/teachers.py; several
tasks: cluster/tasks.py); the driver calls them in order and times each stage.

Every check that can fail fast (config, the Redis and who holds the job id, data, model shapes)
runs before any actor starts; the Redis checks run first, before any model is built.
While the job runs, ``cluster/recovery.py`` restarts a dead student from its checkpoint and
re-enqueues whatever a lost student, lost Redis data or lost messages took away.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from polydistill.actors.pool import TeacherPoolActor
from polydistill.actors.shells import CacheWriterActor, FeederActor, StudentActor
from polydistill.cluster.config import ConfigError, JobConfig, StageResources, with_redis_password
from polydistill.cluster.dead_letters import outcome_with_dead_letters, samples_dead_lettered
from polydistill.cluster.prepare import check_student_contract, prepare_student, student_dir
from polydistill.cluster.progress import ProgressDisplay
from polydistill.cluster.tracking import JobTracking, tracked
from polydistill.cluster.recovery import LongCall, StopOverdue, Supervisor
from polydistill.cluster.report_schema import Report
from polydistill.cluster.resume import save_job_config
from polydistill.cluster.services import JobRedis, job_redis, ray_for, stop_job_on_sigterm
from polydistill.cluster.stopping import (
    STOPPED_BY_DRIVER,
    STOPPED_BY_INTERRUPT,
    EndNow,
    InterruptStops,
    JobFailed,
    JobStopped,
    accounting_shortfall,
    job_outcome,
    request_stop,
    stop_from_signal,
    stop_requested_by,
    stopped_from_outside,
)
from polydistill.cluster.stages import (
    ablation_stage,
    alignment_targets_stage,
    check_stage_resources,
    compress_stage,
    evaluate_stage,
    prepare_teachers_stage,
    run_stage,
    runs_beside_actors,
    stage_result,
    submit_stage,
    task_teachers_stage,
)
from polydistill.cluster.tasks import prepare_task_heads
from polydistill.cluster.teachers import check_teachers
from polydistill.storage.keys import CACHE_WRITER_GROUP, TEACHER_GROUP, JobKeys
from polydistill.storage.ownership import JobOwnership, delete_job_keys
from polydistill.storage.knowledge_cache import is_complete
from polydistill.storage.ledger import EpochLedger
from polydistill.storage.streams import JobStreams, RedisUnavailable, connect_job
from polydistill.storage.job_data import has_own_split, load_job_split
from polydistill.student.metrics import ablation_name
from polydistill.student.checkpoint import discard_checkpoint, find_checkpoint
from polydistill.student.evaluate import ablation_validation
from polydistill.student.teacher_gate import read_teacher_record

log = logging.getLogger(__name__)

ACTORS_GONE_TIMEOUT_S = 10.0  # ending at once: how long to wait for killed actors before removing the keys


def _actor_options(num_cpus: float, num_gpus: float, resources: dict[str, float]) -> dict:
    return {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": dict(resources), "max_restarts": 0}


def run_job(config: JobConfig, show_progress: bool = True, resume: bool = False,
            redis_service: JobRedis | None = None,
            on_progress: Callable[[Mapping[str, str]], None] | None = None) -> dict:
    """Runs the job; ``resume=True`` continues from the student's checkpoint in the output directory.
    ``on_progress`` is called with the student's progress hash whenever the driver reads it (a dev score after
    each epoch among its fields, with training.validate_each_epoch); raising ``EndNow`` there ends the job at once.

    Raises ``JobStopped`` when the job was stopped before it completed (its report says "stopped"),
    ``JobFailed`` when it ran to its end without distilling every sample exactly once. Ctrl-C asks
    the job to stop as ``polydistill stop`` does; a second Ctrl-C ends it at once.

    Before anything slow, the job's Redis is checked and the run takes the job id (``job_redis``:
    ``RedisCheckFailed``, ``JobInUse``), unless the caller did (``redis_service``, cluster/cli.py);
    whatever the outcome, the job's keys are removed at the end while they are this run's."""
    out_dir = Path(config.output_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        save_job_config(config, out_dir)  # for `polydistill resume`; no secrets
    started = time.perf_counter()
    stage_seconds: dict[str, float] = {}
    # A fresh run discards an older checkpoint when distilling begins: until then, none is this run's.
    distilling_began = resume
    samples_expected = None  # known once distilling has ended
    held = nullcontext(redis_service) if redis_service is not None else job_redis(config)
    tracking = JobTracking.open(config, out_dir) if config.tracking.enabled else JobTracking([])
    placement: dict[str, dict] = {}  # stage -> the node and device its Ray task ran on (cluster/stages.py)
    with tracked(tracking), InterruptStops() as interrupt, held as redis_service, ExitStack() as on_ray:
        try:
            train = load_job_split(config.data, config.data.train_split)
            check_before_models(config)
            if on_ray.enter_context(ray_for(redis_service)):  # the heavy stages are Ray tasks too
                check_stage_resources(config, ray.cluster_resources())
            # What the stage tasks receive, as the actors do: no password (a task's arguments show in Ray's
            # state API and dashboard), which no stage needs.
            safe = redis_service.config
            teacher_dirs = _stage("prepare_teacher", placement, prepare_teachers_stage, safe, out_dir, train,
                                  show_progress, resources=config.finetune_resources)
            teacher_dir = teacher_dirs["teacher"]
            check_teachers(config, teacher_dirs, train)
            stage_seconds["prepare_teacher"] = _lap(started, stage_seconds)
            task_teachers = (_stage("prepare_task_teachers", placement, task_teachers_stage, safe, out_dir, teacher_dir,
                                    show_progress, resources=config.finetune_resources)
                             if config.extra_tasks else {})
            student_init_dir, student_info = prepare_student(config, teacher_dir, out_dir, train)
            check_student_contract(config, teacher_dir, student_init_dir)
            if task_teachers:
                prepare_task_heads(config, student_init_dir, task_teachers)
            extra_init: dict[str, Path] = {}
            extra_info: dict[str, dict] = {}
            for name in config.student_names[1:]:
                extra_init[name], extra_info[name] = prepare_student(config.for_student(name), teacher_dir, out_dir,
                                                                     train, name)
                check_student_contract(config.for_student(name), teacher_dir, extra_init[name])
            stage_seconds["prepare_student"] = _lap(started, stage_seconds)
            if config.distill.align_language is not None:  # the teacher's embeddings of one language's rows
                _stage("alignment_targets", placement, alignment_targets_stage, safe, teacher_dir, out_dir,
                       resources=config.finetune_resources)
                stage_seconds["alignment_targets"] = _lap(started, stage_seconds)
            log.info("job %s: redis %s", config.resolved_job_id, redis_service.url)
            # The hard-label ablation needs no teacher, so it trains beside the pipeline on one thread
            # instead of after it: on a small machine the teacher replicas leave a core partly idle.
            # Every student gets its own: the same architecture and initialisation on hard labels alone.
            init_dirs = {"student": student_init_dir, **extra_init}
            ablation_refs = {}
            ablations_wanted = config.evaluation.ablation and config.data.eval_split
            # A GPU or a custom resource is the student's while it trains: an ablation asking for one waits.
            ablations_after = (config.evaluation.ablations_after_distillation
                               or not runs_beside_actors(config.evaluation_resources))
            if ablations_wanted and not ablations_after:
                ablation_refs = _start_ablations(redis_service.config, init_dirs, out_dir)
            task_dirs = {name: folder for name, (folder, _) in task_teachers.items()}
            distilling_began = True
            stop_job_on_sigterm(redis_service)  # from now on SIGTERM stops the job cleanly, resumable
            listeners = [tracking.progress, *([on_progress] if on_progress is not None else [])]
            result = _distill(redis_service, teacher_dirs, init_dirs, out_dir, show_progress, interrupt, resume,
                              task_dirs, lambda progress: [listen(progress) for listen in listeners])
            stage_seconds["distill"] = _lap(started, stage_seconds)
            report = _report(config, result, train.label_names)
            samples_expected = report["samples_expected"]
            shortfall = accounting_shortfall(report, result["missing_batches"])
            outcome = outcome_with_dead_letters(job_outcome(shortfall, result["stopped_by"]), report,
                                                result["missing_batches"], result["dead_lettered"])
            ablation_dirs = {}
            if outcome == "stopped":
                for ablation_ref in ablation_refs.values():  # the evaluation they are for will not run
                    ray.cancel(ablation_ref, force=True)
            elif ablations_wanted:
                if ablations_after:  # one at a time, with the threads their resources name (every core by default)
                    ablation_refs = _start_ablations(redis_service.config, init_dirs, out_dir, one_at_a_time=True)
                for name, ref in ablation_refs.items():
                    folder, where = stage_result(ref)
                    ablation_dirs[name] = Path(folder)
                    placement[name] = where.as_dict()
                stage_seconds["ablation_after_distill"] = _lap(started, stage_seconds)
                if curves := ablation_validation(ablation_dirs):
                    report["ablation_validation"] = curves
            report["status"] = outcome
            report["wall_seconds"] = round(time.perf_counter() - started, 2)
            report["student_init"] = student_info
            for name, info in extra_info.items():  # each student's vocabulary, which may be its own
                report["extra_students"].setdefault(name, {})["student_init"] = info
            report["teacher_path"] = str(teacher_dir)
            # How the teacher was fine-tuned and how it fared against the baselines on dev, when this job prepared it.
            teacher_record = read_teacher_record(out_dir, teacher_dir)
            if teacher_record is not None:
                report["teacher_finetune"] = teacher_record
            if outcome == "stopped":
                report["stopped_by"] = result["stopped_by"]
                report["stage_seconds"] = stage_seconds
                report["stage_placement"] = placement
                report["total_seconds"] = report["wall_seconds"]
                _write_report(report, out_dir)
                tracking.finish(report, out_dir)
                raise _stopped(config, out_dir, result["stopped_by"], interrupt.stop_requested,
                               samples_expected=report["samples_expected"], report=report)
            if config.data.eval_split:
                extra = {name: Path(summary["student_path"]) for name, summary in result["extra_students"].items()}
                extra.update({f"teacher:{name}": path for name, path in teacher_dirs.items() if name != "teacher"})
                extra.update(ablation_dirs)
                evaluation, task_evaluations = _stage(
                    "evaluate", placement, evaluate_stage, safe, teacher_dir, Path(report["student_path"]),
                    train.label_names, extra, task_teachers, resources=config.evaluation_resources)
                report.update(evaluation)
                for name, task_evaluation in task_evaluations.items():
                    report["tasks"][name].update(task_evaluation)
                stage_seconds["evaluate"] = _lap(started, stage_seconds)
                if config.compress is not None:  # prune / recover / quantise: a report row per stage
                    report.update(_stage("compress", placement, compress_stage, safe, teacher_dir,
                                         Path(report["student_path"]), train.label_names, out_dir / "compress",
                                         resources=config.evaluation_resources, gpus=False))
                    stage_seconds["compress"] = _lap(started, stage_seconds)
            report["stage_seconds"] = stage_seconds
            report["stage_placement"] = placement
            report["total_seconds"] = round(time.perf_counter() - started, 2)
            _write_model_cards(report, config)
            _write_report(report, out_dir)
            tracking.finish(report, out_dir)
        except KeyboardInterrupt:
            # Ctrl-C before distilling began or after it ended (a second one while it stopped is _distill's).
            raise _stopped(config, out_dir, STOPPED_BY_INTERRUPT, interrupted=True, samples_expected=samples_expected,
                           distilling_began=distilling_began) from None
    if outcome == "failed":
        raise JobFailed(f"accounting mismatch: {'; '.join(shortfall)}; see {out_dir / 'report.json'}")
    return report


def check_before_models(config: JobConfig) -> None:
    """What would otherwise fail only once the actors start, refused before any model is built or fine-tuned."""
    data = config.data
    if config.training.validate_each_epoch and not data.dev_from_train and not has_own_split(data, data.dev_split):
        raise ConfigError(f"training.validate_each_epoch scores the student on data.dev_split ({data.dev_split!r}), "
                          f"which {data.path} does not have: set data.dev_from_train: true to carve it from the "
                          "training split, or name a split the data has")


def _stopped(config: JobConfig, out_dir: Path, stopped_by: str, interrupted: bool, *,
             samples_expected: int | None = None, distilling_began: bool = True,
             report: dict | None = None) -> JobStopped:
    """The outcome of a stopped job, with what its main student's checkpoint holds (read from disk:
    it is what `polydistill resume` continues from)."""
    checkpoints = out_dir / "checkpoints"
    found = find_checkpoint(checkpoints / "student") if distilling_began else None
    samples_kept = None
    if distilling_began:
        samples_kept = _samples_in_checkpoint(found) if found is not None else 0
    # Several students checkpoint side by side: name the folder that holds them all.
    named = None if found is None else checkpoints if len(config.student_names) > 1 else checkpoints / "student"
    return JobStopped(stopped_by, out_dir, samples_kept, samples_expected, named, interrupted, report)


def _samples_in_checkpoint(checkpoint: Path) -> int:
    """Samples in a checkpoint's ledger (student/checkpoint.py documents ledger.json), without loading
    its tensors: a Ctrl-C should not wait for the weights to be read."""
    ledger = json.loads((checkpoint / "ledger.json").read_text(encoding="utf-8"))
    return EpochLedger.from_dict(ledger).samples_applied


def _lap(started: float, laps: dict[str, float]) -> float:
    """Seconds since the previous lap (or the start)."""
    return round(time.perf_counter() - started - sum(laps.values()), 2)


def _stage(name: str, placement: dict[str, dict], function, *args, resources: StageResources,
           gpus: bool = True):
    """Runs a heavy stage as a Ray task (cluster/stages.py), recording where it ran; returns its result."""
    result, where = run_stage(name, function, *args, resources=resources, gpus=gpus)
    placement[name] = where.as_dict()
    return result


def _start_ablations(config: JobConfig, init_dirs: dict[str, Path], out_dir: Path,
                     one_at_a_time: bool = False) -> dict[str, ray.ObjectRef]:
    """Every student's hard-label ablation as a Ray task with the evaluation's resources: beside
    distillation on one thread each (claiming no CPU, which the actors hold), or (once distillation has
    ended) one after another, each waiting for the previous and using the threads its resources name."""
    resources = config.evaluation_resources
    refs: dict[str, ray.ObjectRef] = {}
    for name, init_dir in init_dirs.items():
        ablation = ablation_name(name)
        folder = str(out_dir / ablation.replace(":", "-"))
        own = resources if one_at_a_time else resources.model_copy(update={"threads": 1})
        refs[ablation] = submit_stage(ablation, ablation_stage, config.for_student(name), str(init_dir), folder,
                                      resources=own, num_cpus=None if one_at_a_time else 0)
        if one_at_a_time:
            ray.wait([refs[ablation]], num_returns=1, timeout=None)
    return refs


def reset_job_streams(config: JobConfig, redis_url: str,
                      ownership: JobOwnership | None = None) -> tuple[JobKeys, JobStreams]:
    """Empty work and knowledge streams with their consumer groups, for a run that starts afresh:
    leftovers of an earlier run under the same job id would otherwise be distilled twice.

    Removes the job's keys only while they are ``ownership``'s (without one: while nobody holds the job),
    and raises ``OwnershipLost`` otherwise. ``config``: the job's, its password read here or not."""
    config = with_redis_password(config)
    keys = JobKeys(config.resolved_job_id, config.transport.namespace)
    streams = JobStreams.of_job(connect_job(redis_url, config.transport), keys, config.transport)
    if ownership is not None:
        ownership.delete_job_keys()
    else:
        delete_job_keys(streams.client, keys)
    for stream in keys.teacher_inputs(len(config.teacher_names), config.task_names):
        streams.ensure_group(stream, TEACHER_GROUP)
    for name in config.student_names:
        streams.ensure_group(keys.knowledge_stream, keys.student_group(name))
    return keys, streams


@dataclass
class _JobActors:
    """The actors of a running job as they start, and the calls running on them: what ending the job
    at once must kill and wait for."""

    feeder: ray.actor.ActorHandle | None = None
    writer: ray.actor.ActorHandle | None = None
    pools: dict[str, ray.actor.ActorHandle] = field(default_factory=dict)
    helpers: list[LongCall] = field(default_factory=list)  # the pools' and the cache writer's run()
    supervisor: Supervisor | None = None
    samples_expected: int | None = None  # known once the feeder has planned the batches

    def actors(self) -> list[ray.actor.ActorHandle]:
        students = list(self.supervisor.students.values()) if self.supervisor is not None else []
        return [actor for actor in [self.feeder, *students, *self.pools.values(), self.writer] if actor is not None]

    def calls(self) -> list[ray.ObjectRef]:
        supervisor = self.supervisor
        own = [*supervisor.train_refs.values(), supervisor.feed_ref] if supervisor is not None else []
        return [ref for ref in [*(call.ref for call in self.helpers), *own] if ref is not None]


def _distill(redis_service: JobRedis, teacher_dirs: dict[str, Path], init_dirs: dict[str, Path], out_dir: Path,
             show_progress: bool, interrupt: InterruptStops, resume: bool = False,
             task_dirs: dict[str, Path] | None = None, on_progress: Callable[[dict[str, str]], None] | None = None
             ) -> dict:
    """``task_dirs``: a multi-task job's extra tasks' teacher folders by task; ``on_progress`` also gets
    the student's progress hash whenever the display does (live experiment tracking).

    From the moment the job's keys are fresh, Ctrl-C asks the job to stop (``interrupt``). A second
    Ctrl-C, or students that do not stop within the grace period, end every actor at once."""
    # What the actors receive: no password (each reads it where it runs, cluster/secrets.py).
    config, redis_url = redis_service.config, redis_service.url
    keys, streams = reset_job_streams(config, redis_url, redis_service.ownership)
    job = _JobActors()
    interrupt.arm(lambda: stop_from_signal(config, redis_url, STOPPED_BY_INTERRUPT))
    try:
        return _run_actors(config, teacher_dirs, init_dirs, redis_url, out_dir, show_progress, resume,
                           task_dirs or {}, keys, streams, redis_service.ownership, job, interrupt, on_progress)
    except (KeyboardInterrupt, StopOverdue, EndNow) as reason:
        interrupt.disarm()  # a press now would write into the keys about to be removed
        log.log(logging.WARNING if isinstance(reason, StopOverdue) else logging.INFO,
                "job %s: ending every actor at once (%s)", keys.job_id, str(reason) or "a second Ctrl-C")
        stopped_by = _end_at_once(job, streams, keys, redis_service.ownership)
        interrupted = interrupt.stop_requested or isinstance(reason, KeyboardInterrupt)
        stopped_by = stopped_by or (STOPPED_BY_DRIVER if isinstance(reason, EndNow) else STOPPED_BY_INTERRUPT)
        raise _stopped(config, out_dir, stopped_by, interrupted,
                       samples_expected=job.samples_expected) from None
    finally:
        interrupt.disarm()


def _run_actors(config: JobConfig, teacher_dirs: dict[str, Path], init_dirs: dict[str, Path], redis_url: str,
                out_dir: Path, show_progress: bool, resume: bool, task_dirs: dict[str, Path], keys: JobKeys,
                streams: JobStreams, ownership: JobOwnership, job: _JobActors, interrupt: InterruptStops,
                on_progress: Callable[[dict[str, str]], None] | None = None) -> dict:
    """Starts the job's actors (each recorded in ``job`` as it starts), watches them to the end, collects
    their counters and removes the job's keys."""
    teacher_dir = teacher_dirs["teacher"]
    # The control actors (feeder, teacher pools, cache writer) live on the driver's node, which lasts as long
    # as the job does (the cache folder is on its disk too), never on a node the autoscaler may take back.
    # Should one die anyway, Ray starts it again there and the supervisor takes it from there
    # (cluster/recovery.py): the feeder through a recovery, the others by issuing their run() again.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    control = {"num_cpus": 0, "scheduling_strategy": here, "max_restarts": config.training.max_recoveries}
    tokenizer_dirs = ({"main": str(teacher_dir), **{name: str(folder) for name, folder in task_dirs.items()}}
                      if task_dirs else str(teacher_dir))
    feeder = job.feeder = FeederActor.options(**control).remote(
        config, tokenizer_dirs, redis_url)
    plan, _, cleaning = ray.get(feeder.plan.remote())
    cache = ray.get(feeder.cache_state.remote())
    from_cache = cache is not None and cache["complete"]
    writer = None
    if cache is not None and not from_cache:
        writer = job.writer = CacheWriterActor.options(**control).remote(
            config, cache["root"], cache["key"], plan.samples_per_epoch, redis_url)
    # The pool owns the teacher replicas: it starts teacher.replicas of them, then sizes the pool
    # (teacher.autoscaling, `polydistill scale`) until the stop flag, and returns every replica's counters.
    # Served from a complete knowledge cache, the job needs no teacher at all. Several teachers: a pool
    # each, in line (each adds its soft labels to the batch and passes it on).
    pools = job.pools
    if not from_cache:
        for name in config.teacher_names:
            pools[name] = TeacherPoolActor.options(**control).remote(
                config.for_teacher(name), str(teacher_dirs[name]), redis_url, stage=config.teacher_stage(name))
    # A multi-task job: a pool more per extra task, reading that task's work stream.
    for name, folder in task_dirs.items():
        pools[name] = TeacherPoolActor.options(**control).remote(
            config.for_task(name), str(folder), redis_url, stage=config.task_stage(name))

    def student_maker(name: str):
        seen_as = config.for_student(name)
        options = _actor_options(seen_as.student.num_cpus, seen_as.student.num_gpus, seen_as.student.resources)
        checkpoint_dir = out_dir / "checkpoints" / name
        if not resume:
            discard_checkpoint(checkpoint_dir)  # a fresh run; `polydistill resume` continues one instead
        return lambda: StudentActor.options(**options).remote(
            seen_as, str(init_dirs[name]), plan.batches_per_epoch, redis_url, str(student_dir(out_dir, name) / "student"),
            name, checkpoint_dir=str(checkpoint_dir),
        )

    makers = {name: student_maker(name) for name in config.student_names}
    def cache_readers() -> list[str]:
        return [CACHE_WRITER_GROUP] if writer is not None and not is_complete(cache["path"]) else []

    expected = plan.samples_per_epoch * plan.epochs
    job.samples_expected = expected
    supervisor = job.supervisor = Supervisor(config, streams, feeder, makers, plan.batches_per_epoch * plan.epochs,
                                             cache_readers)
    supervisor.start(resume)
    helpers = job.helpers
    pool_calls = [LongCall(f"teacher pool {name!r}", pool, "run") for name, pool in pools.items()]
    writer_call = LongCall("cache writer", writer, "run") if writer is not None else None
    helpers.extend(pool_calls)
    if writer_call is not None:
        helpers.append(writer_call)
    for call in helpers:
        call.issue()

    with ProgressDisplay(expected, enabled=show_progress, listener=on_progress) as display:
        try:
            summaries = supervisor.wait(helpers, display.update)
            training = summaries["student"]
            display.update({"samples": str(training["samples_distilled"]), "loss": str(training["final_loss"])})
        except RedisUnavailable:
            # Nothing can be told to stop through Redis: end the actors directly, then report the outage.
            for actor in job.actors():
                ray.kill(actor)
            raise
        except (KeyboardInterrupt, StopOverdue, EndNow):
            raise  # the job ends at once (_distill)
        except BaseException:
            request_stop(streams.client, keys, STOPPED_BY_DRIVER)
            raise
    # Whether someone else stopped the job, read before the driver sets the flag for its own end.
    stopped_by = stop_requested_by(streams.client, keys)
    if writer is not None and stopped_by is None:
        _drain_knowledge_stream(streams, keys, sealed=lambda: is_complete(cache["path"]))
    request_stop(streams.client, keys, STOPPED_BY_DRIVER)
    # What a student that did not finish never applied, for an accounting mismatch to name.
    missing_batches = {} if stopped_from_outside(stopped_by) else {
        name: ray.get(supervisor.students[name].missing.remote(), timeout=30)
        for name, summary in summaries.items() if not summary["complete"]}
    teacher_stats = [stats for call in pool_calls for stats in supervisor.result_of(call, timeout_s=180)]
    pool_summaries = {name: supervisor.ask(pool, "summary", f"teacher pool {name!r}") for name, pool in pools.items()}
    cache_report = None
    if cache is not None:
        cache_report = {"path": cache["path"], "key": cache["key"].digest, "read_from_start": from_cache,
                        "batches_from_cache": supervisor.ask(feeder, "batches_from_cache", "feeder"),
                        "writer": supervisor.result_of(writer_call, timeout_s=180) if writer_call is not None
                        else None}
    batches_fed = supervisor.finish()
    dead_letters = supervisor.dead_letters()
    dead_lettered = supervisor.dead_lettered_batches()
    interrupt.disarm()  # the keys go now; a Ctrl-C from here on ends the driver at once
    ownership.delete_job_keys()
    for actor in job.actors():
        ray.kill(actor)
    return {
        "knowledge_cache": cache_report,
        "plan": asdict(plan),
        "cleaning": cleaning,
        "training": training,
        "extra_students": {name: summary for name, summary in summaries.items() if name != "student"},
        "teachers": teacher_stats,
        "teacher_pool": pool_summaries.get("teacher"),
        "teacher_pools": pool_summaries if config.extra_teachers else None,
        "teacher_pools_all": pool_summaries,
        "batches_fed": batches_fed,
        "feeds_lost": supervisor.feeds_lost,
        "dead_letters": dead_letters,
        "dead_lettered": dead_lettered,
        "recoveries": [recovery.as_dict() for recovery in supervisor.recoveries],
        "stopped_by": stopped_by,
        "missing_batches": missing_batches,
    }


def _end_at_once(job: _JobActors, streams: JobStreams, keys: JobKeys, ownership: JobOwnership) -> str | None:
    """Kills every actor of the job, waits (briefly) until they are gone so that none writes again,
    then removes the job's keys. Returns who had asked the job to stop."""
    stopped_by = stop_requested_by(streams.client, keys)
    for actor in job.actors():
        ray.kill(actor)
    deadline = time.monotonic() + ACTORS_GONE_TIMEOUT_S
    calls = job.calls()
    if calls:  # a killed actor's calls fail once it is gone
        ray.wait(calls, num_returns=len(calls), timeout=ACTORS_GONE_TIMEOUT_S)
    # The teacher replicas belong to their pool, which names each "<job id>:<replica id>"
    # (actors/pool.py): Ray ends them once the pool is gone, a moment after it, and until then one
    # may still publish the batch it holds.
    replica_prefix = f"{keys.job_id}:"
    while (any(name.startswith(replica_prefix) for name in ray.util.list_named_actors())
           and time.monotonic() < deadline):
        time.sleep(0.05)
    ownership.delete_job_keys()
    return stopped_by


def _drain_knowledge_stream(streams: JobStreams, keys: JobKeys, sealed: Callable[[], bool],
                            timeout_s: float = 120.0) -> None:
    """The students are done; give the cache writer the time to read what they read before it. Once the cache
    is sealed the writer reads no more (a student that stopped early leaves later epochs' entries unread)."""
    deadline = time.monotonic() + timeout_s
    while streams.backlog(keys.knowledge_stream) and not sealed() and time.monotonic() < deadline:
        time.sleep(0.1)


def _report(config: JobConfig, result: dict, label_names: list[str]) -> dict:
    plan, training = result["plan"], result["training"]
    # Early stopping (training.patience) shortens a student's plan: what it must have learnt is its kept epochs.
    epochs = training.get("epochs_trained") or plan["epochs"]
    expected = plan["samples_per_epoch"] * epochs
    return {
        "job_id": config.resolved_job_id,
        "samples_expected": expected,
        "samples_distilled": training["samples_distilled"],
        "samples_per_epoch": training["samples_per_epoch"],
        "batches_expected": plan["batches_per_epoch"] * epochs,
        "batches_applied": training["batches_applied"],
        "batches_missing": plan["batches_per_epoch"] * epochs - training["batches_applied"],
        "batches_fed": result["batches_fed"],
        # Feed calls whose feeder died: what they had enqueued is not in batches_fed (the recovery re-fed
        # whatever the students missed, and their ledgers dropped any second copy).
        "feeds_lost": result.get("feeds_lost", 0),
        "duplicates_dropped": training["duplicates_dropped"],
        # One optimiser step per applied batch: equal to batches_expected when none was applied twice.
        "student_steps": training["steps"],
        # Several workers training the student (student.workers): optimiser steps and who read what.
        "data_parallel": training.get("data_parallel"),
        "resumed_from_step": training.get("resumed_from_step"),
        # Batches whose loss was NaN or infinite: applied (counted once) but not stepped on.
        "steps_skipped_nonfinite": training.get("steps_skipped_nonfinite", 0),
        # Batches whose chunks the student held too long or beyond its buffer: given up and fed again.
        "chunk_batches_given_up": training.get("chunk_batches_given_up", 0),
        "recoveries": result.get("recoveries", []),
        "dead_letters": result["dead_letters"],
        "samples_dead_lettered": samples_dead_lettered(result["dead_lettered"],
                                                       result["missing_batches"].get("student", ())),
        "epochs": plan["epochs"],
        "epochs_trained": epochs,
        "stopped_early": training.get("stopped_early"),
        "teacher_replicas": config.teacher.replicas,  # the starting size; teacher_pool has how it changed
        "teacher_pool": result.get("teacher_pool"),
        "teachers": result["teachers"],
        # Several teachers (extra_teachers): each pool's history, and who labelled how many samples per language.
        "teacher_pools": result.get("teacher_pools"),
        "teacher_samples_per_language": training.get("teacher_samples_per_language"),
        "tasks": _task_report(config, plan, training, result.get("teacher_pools_all") or {}) if config.extra_tasks
        else None,
        "student_seconds": {
            "total": training["wall_seconds"],
            "waiting_for_knowledge": training["wait_seconds"],
            "training": training["compute_seconds"],
        },
        "student_path": training["student_path"],
        "final_loss": training["final_loss"],
        "loss_history": training["loss_history"],
        "validation": training.get("validation") or [],
        "kept_epoch": training.get("kept_epoch"),
        "wire_bytes_per_sample": training.get("wire_bytes_per_sample"),
        "wire_bytes_per_sample_by_part": training.get("wire_bytes_per_sample_by_part"),
        "pseudo_labels": training.get("pseudo_labels"),
        "knowledge_cache": result.get("knowledge_cache"),
        # Students that learnt from the same teacher pass: each must have seen every sample once.
        "extra_students": {
            name: {"samples_expected": plan["samples_per_epoch"] * (summary.get("epochs_trained") or plan["epochs"]),
                   **{key: summary.get(key) for key in (
                       "samples_distilled", "samples_per_epoch", "batches_applied", "duplicates_dropped", "steps",
                       "final_loss", "student_path", "wall_seconds", "wait_seconds", "compute_seconds", "validation",
                       "kept_epoch", "epochs_trained", "stopped_early", "loss_history")}}
            for name, summary in result.get("extra_students", {}).items()
        },
        "labels": label_names,
        "samples_per_language": plan["samples_per_language"],
        "cleaning": result["cleaning"],
        "config": config.model_dump(mode="json", exclude={"transport": {"password", "redis_url"}}),
    }


def _task_report(config: JobConfig, plan: dict, training: dict, pools: dict) -> dict:
    """A multi-task job, per task: its weight, samples expected and applied (each once per epoch), its
    teacher pool; the evaluation of each extra task is added after the run."""
    report = {}
    for name in config.task_names:
        prefix = "" if name == "main" else f"{name}/"
        per_language = {language.removeprefix(prefix): count for language, count in plan["samples_per_language"].items()
                        if (language.startswith(prefix) if prefix else "/" not in language)}
        report[name] = {
            "task": config.for_task(name).task, "weight": config.task_weight_of(name),
            "samples_expected": sum(per_language.values()) * plan["epochs"],
            "samples_distilled": (training.get("task_samples") or {}).get(name, 0),
            "samples_per_language": per_language,
            "teacher_pool": pools.get("teacher" if name == "main" else name),
        }
    return report


def _write_model_cards(report: dict, config: JobConfig) -> None:
    """A model card beside every student, and the config that made it (no secrets), which the card names."""
    from polydistill.student.model_card import write_model_cards

    for card in write_model_cards(report, config):
        save_job_config(config, card.parent)


def _write_report(report: dict, out_dir: Path) -> None:
    """report.json as the Report schema declares it (an undeclared or mistyped section fails here)."""
    checked = Report.model_validate(report).as_json_dict()
    (out_dir / "report.json").write_text(json.dumps(checked, indent=2) + "\n", encoding="utf-8")
    from polydistill.student.report import write_report

    write_report(report, out_dir)
