"""Student pace: the real pipeline against the same student with no teacher, and with an inline teacher.

Three ways to train the same student on the same batches, all measured in one run:

- **no teacher**: ``StudentTrainer.step`` on each work batch with no soft labels, so the loss is
  the hard-label CE alone; same model, optimiser, schedule, clipping and threads.
- **inline**: ``TeacherReplica.compute`` then ``StudentTrainer.step`` in the same loop and
  thread (the HF / TextBrewer / torchdistill shape), with exactly the pipeline's losses.
- **pipeline**: a private Redis, a local Ray, the feeder and the teacher pool as Ray actors (as
  ``cluster/driver.py`` starts them), and ``StudentTrainer.train`` consuming the knowledge stream in
  this process, instrumented by a subclass that notes the clock after every applied batch.

Models come from ``cluster/prepare.py``'s ``prepare_teacher`` / ``prepare_student``; batches from
``Feeder.work_batch`` / ``Feeder.epoch_batches``, so every mode sees the same padded batches.
The library classes are used as they are; their Redis clients connect lazily, so the two
in-process baselines never talk to Redis.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from polydistill.actors.feeder import Feeder
from polydistill.actors.pool import TeacherPoolActor
from polydistill.actors.shells import FeederActor
from polydistill.actors.teacher import TeacherReplica
from benchmarks.summary import Mark, Window, epoch_windows, median, ratio, setup_name, spread, summarize_setups
from polydistill.cluster import driver, prepare
from polydistill.cluster.config import JobConfig, load_config
from polydistill.storage import wire
from polydistill.storage.job_data import load_job_split
from polydistill.storage.keys import CONTROL_STOP
from polydistill.student.trainer import StudentTrainer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"


@dataclass(frozen=True)
class PaceSettings:
    languages: tuple[str, ...]
    limit_per_language: int | None
    batch_size: int
    pipeline_epochs: int  # epoch 0 of each pipeline run is warm-up and not measured
    baseline_epochs_per_pass: int  # the baselines run twice: before and after the pipeline runs
    replicas: tuple[int, ...]  # teacher pool sizes to measure; the first is the headline
    repeats: int  # pipeline runs per pool size, interleaved (r1, r2, r1, r2, ...)
    teachers_ahead: bool = True


QUICK = PaceSettings(("eng_Latn", "swh_Latn"), 400, 32, 6, 2, (1,), 2)
FULL = PaceSettings(("eng_Latn", "fra_Latn", "swh_Latn", "zho_Hans"), None, 32, 10, 3, (1, 2), 2)


def job_config(settings: PaceSettings, work_dir: Path, job_id: str, replicas: int, redis_url: str,
               *, knowledge_backlog: int = 32) -> JobConfig:
    """examples/tiny.yaml with pinned threads (student 1, each replica 1) and the run's sizes."""
    languages = "[" + ", ".join(settings.languages) + "]"
    overrides = [
        f"job_id={job_id}",
        f"data.languages={languages}",
        f"data.limit_per_language={'null' if settings.limit_per_language is None else settings.limit_per_language}",
        "data.eval_split=null",
        f"training.batch_size={settings.batch_size}",
        f"training.epochs={settings.pipeline_epochs}",
        "training.stall_timeout_s=120",
        "training.log_every=1000000",
        f"teacher.replicas={replicas}",
        "teacher.threads=1",
        "teacher.num_cpus=1",
        "student.threads=1",
        f"transport.redis_url={redis_url}",
        f"transport.max_knowledge_backlog={knowledge_backlog}",
    ]
    return load_config(TINY, overrides, output_dir=str(work_dir / job_id))


def prepare_models(config: JobConfig, work_dir: Path) -> tuple[Path, Path]:
    """The teacher and the student's initial weights, built once by the driver's own functions,
    so every mode starts from the same checkpoints a real job would."""
    train = load_job_split(config.data, config.data.train_split)
    teacher_dir = prepare.prepare_teacher(config, work_dir, train)
    student_init_dir, _ = prepare.prepare_student(config, teacher_dir, work_dir, train)
    return teacher_dir, student_init_dir


def epoch_work(feeder: Feeder, epoch: int) -> list[wire.WorkBatch]:
    return [feeder.work_batch(epoch, batch_id, rows) for batch_id, rows in enumerate(feeder.epoch_batches(epoch))]


# --------------------------------------------------------------------------- in-process baselines


@dataclass
class LoopTimes:
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_samples: list[int] = field(default_factory=list)
    epoch_pass: list[int] = field(default_factory=list)  # which baseline pass ran the epoch
    epoch_cpu_seconds: list[float] = field(default_factory=list)  # CPU time of this thread per epoch
    step_seconds: list[float] = field(default_factory=list)  # the student's step alone
    step_cpu_seconds: list[float] = field(default_factory=list)  # CPU time of this thread in the step
    teacher_seconds: list[float] = field(default_factory=list)  # inline teacher forward (+ top-k)

    @property
    def samples_per_s(self) -> list[float]:
        return [n / s for n, s in zip(self.epoch_samples, self.epoch_seconds)]

    def in_passes(self, values: list[float], passes: set[int]) -> list[float]:
        """The per-epoch ``values`` of the epochs run in the given passes."""
        return [value for value, p in zip(values, self.epoch_pass) if p in passes]


class Baselines:
    """The no-teacher and inline loops, sharing one feeder's batches."""

    def __init__(self, config: JobConfig, teacher_dir: Path, student_init_dir: Path, redis_url: str, work_dir: Path):
        self.feeder = Feeder(config, str(teacher_dir), redis_url)
        batches_per_epoch = self.feeder.plan().batches_per_epoch
        self.alone = StudentTrainer(config, str(student_init_dir), batches_per_epoch, redis_url,
                                    str(work_dir / "alone"))
        self.inline_student = StudentTrainer(config, str(student_init_dir), batches_per_epoch, redis_url,
                                             str(work_dir / "inline"))
        # As StudentTrainer.train() does before its loop: dropout on, exactly as in the pipeline.
        self.alone.model.train()
        self.inline_student.model.train()
        self.teacher = TeacherReplica("inline-teacher", config, str(teacher_dir), redis_url)
        self.no_teacher = LoopTimes()
        self.paired = LoopTimes()  # no-teacher epochs run between a teachers-ahead run's epochs
        self.inline = LoopTimes()
        self._cache: dict[int, list[wire.WorkBatch]] = {}

    def work(self, epoch: int) -> list[wire.WorkBatch]:
        if epoch not in self._cache:
            self._cache[epoch] = epoch_work(self.feeder, epoch)
        return self._cache[epoch]

    def warm_up(self, steps: int = 3) -> None:
        for work in self.work(0)[:steps]:
            self.alone.step(wire.Knowledge(work=work, teacher_id="none"))
            self.inline_student.step(self.teacher.compute(work))

    def run_no_teacher_epoch(self, epoch: int, pass_index: int, into: LoopTimes | None = None) -> None:
        times = self.no_teacher if into is None else into
        batches = self.work(epoch)
        started, started_cpu = time.perf_counter(), time.thread_time()
        for work in batches:
            before, before_cpu = time.perf_counter(), time.thread_time()
            self.alone.step(wire.Knowledge(work=work, teacher_id="none"))
            times.step_cpu_seconds.append(time.thread_time() - before_cpu)
            times.step_seconds.append(time.perf_counter() - before)
        times.epoch_seconds.append(time.perf_counter() - started)
        times.epoch_cpu_seconds.append(time.thread_time() - started_cpu)
        times.epoch_samples.append(sum(w.n_samples for w in batches))
        times.epoch_pass.append(pass_index)

    def run_inline_epoch(self, epoch: int, pass_index: int) -> None:
        batches = self.work(epoch)
        started = time.perf_counter()
        for work in batches:
            before = time.perf_counter()
            knowledge = self.teacher.compute(work)
            between = time.perf_counter()
            self.inline_student.step(knowledge)
            self.inline.teacher_seconds.append(between - before)
            self.inline.step_seconds.append(time.perf_counter() - between)
        self.inline.epoch_seconds.append(time.perf_counter() - started)
        self.inline.epoch_samples.append(sum(w.n_samples for w in batches))
        self.inline.epoch_pass.append(pass_index)

    def realistic_knowledge(self) -> wire.Knowledge:
        """A knowledge message exactly as a teacher replica publishes it for this job."""
        work = self.work(0)
        longest = max(range(len(work)), key=lambda i: work[i].input_ids.size)
        return self.teacher.compute(work[longest])


# --------------------------------------------------------------------------- the real pipeline


class TimedStudent(StudentTrainer):
    """The library's student loop, unchanged, noting its counters after every applied batch.

    ``between_epochs(k)``, if given, runs after the k-th epoch's worth of batches, on a stopped
    clock: the marks exclude its time. Only used when the teachers have already finished, so
    pausing the student changes nothing on the pipeline's side.
    """

    def __init__(self, *args: Any, between_epochs: Callable[[int], None] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.marks: list[Mark] = []
        self.start_mark: Mark | None = None
        self.step_cpu_seconds: list[float] = []
        self.between_epochs = between_epochs
        self.paused_seconds = 0.0
        self.paused_cpu_seconds = 0.0
        # What the loop spends on transport per applied batch: fetching (waiting included), agreeing on
        # what a message is (decoding it when it was not read ahead) and acknowledging it.
        self.transport_seconds: list[float] = []
        self._transport = 0.0
        self.strategy.agree = self._timed(self.strategy.agree)
        self.consumer.done = self._timed(self.consumer.done)

    def _timed(self, method: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._transport += time.perf_counter() - started
        return timed

    def fetch(self, should_stop=lambda: False):
        started = time.perf_counter()
        try:
            return super().fetch(should_stop)
        finally:
            self._transport += time.perf_counter() - started

    def _mark(self) -> Mark:
        return Mark(time.perf_counter() - self.paused_seconds, self.ledger.batches_applied,
                    self.ledger.samples_applied, self.state.wait_seconds, self.state.compute_seconds,
                    time.thread_time() - self.paused_cpu_seconds)

    def train(self, should_stop=lambda: False) -> dict:
        self.start_mark = self._mark()
        return super().train(should_stop)

    def step(self, knowledge):
        before = time.thread_time()
        values = super().step(knowledge)
        self.step_cpu_seconds.append(time.thread_time() - before)
        return values

    def apply(self, entry_id, payload) -> None:
        before = self.ledger.batches_applied
        super().apply(entry_id, payload)
        if self.ledger.batches_applied != before:
            self.transport_seconds.append(self._transport)
            self._transport = 0.0
            self.marks.append(self._mark())
            applied = self.ledger.batches_applied
            per_epoch = self.ledger.batches_per_epoch
            if self.between_epochs and applied % per_epoch == 0 and not self.ledger.complete:
                paused, paused_cpu = time.perf_counter(), time.thread_time()
                self.between_epochs(applied // per_epoch)
                self.paused_seconds += time.perf_counter() - paused
                self.paused_cpu_seconds += time.thread_time() - paused_cpu


def run_pipeline(config: JobConfig, teacher_dir: Path, student_init_dir: Path, redis_url: str, work_dir: Path,
                 *, teachers_ahead: bool = False, between_epochs: Callable[[int], None] | None = None,
                 ahead_timeout_s: float = 300) -> dict:
    """One pipeline run, set up as ``cluster/driver.py`` does (feeder actor, teacher pool actor, one
    student group); returns per-epoch windows (epoch 0 is warm-up) and the replicas' counters.

    teachers_ahead=True lets the teacher pool fill the knowledge stream with every batch of the
    run before the student starts: what a student sees when its teachers run on other
    hardware and keep up; ``between_epochs`` then runs between the student's epochs.
    Otherwise teachers and student run at the same time on this machine.
    """
    if between_epochs is not None and not teachers_ahead:
        raise ValueError("between_epochs would let running teachers get ahead; use it with teachers_ahead only")
    keys, streams = driver.reset_job_streams(config, redis_url)

    feeder = FeederActor.options(num_cpus=0, max_restarts=0).remote(config, str(teacher_dir), redis_url)
    pool = TeacherPoolActor.options(num_cpus=0, max_restarts=0).remote(config, str(teacher_dir), redis_url)
    try:
        plan, _, _ = ray.get(feeder.plan.remote())
        total_batches = plan.batches_per_epoch * plan.epochs
        # No checkpoint_dir: checkpointing is the same cost with or without a teacher, so it is left
        # out of both sides of the ratio.
        student = TimedStudent(config, str(student_init_dir), plan.batches_per_epoch, redis_url,
                               str(work_dir / f"{config.resolved_job_id}-student"), between_epochs=between_epochs)
        pool_ref = pool.run.remote()
        feed_ref = feeder.feed.remote()
        teacher_wall = None
        if teachers_ahead:
            started = time.perf_counter()
            while streams.backlog(keys.knowledge_stream) < total_batches:
                _raise_actor_failure([feed_ref, pool_ref])
                if time.perf_counter() - started > ahead_timeout_s:
                    raise TimeoutError(f"teachers did not fill the knowledge stream within {ahead_timeout_s:g} s")
                time.sleep(0.05)
            teacher_wall = time.perf_counter() - started
            streams.client.hset(keys.control, CONTROL_STOP, "1")  # teachers leave: the cores are the student's
            teacher_stats = ray.get(pool_ref, timeout=180)
        summary = student.train(lambda: False)
        streams.client.hset(keys.control, CONTROL_STOP, "1")
        if not teachers_ahead:
            teacher_stats = ray.get(pool_ref, timeout=180)
        ray.get(feed_ref, timeout=120)
    finally:
        streams.client.hset(keys.control, CONTROL_STOP, "1")
        for actor in (feeder, pool):
            ray.kill(actor)
        streams.delete_job_keys()
    if not summary["complete"] or summary["batches_applied"] != total_batches:
        raise RuntimeError(f"pipeline run {config.resolved_job_id} did not apply every batch: {summary}")
    return {
        "windows": epoch_windows(student.start_mark, student.marks, plan.batches_per_epoch),
        "summary": summary,
        "teachers": teacher_stats,
        "batches_per_epoch": plan.batches_per_epoch,
        "samples_per_epoch": plan.samples_per_epoch,
        "teacher_fill_seconds": teacher_wall,
        "step_cpu_seconds": student.step_cpu_seconds[plan.batches_per_epoch:],  # after epoch 0
        "transport_seconds": student.transport_seconds[plan.batches_per_epoch:],
        "prefetch": config.transport.prefetch,
    }


def _raise_actor_failure(refs: list) -> None:
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    for ref in done:
        ray.get(ref)


def describe_windows(windows: list[Window], batches_per_epoch: int, alone_step_seconds: float) -> dict:
    """Steady-state figures of one pipeline run, split into waiting, the step itself, and the rest.

    "rest" is what the loop adds around the step: XREADGROUP that found a message, decode, the
    ledger, XACK + XDEL. ``step_over_alone`` > 1 with little waiting means the step itself ran
    slower than with no teacher, i.e. the student lost CPU to the teachers (or to anything else).
    """
    steady = windows[1:]  # epoch 0 includes the pool's start and the first message's trip
    step_seconds = [w.compute_seconds / batches_per_epoch for w in steady]
    return {
        "epoch_seconds": [round(w.seconds, 4) for w in windows],
        "steady_epochs": len(steady),
        "samples_per_s": spread([w.samples_per_s for w in steady]),
        "seconds_per_epoch": spread([w.seconds for w in steady]),
        "wait_share": spread([w.wait_share for w in steady]),
        "step_share": spread([w.compute_seconds / w.seconds for w in steady]),
        "rest_share": spread([1 - (w.wait_seconds + w.compute_seconds) / w.seconds for w in steady]),
        "step_seconds": spread(step_seconds),
        "step_over_alone": ratio(median(step_seconds), alone_step_seconds),
    }


# --------------------------------------------------------------------------- the whole section


def measure(settings: PaceSettings, redis_url: str, log=print) -> dict:
    """Baseline passes bracket every pipeline run (pass, run, pass, run, pass), and each run is
    compared with the baseline epochs of the two passes around it, so load that drifts during the
    benchmark (other work on a shared machine) hits both sides of each ratio alike."""
    work_dir = Path(tempfile.mkdtemp(prefix="polydistill-bench-pace-"))
    base_config = job_config(settings, work_dir, "bench-baseline", settings.replicas[0], redis_url)
    teacher_dir, student_init_dir = prepare_models(base_config, work_dir)
    baselines = Baselines(base_config, teacher_dir, student_init_dir, redis_url, work_dir)
    baselines.warm_up()
    batches_per_epoch = baselines.feeder.plan().batches_per_epoch
    measured_epochs = list(range(1, settings.pipeline_epochs))  # the pipeline's steady epochs

    def baseline_pass(index: int) -> None:
        log(f"  baselines, pass {index + 1}: no teacher, inline teacher ...")
        for i in range(settings.baseline_epochs_per_pass):
            epoch = measured_epochs[(index * settings.baseline_epochs_per_pass + i) % len(measured_epochs)]
            baselines.run_no_teacher_epoch(epoch, index)
            baselines.run_inline_epoch(epoch, index)

    plan = [(f"colocated_r{replicas}#{repeat + 1}", replicas, False)
            for repeat in range(settings.repeats) for replicas in settings.replicas]
    if settings.teachers_ahead:
        plan.append(("teachers_ahead", settings.replicas[-1], True))
    baseline_pass(0)
    runs: dict[str, dict] = {}
    for index, (name, replicas, ahead) in enumerate(plan):
        where = "filling the stream before the student starts" if ahead else "running beside the student"
        log(f"  pipeline, {replicas} teacher replica(s) {where} ...")
        backlog = batches_per_epoch * settings.pipeline_epochs + 1 if ahead else 32
        config = job_config(settings, work_dir, "bench-" + name.replace("#", "-"), replicas, redis_url,
                            knowledge_backlog=backlog)

        def paired_epoch(k: int) -> None:  # k-th epoch boundary of the teachers-ahead run
            baselines.run_no_teacher_epoch(measured_epochs[(k - 1) % len(measured_epochs)], k, into=baselines.paired)

        runs[name] = run_pipeline(config, teacher_dir, student_init_dir, redis_url, work_dir, teachers_ahead=ahead,
                                  between_epochs=paired_epoch if ahead else None)
        runs[name]["bracket"] = {index, index + 1}
        baseline_pass(index + 1)

    alone, inline = baselines.no_teacher, baselines.inline
    alone_step = median(alone.step_seconds)
    alone_step_cpu = median(alone.step_cpu_seconds)
    per_run: dict[str, dict] = {}
    for name, run in runs.items():
        steady = run["windows"][1:]
        bracket = run["bracket"]
        if name == "teachers_ahead":  # paired epoch by epoch, not bracketed
            alone_rate = median(baselines.paired.samples_per_s)
        else:
            alone_rate = median(alone.in_passes(alone.samples_per_s, bracket))
        inline_epoch = median(inline.in_passes(inline.epoch_seconds, bracket))
        per_run[name] = {
            **describe_windows(run["windows"], run["batches_per_epoch"], alone_step),
            "retention": ratio(median([w.samples_per_s for w in steady]), alone_rate),
            # Only for runs whose teachers ran beside the student: a pre-filled stream is no epoch time.
            "inline_over_pipeline_time": None if name == "teachers_ahead"
            else ratio(inline_epoch, median([w.seconds for w in steady])),
            "baseline_epochs": "alternating with this run's epochs" if name == "teachers_ahead"
            else f"passes {sorted(p + 1 for p in bracket)} (before and after this run)",
            "no_teacher_samples_per_s_compared": alone_rate,
            "inline_seconds_per_epoch_compared": inline_epoch,
            "step_cpu_over_alone": ratio(median(run["step_cpu_seconds"]), alone_step_cpu),
            # The loop's transport (fetch with its waiting, decode unless read ahead, acknowledgement) per
            # batch ÷ the same step with no teacher, steady epochs; transport.prefetch says who read ahead.
            "transport_share_of_step": ratio(median(run["transport_seconds"]), alone_step),
            "prefetch": run["prefetch"],
            # Samples per CPU-second of the student's thread, pipeline ÷ alone: the pace it would keep
            # with a core of its own and teachers that keep up (blocking reads use no CPU).
            "cpu_retention": ratio(median([w.samples / w.cpu_seconds for w in steady]),
                                   median([n / c for n, c in zip(alone.epoch_samples, alone.epoch_cpu_seconds)])),
            "student_wait_share_whole_run": ratio(run["summary"]["wait_seconds"], run["summary"]["wall_seconds"]),
            # A replica's forward pass in the pipeline ÷ the same forward inline: > 1 is CPU it lost to
            # the student and everything else sharing the cores.
            "teacher_forward_over_inline": ratio(
                sum(t["busy_seconds"] for t in run["teachers"]) / max(1, sum(t["batches"] for t in run["teachers"])),
                median(inline.teacher_seconds)),
            "teachers": run["teachers"],
            "teacher_fill_seconds": run["teacher_fill_seconds"],
        }
    by_setup = summarize_setups(per_run)
    head = by_setup[setup_name(plan[0][0])]
    samples_per_epoch = runs[plan[0][0]]["samples_per_epoch"]
    details: dict[str, Any] = {
        "setup": {
            "teacher": "examples/tiny.yaml random-weight BERT, 4 layers, hidden 128, fp32",
            "student": "2 layers, hidden 64 (tiny.yaml overrides)",
            "languages": list(settings.languages),
            "limit_per_language": settings.limit_per_language,
            "batch_size": settings.batch_size,
            "samples_per_epoch": samples_per_epoch,
            "batches_per_epoch": batches_per_epoch,
            "pipeline_epochs": settings.pipeline_epochs,
            "student_threads": 1,
            "teacher_threads_per_replica": 1,
            "soft_labels": "full logits (7 classes), temperature 2.0, soft 0.7 / hard 0.3",
            "student_runs_in": "the benchmark process: StudentTrainer.train on the knowledge stream, no checkpoints",
            "teachers_run_in": "TeacherPoolActor (teacher.replicas replicas, 1 thread each), as cluster/driver.py starts them",
            "order": "baseline pass, then each pipeline run followed by a baseline pass",
            "pipeline_runs": [name for name, _, _ in plan],
        },
        "no_teacher": {
            "samples_per_s": spread(alone.samples_per_s),
            "seconds_per_epoch": spread(alone.epoch_seconds),
            "epoch_pass": [p + 1 for p in alone.epoch_pass],
            "step_seconds": spread(alone.step_seconds),
            "step_cpu_seconds": spread(alone.step_cpu_seconds),
        },
        "no_teacher_paired_with_teachers_ahead": {
            "samples_per_s": spread(baselines.paired.samples_per_s) if baselines.paired.epoch_seconds else None,
        },
        "inline": {
            "samples_per_s": spread(inline.samples_per_s),
            "seconds_per_epoch": spread(inline.epoch_seconds),
            "teacher_forward_seconds": spread(inline.teacher_seconds),
            "student_step_seconds": spread(inline.step_seconds),
        },
        "pipeline": per_run,
        "pipeline_by_setup": by_setup,
    }
    teacher_over_step = ratio(median(inline.teacher_seconds), median(inline.step_seconds))
    details["teacher_forward_over_student_step"] = teacher_over_step
    details["teacher_bound_ceiling_per_replica_core"] = ratio(1.0, teacher_over_step)
    return {
        "student_pace_retention": head["retention"],
        "teacher_forward_over_student_step": teacher_over_step,
        "inline_over_pipeline_time": head["inline_over_pipeline_time"],
        "retention_by_setup": {name: setup["retention"] for name, setup in by_setup.items()},
        "cpu_retention": head["cpu_retention"],
        "step_over_alone": head["step_over_alone"],
        "step_cpu_over_alone": head["step_cpu_over_alone"],
        "teacher_forward_over_inline": head["teacher_forward_over_inline"],
        "student_wait_share": head["wait_share"],
        "student_pace_retention_cached": by_setup["teachers_ahead"]["retention"] if "teachers_ahead" in by_setup else None,
        "transport_share_of_step_cached": (by_setup["teachers_ahead"]["transport_share_of_step"]
                                           if "teachers_ahead" in by_setup else None),
        "student_step_seconds": alone_step,
        "inline_teacher_forward_seconds": median(inline.teacher_seconds),
        "realistic_knowledge": baselines.realistic_knowledge(),
        "details": details,
        "work_dir": work_dir,
    }


def knowledge_sizes(knowledge: wire.Knowledge) -> dict:
    payload = wire.encode(knowledge)
    return {"bytes": len(payload), "samples": knowledge.work.n_samples, "seq_len": knowledge.work.seq_len,
            "soft": knowledge.soft.kind if knowledge.soft is not None else None,
            "classes": int(knowledge.soft.logits.shape[-1]) if knowledge.soft is not None and knowledge.soft.kind == "full"
            else None}
