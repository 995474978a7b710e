"""Chaos run (issue 6): one distillation job, faults injected at seeded random moments, then the
accounting.

    python benchmarks/chaos.py                      # 4 faults, one of each kind, a random seed (printed)
    python benchmarks/chaos.py --faults 8 --seed 7  # the same schedule every time for seed 7
    python benchmarks/chaos.py --kinds student,redis-empty --faults 3

Kinds of fault:
    teacher       SIGKILL the worker process of one live teacher replica (its pending batch is
                  reclaimed by another replica; the pool starts a replacement)
    student       SIGKILL the student worker (the driver restarts it from its last checkpoint)
    redis-empty   restart the job's Redis with its data gone (the driver resets the streams and
                  re-feeds every batch not in the student's ledger)
    redis-outage  stop Redis for a few seconds, then start it from a snapshot taken just before
                  (clients retry with backoff; writes after the snapshot are lost and re-fed)

The schedule (``plan_faults``) is a pure function of the seed: which kinds, in which order, and
after how many applied batches each fault fires, spread over 15-85 % of the job. Faults fire one
at a time: the next one waits until the student has applied batches again after the previous one.

A fault is *survived* when it was injected, the job then completed with exact accounting
(samples_distilled == samples_expected, no batch missing, one optimiser step per batch, so no
batch applied twice, no dead letters), and the recovery it calls for shows in report.json
(student: a restart from the checkpoint; redis-empty: a reset after the lost run marker;
teacher: a replacement replica). Exit status 0 only when every fault was survived.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))

KINDS = ("teacher", "student", "redis-empty", "redis-outage")
WINDOW = (0.15, 0.85)  # faults fire between these shares of the job's batches
OUTAGE_S = (1.0, 4.0)  # how long a redis-outage keeps the server down
SETTLE_TIMEOUT_S = 180.0  # no progress for this long after a fault: inject nothing more


# -- the schedule (pure) ------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedFault:
    index: int  # 1-based, in firing order
    kind: str
    after_batches: int  # fires once the student has applied this many batches
    down_s: float | None = None  # redis-outage only


def parse_kinds(text: str) -> tuple[str, ...]:
    """'teacher,student' -> ('teacher', 'student'); unknown or repeated names are errors."""
    kinds = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [kind for kind in kinds if kind not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"unknown fault kind(s) {unknown or [text]}: choose from {', '.join(KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"fault kind listed twice in {text!r}")
    return kinds


def plan_faults(n: int, kinds: tuple[str, ...], seed: int, total_batches: int,
                window: tuple[float, float] = WINDOW, outage_s: tuple[float, float] = OUTAGE_S) -> list[PlannedFault]:
    """``n`` faults: the kinds as even as possible (each kind once per round, the remainder drawn),
    in a shuffled order, each at a random batch of its own slice of the window (so they spread over
    the job and never share a batch)."""
    if n < 1:
        raise ValueError("plan at least one fault")
    first, last = math.ceil(window[0] * total_batches), math.floor(window[1] * total_batches)
    if last - first + 1 < n:
        raise ValueError(f"{n} faults do not fit in batches {first}-{last} of {total_batches}: "
                         "use more data, more epochs, a smaller batch or fewer faults")
    rng = random.Random(seed)
    sequence = list(kinds) * (n // len(kinds)) + rng.sample(kinds, n % len(kinds))
    rng.shuffle(sequence)
    width = (last - first + 1) / n
    faults = []
    for i, kind in enumerate(sequence):
        start, stop = first + math.ceil(i * width), first + math.ceil((i + 1) * width) - 1
        down_s = round(rng.uniform(*outage_s), 1) if kind == "redis-outage" else None
        faults.append(PlannedFault(i + 1, kind, rng.randint(start, stop), down_s))
    return faults


# -- what happened, and the verdict (pure) ------------------------------------------------------
@dataclass
class FaultRecord:
    planned: PlannedFault
    injected_at: float | None = None  # time.time()
    seconds_into_job: float | None = None
    batches_at_injection: int | None = None
    detail: str = ""
    error: str | None = None


def accounting(report: dict) -> dict:
    """The figures that prove nothing was lost or counted twice."""
    steps, expected = report["student_steps"], report["batches_expected"]
    per_epoch = report["samples_expected"] // max(report["epochs"], 1)
    figures = {
        "samples_distilled": report["samples_distilled"],
        "samples_expected": report["samples_expected"],
        "samples_per_epoch": report["samples_per_epoch"],
        "batches_expected": expected,
        "batches_applied": report["batches_applied"],
        "batches_missing": report["batches_missing"],
        "student_steps": steps,
        # One optimiser step per applied batch: any step beyond the job's batches applied one twice.
        "duplicates_applied": steps - expected,
        "duplicates_dropped": report["duplicates_dropped"],  # copies the ledger refused: as designed
        "dead_letters": report["dead_letters"],
        "recoveries": len(report["recoveries"]),
        "teacher_replicas_served": len(report["teachers"]),
        "resumed_from_step": report.get("resumed_from_step"),
    }
    figures["exact"] = (
        figures["samples_distilled"] == figures["samples_expected"]
        and figures["batches_missing"] == 0
        and steps == expected
        and figures["dead_letters"] == 0
        and all(int(n) == per_epoch for n in report["samples_per_epoch"].values())
        and len(report["samples_per_epoch"]) == report["epochs"]
    )
    return figures


def judge(records: list[FaultRecord], report: dict | None, job_error: str | None, replicas: int) -> dict:
    """Per fault: survived or not, and why; the recoveries each fault caused; the verdict."""
    figures = accounting(report) if report is not None else None
    exact = bool(figures and figures["exact"]) and job_error is None
    recoveries = sorted(report["recoveries"] if report else [], key=lambda r: r["detected_at"])
    injected = [r for r in records if r.injected_at is not None]
    caused: dict[int, list[dict]] = {r.planned.index: [] for r in records}
    unattributed = []
    for recovery in recoveries:  # belongs to the last fault injected before it was detected
        before = [r for r in injected if r.injected_at <= recovery["detected_at"]]
        (caused[before[-1].planned.index] if before else unattributed).append(recovery)
    teacher_kills = sum(1 for r in injected if r.planned.kind == "teacher")
    replaced = report is not None and len(report["teachers"]) >= replicas + teacher_kills

    faults = []
    for record in records:
        mine = caused[record.planned.index]
        kind = record.planned.kind
        if record.injected_at is None:
            why = record.error or "not injected (the job ended first)"
        elif not exact:
            why = job_error or "the job's accounting is not exact"
        elif kind == "student" and not any(r["student_restarted"] for r in mine):
            why = "no student restart followed the kill"
        elif kind == "redis-empty" and not any("Redis lost" in r["cause"] for r in mine):
            why = "the driver did not notice the lost data"
        elif kind == "teacher" and not replaced:
            why = "the pool did not replace every killed replica"
        else:
            why = ""
        faults.append({**asdict(record.planned), "seconds_into_job": record.seconds_into_job,
                       "batches_at_injection": record.batches_at_injection, "detail": record.detail,
                       "survived": not why, "why_not": why or None, "recoveries": mine})

    by_kind: dict[str, dict[str, int]] = {}
    for fault in faults:
        tally = by_kind.setdefault(fault["kind"], {"planned": 0, "injected": 0, "survived": 0})
        tally["planned"] += 1
        tally["injected"] += fault["seconds_into_job"] is not None
        tally["survived"] += fault["survived"]
    survived = sum(f["survived"] for f in faults)
    ok = survived == len(faults) and exact
    kinds_text = ", ".join(f"{kind} {t['survived']}/{t['planned']}" for kind, t in by_kind.items())
    if ok:
        verdict = f"PASS: {survived}/{len(faults)} faults survived ({kinds_text}), nothing lost or applied twice"
    else:
        problem = job_error or ("accounting not exact" if not exact else "a fault was not survived")
        verdict = f"FAIL: {survived}/{len(faults)} faults survived ({kinds_text}); {problem}"
    return {"ok": ok, "verdict": verdict, "faults": faults, "survived_by_kind": by_kind,
            "accounting": figures, "unattributed_recoveries": unattributed}


# -- injecting (I/O) ----------------------------------------------------------------------------
def kill_actor_process(class_name: str, rng: random.Random) -> str:
    """SIGKILLs the worker process of one live actor of ``class_name`` in this Ray session."""
    from ray._private import state  # the integration tests use the same view of live actors

    alive = sorted((info for info in state.actors().values()
                    if info["ActorClassName"] == class_name and info["State"] == "ALIVE"),
                   key=lambda info: info["Pid"])
    if not alive:
        raise RuntimeError(f"no live {class_name} to kill")
    victim = rng.choice(alive)
    os.kill(victim["Pid"], signal.SIGKILL)
    return f"SIGKILL pid {victim['Pid']} ({len(alive)} {class_name} alive)"


class ChaosMonkey(threading.Thread):
    """Fires the planned faults in order while the job runs, each once the student has applied its
    batch count and the job has made progress again since the previous fault."""

    def __init__(self, plan: list[PlannedFault], total_batches: int, server, progress_client, progress_key: str,
                 seed: int):
        super().__init__(daemon=True, name="chaos")
        self.records = [FaultRecord(fault) for fault in plan]
        self.total_batches = total_batches
        self.server, self.client, self.progress_key = server, progress_client, progress_key
        self.rng = random.Random(f"{seed}-victims")
        self.done = threading.Event()  # set by the main thread when the job has returned
        self.job_started = time.time()

    def batches(self) -> int:
        """Batches the student reports applied (0 while Redis has no progress hash)."""
        try:
            return int(self.client.hget(self.progress_key, "batches") or 0)
        except Exception:  # Redis restarting: ask again later
            return 0

    def inject(self, fault: PlannedFault) -> str:
        if fault.kind == "teacher":
            return kill_actor_process("TeacherActor", self.rng)
        if fault.kind == "student":
            return kill_actor_process("StudentActor", self.rng)
        if fault.kind == "redis-empty":
            self.server.restart(keep_data=False)
            return "redis restarted empty"
        self.server.restart(keep_data=True, down_s=fault.down_s)
        return f"redis down {fault.down_s:g} s, back from its snapshot"

    def run(self) -> None:
        for i, record in enumerate(self.records):
            fault = record.planned
            while not self.done.is_set() and self.batches() < fault.after_batches:
                time.sleep(0.02)
            if self.done.is_set():
                return
            record.batches_at_injection = self.batches()
            if record.batches_at_injection >= self.total_batches:  # the job is winding down, nothing to hit
                record.error = "not injected: the student had already applied every batch"
                return
            record.injected_at = time.time()
            record.seconds_into_job = round(record.injected_at - self.job_started, 2)
            try:
                record.detail = self.inject(fault)
            except Exception as exc:  # recorded; the fault then counts as not survived
                record.injected_at = record.seconds_into_job = None
                record.error = f"injection failed: {type(exc).__name__}: {exc}"
            print(f"[chaos] fault {fault.index} {fault.kind} at batch {record.batches_at_injection} "
                  f"(+{record.seconds_into_job} s): {record.error or record.detail}", flush=True)
            if not self.settled(record.batches_at_injection):
                if not self.done.is_set():
                    for later in self.records[i + 1:]:
                        later.error = f"not injected: no progress for {SETTLE_TIMEOUT_S:g} s after fault {fault.index}"
                return

    def settled(self, at_fault: int) -> bool:
        """Waits until the progress counter has shown two new values since the fault (the student is
        applying batches again); False when the job ended or stalled first."""
        seen, deadline = {at_fault, 0}, time.monotonic() + SETTLE_TIMEOUT_S
        while not self.done.is_set() and time.monotonic() < deadline:
            seen.add(self.batches())
            if len(seen) >= 4:
                return True
            time.sleep(0.05)
        return False


# -- the run ------------------------------------------------------------------------------------
def job_config(args: argparse.Namespace, redis_url: str, work_dir: Path):
    from polydistill.cluster.config import load_config

    overrides = [
        f"transport.redis_url={redis_url}",
        f"data.languages=[{', '.join(args.languages.split(','))}]",
        f"data.limit_per_language={args.samples}",
        "data.eval_split=null",  # the accounting is the point; no evaluation
        f"training.epochs={args.epochs}",
        f"training.batch_size={args.batch_size}",
        f"training.checkpoint_every={args.checkpoint_every}",
        "training.log_every=1",  # progress after every step: the chaos thread watches it
        f"training.max_recoveries={2 * args.faults + 2}",
        f"teacher.replicas={args.replicas}",
        "transport.reclaim_idle_ms=2000",  # a killed replica's batch is taken over after 2 s
        "transport.reconnect_timeout_s=30",
        *args.set,
    ]
    return load_config(args.config, overrides, output_dir=str(work_dir))


def run(args: argparse.Namespace) -> dict:
    import ray

    from polydistill.cluster.driver import run_job
    from polydistill.storage.job_data import load_job_split
    from polydistill.storage.keys import CONTROL_STOP, JobKeys
    from polydistill.storage.redis_server import PrivateRedisServer
    from polydistill.storage.streams import connect

    work_dir = Path(args.work_dir).resolve()
    shutil.rmtree(work_dir, ignore_errors=True)
    with PrivateRedisServer() as server:
        config = job_config(args, server.url, work_dir)
        rows = len(load_job_split(config.data, config.data.train_split).dataset)
        total_batches = -(-rows // config.training.batch_size) * config.training.epochs
        plan = plan_faults(args.faults, args.kinds, args.seed, total_batches)
        print(f"chaos: {Path(args.config).name}, {rows} samples x {config.training.epochs} epochs in batches of "
              f"{config.training.batch_size} = {total_batches} batches, {config.teacher.replicas} teacher replicas, "
              f"checkpoint every {config.training.checkpoint_every} steps; seed {args.seed}; {len(plan)} faults: "
              + ", ".join(f"{f.kind}@{f.after_batches}" for f in plan), flush=True)

        keys = JobKeys(config.resolved_job_id, config.transport.namespace)
        client = connect(server.url, socket_timeout=5, reconnect_timeout_s=30)
        monkey = ChaosMonkey(plan, total_batches, server, client, keys.progress, args.seed)
        watchdog = threading.Timer(args.timeout_s, lambda: client.hset(keys.control, CONTROL_STOP, "1"))
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        report, job_error = None, None
        started = time.perf_counter()
        try:
            monkey.job_started = time.time()
            monkey.start()
            watchdog.start()
            report = run_job(config, show_progress=False)
        except Exception as exc:  # reported with the accounting, which report.json may still hold
            job_error = f"{type(exc).__name__}: {exc}"
        finally:
            wall = time.perf_counter() - started
            watchdog.cancel()
            monkey.done.set()
            monkey.join(timeout=60)
            ray.shutdown()
        if report is None and (work_dir / "report.json").exists():
            report = json.loads((work_dir / "report.json").read_text())

    result = judge(monkey.records, report, job_error, config.teacher.replicas)
    return {
        "seed": args.seed,
        "faults_requested": args.faults,
        "kinds": list(args.kinds),
        "job": {"config": str(args.config), "languages": args.languages.split(","), "samples": rows,
                "epochs": config.training.epochs, "batch_size": config.training.batch_size,
                "batches": total_batches, "teacher_replicas": config.teacher.replicas,
                "checkpoint_every": config.training.checkpoint_every, "extra_overrides": list(args.set)},
        "wall_seconds": round(wall, 1),
        "job_error": job_error,
        **result,
        "machine": {"cpu_count": os.cpu_count(), "system": f"{platform.system()} {platform.machine()}",
                    "python": platform.python_version(), "ray": ray.__version__},
    }


def print_summary(summary: dict) -> None:
    print(f"\n{'#':>2}  {'kind':<13}{'planned':>8}{'at batch':>9}{'t (s)':>8}  {'survived':<9}detail / recovery")
    for fault in summary["faults"]:
        t = "-" if fault["seconds_into_job"] is None else f"{fault['seconds_into_job']:.1f}"
        at = "-" if fault["batches_at_injection"] is None else fault["batches_at_injection"]
        recovered = "; ".join(f"{r['cause']}: {r['batches_refed']} batches re-fed in {r['seconds']:.1f} s"
                              + (", student restarted" if r["student_restarted"] else "")
                              for r in fault["recoveries"])
        text = " | ".join(part for part in (fault["detail"], recovered, fault["why_not"]) if part)
        print(f"{fault['index']:>2}  {fault['kind']:<13}{fault['after_batches']:>8}{at:>9}{t:>8}  "
              f"{'yes' if fault['survived'] else 'NO':<9}{text}")
    figures = summary["accounting"]
    if figures is None:
        print("\nno report.json: nothing to account for")
    else:
        print(f"\nsamples distilled {figures['samples_distilled']} / expected {figures['samples_expected']} "
              f"(per epoch {figures['samples_per_epoch']}); batches {figures['batches_applied']} applied, "
              f"{figures['batches_missing']} missing; student steps {figures['student_steps']} for "
              f"{figures['batches_expected']} batches -> duplicates applied {figures['duplicates_applied']} "
              f"(duplicates dropped by the ledger {figures['duplicates_dropped']}); dead letters "
              f"{figures['dead_letters']}; recoveries {figures['recoveries']}; teacher replicas served "
              f"{figures['teacher_replicas_served']}; job {summary['wall_seconds']} s")
    if summary["unattributed_recoveries"]:
        print(f"recoveries before any fault: {summary['unattributed_recoveries']}")
    print(summary["verdict"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "examples" / "tiny.yaml"))
    parser.add_argument("--faults", type=int, default=4, help="how many faults to inject (default 4)")
    parser.add_argument("--seed", type=int, default=None, help="schedule seed (default: random, printed)")
    parser.add_argument("--kinds", type=parse_kinds, default=KINDS, help=f"comma-separated, from {','.join(KINDS)}")
    parser.add_argument("--languages", default="eng_Latn,swh_Latn")
    parser.add_argument("--samples", type=int, default=200, help="training sentences per language")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=2, help="teacher replicas")
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other job override")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "chaos"), help="the job's output dir (emptied first)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "chaos.json"))
    parser.add_argument("--timeout-s", type=float, default=900, help="ask the job to stop after this long")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = time.time_ns() % 1_000_000
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    summary = run(args)
    print_summary(summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
