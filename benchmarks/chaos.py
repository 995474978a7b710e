"""Chaos run: distillation jobs with faults injected at seeded random moments, each followed by the
accounting, and each run's student compared with the student of the same job run without faults.

    python benchmarks/chaos.py                          # 5 runs x 9 faults (every kind once) + a fault-free run
    python benchmarks/chaos.py --runs 1 --faults 8 --seed 7 --kinds teacher,student,redis-empty,redis-outage
    python benchmarks/chaos.py --kinds student,poison-work --faults 3

Kinds of fault:
    teacher           SIGKILL one teacher replica's worker (another replica reclaims its pending batch;
                      the pool starts a replacement)
    student           SIGKILL the student worker (the driver restarts it from its last checkpoint)
    pool              SIGKILL the teacher-pool actor (Ray restarts it; it takes its replicas down with it
                      and starts new ones, which reclaim what the old ones held)
    feeder            SIGKILL the feeder actor (Ray restarts it; the driver re-feeds what the students lack)
    cache-writer      SIGKILL the knowledge-cache writer (Ray restarts it with a new partial cache);
                      the job then runs with knowledge_cache.enabled
    redis-empty       restart the job's Redis with its data gone (the driver resets the streams and
                      re-feeds every batch not in the student's ledger)
    redis-outage      stop Redis for a few seconds, then start it from a snapshot taken just before
                      (clients retry with backoff; writes after the snapshot are lost and re-fed)
    poison-work       write 3 bad work batches (an overflowing shape, token ids past the vocabulary,
                      rows past the positions); the first takes a planned batch's place if no teacher
                      has read it yet, so that batch's samples are dead-lettered
    poison-knowledge  write 2 bad knowledge messages (an epoch outside the plan, token ids past the
                      vocabulary) beside the planned ones

The schedule (``chaos_plan.plan_faults``) is a pure function of the seed. Faults fire one at a time:
the next one waits until the student has applied batches again after the previous one.

A fault is *survived* when it was injected, the job then completed with exact accounting (every
sample distilled once or dead-lettered, dead letters only for bad messages, one optimiser step per
applied batch), and the recovery it calls for shows in report.json. A run's student is *the same*
as the fault-free run's when their held-out accuracies differ by less than 1.96 standard errors.
Exit status 0 only when every fault was survived and every student is the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.chaos_faults import NothingToKill, kill_actor_process, poison_knowledge, poison_work  # noqa: E402
from benchmarks.chaos_plan import (  # noqa: E402
    KILLED_ACTOR,
    KINDS,
    FaultRecord,
    PlannedFault,
    judge,
    parse_kinds,
    plan_faults,
    same_student,
    tally_by_kind,
)

SETTLE_TIMEOUT_S = 180.0  # no progress for this long after a fault: inject nothing more


class ChaosMonkey(threading.Thread):
    """Fires the planned faults in order while the job runs, each once the student has applied its
    batch count and the job has made progress again since the previous fault."""

    def __init__(self, plan: list[PlannedFault], total_batches: int, server, client, keys, seed: int):
        super().__init__(daemon=True, name="chaos")
        self.records = [FaultRecord(fault) for fault in plan]
        self.total_batches = total_batches
        self.server, self.client, self.keys = server, client, keys
        self.rng = random.Random(f"{seed}-victims")
        self.done = threading.Event()  # set by the main thread when the job has returned
        self.job_started = time.time()

    def batches(self) -> int:
        """Batches the student reports applied (0 while Redis has no progress hash)."""
        try:
            return int(self.client.hget(self.keys.progress, "batches") or 0)
        except Exception:  # Redis restarting: ask again later
            return 0

    def inject(self, record: FaultRecord) -> str:
        fault = record.planned
        if fault.kind in KILLED_ACTOR:
            return kill_actor_process(KILLED_ACTOR[fault.kind], self.rng)
        if fault.kind in ("poison-work", "poison-knowledge"):
            write = poison_work if fault.kind == "poison-work" else poison_knowledge
            detail, record.poison_messages = write(self.client, self.keys)
            return detail
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
                record.detail = self.inject(record)
            except NothingToKill as exc:  # late in the job: nothing left to hit
                record.injected_at = record.seconds_into_job = None
                record.skipped, record.detail = True, f"skipped: {exc}"
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
def job_config(args: argparse.Namespace, redis_url: str, work_dir: Path, kinds: tuple[str, ...]):
    from polydistill.cluster.config import load_config

    overrides = [
        f"transport.redis_url={redis_url}",
        f"data.languages=[{', '.join(args.languages.split(','))}]",
        f"data.limit_per_language={args.samples}",
        f"data.eval_split={args.eval_split}",  # the student is compared with the fault-free run's on it
        "evaluation.ablation=false",
        f"training.epochs={args.epochs}",
        f"training.batch_size={args.batch_size}",
        f"training.checkpoint_every={args.checkpoint_every}",
        "training.log_every=1",  # progress after every step: the chaos thread watches it
        f"training.max_recoveries={2 * args.faults + 2}",
        f"teacher.replicas={args.replicas}",
        "transport.reclaim_idle_ms=2000",  # a killed replica's batch is taken over after 2 s
        "transport.reconnect_timeout_s=30",
        "transport.max_deliveries=3",
        # A random-weight teacher teaches noise: mostly labels and a higher rate, so that the student learns
        # something and the comparison with the fault-free run's student means more than "both predict one class".
        "training.lr=3e-3",
        "distill.hard_weight=0.8",
        "distill.soft_weight=0.2",
        *args.set,
    ]
    if "cache-writer" in kinds:
        overrides += ["knowledge_cache.enabled=true", f"knowledge_cache.dir={work_dir / 'knowledge-cache'}"]
    return load_config(args.config, overrides, output_dir=str(work_dir))


def ray_restart_counts() -> dict[str, int]:
    """How often Ray restarted the actors of each class this session ran (the GCS's view)."""
    from ray._private import state

    counts: dict[str, int] = {}
    for info in state.actors().values():
        counts[info["ActorClassName"]] = counts.get(info["ActorClassName"], 0) + int(info.get("NumRestarts") or 0)
    return counts


def run_once(args: argparse.Namespace, seed: int, faults: int, work_dir: Path) -> dict:
    """One job with ``faults`` faults (0: the fault-free reference) on a private Redis and a local Ray."""
    import ray

    from polydistill.cluster.driver import run_job
    from polydistill.storage.job_data import load_job_split
    from polydistill.storage.keys import CONTROL_STOP, JobKeys
    from polydistill.storage.redis_server import PrivateRedisServer
    from polydistill.storage.streams import connect

    shutil.rmtree(work_dir, ignore_errors=True)
    kinds = args.kinds if faults else ()
    with PrivateRedisServer() as server:
        config = job_config(args, server.url, work_dir, args.kinds)
        rows = len(load_job_split(config.data, config.data.train_split).dataset)
        eval_rows = len(load_job_split(config.data, config.data.eval_split).dataset)
        total_batches = -(-rows // config.training.batch_size) * config.training.epochs
        plan = plan_faults(faults, kinds, seed, total_batches) if faults else []
        print(f"chaos: {Path(args.config).name}, {rows} samples x {config.training.epochs} epochs in batches of "
              f"{config.training.batch_size} = {total_batches} batches, {config.teacher.replicas} teacher replicas; "
              f"seed {seed}; {len(plan)} faults: " + (", ".join(f"{f.kind}@{f.after_batches}" for f in plan) or "none"),
              flush=True)

        keys = JobKeys(config.resolved_job_id, config.transport.namespace)
        client = connect(server.url, socket_timeout=5, reconnect_timeout_s=30)
        monkey = ChaosMonkey(plan, total_batches, server, client, keys, seed)
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
            traceback.print_exc()
        finally:
            wall = time.perf_counter() - started
            watchdog.cancel()
            monkey.done.set()
            monkey.join(timeout=60)
            restarts = ray_restart_counts()
            ray.shutdown()
        if report is None and (work_dir / "report.json").exists():
            report = json.loads((work_dir / "report.json").read_text())

    result = judge(monkey.records, report, job_error, config.teacher.replicas, restarts)
    accuracy = report["overall"]["student"]["accuracy"] if report and "overall" in report else None
    return {"seed": seed, "faults_requested": faults, "kinds": list(kinds), "wall_seconds": round(wall, 1),
            "job_error": job_error, "status": report and report.get("status"),
            "samples_dead_lettered": report and report.get("samples_dead_lettered"),
            "student_accuracy": accuracy, "eval_rows": eval_rows, **result}


def run(args: argparse.Namespace) -> dict:
    import ray

    work_root = Path(args.work_dir).resolve()
    reference = run_once(args, args.seed, 0, work_root / "reference")
    runs = []
    for i in range(args.runs):
        seed = args.seed + i
        outcome = run_once(args, seed, args.faults, work_root / f"run-{seed}")
        if reference["student_accuracy"] is not None and outcome["student_accuracy"] is not None:
            outcome["same_student"] = same_student(outcome["student_accuracy"], reference["student_accuracy"],
                                                   outcome["eval_rows"])
        else:
            outcome["same_student"] = None
        print_run(outcome)
        runs.append(outcome)

    by_kind = tally_by_kind([fault for outcome in runs for fault in outcome["faults"]])
    injected = sum(t["injected"] for t in by_kind.values())
    survived = sum(t["survived"] for t in by_kind.values())
    same = all(r["same_student"] and r["same_student"]["equal"] for r in runs)
    ok = reference["ok"] and all(r["ok"] for r in runs) and same
    tallies = ", ".join(f"{kind} {t['survived']}/{t['injected']}" for kind, t in by_kind.items())
    skipped = sum(t["skipped"] for t in by_kind.values())
    verdict = (f"{'PASS' if ok else 'FAIL'}: {survived}/{injected} injected faults survived over {len(runs)} runs "
               f"({tallies}); students {'all' if same else 'not all'} equal to the fault-free run's"
               + (f"; {skipped} skipped (nothing alive to hit)" if skipped else ""))
    return {
        "verdict": verdict, "ok": ok, "seed": args.seed, "runs": runs, "reference": reference,
        "survived_by_kind": by_kind,
        "job": {"config": str(args.config), "languages": args.languages.split(","), "samples_per_language": args.samples,
                "epochs": args.epochs, "batch_size": args.batch_size, "teacher_replicas": args.replicas,
                "checkpoint_every": args.checkpoint_every, "eval_split": args.eval_split,
                "extra_overrides": list(args.set)},
        "machine": {"cpu_count": os.cpu_count(), "system": f"{platform.system()} {platform.machine()}",
                    "python": platform.python_version(), "ray": ray.__version__},
    }


def print_run(outcome: dict) -> None:
    print(f"\n{'#':>2}  {'kind':<17}{'planned':>8}{'at batch':>9}{'t (s)':>8}  {'survived':<9}detail / recovery")
    for fault in outcome["faults"]:
        t = "-" if fault["seconds_into_job"] is None else f"{fault['seconds_into_job']:.1f}"
        at = "-" if fault["batches_at_injection"] is None else fault["batches_at_injection"]
        recovered = "; ".join(f"{r['cause']}: {r['batches_refed']} batches re-fed in {r['seconds']:.1f} s"
                              + (", student restarted" if r["student_restarted"] else "")
                              for r in fault["recoveries"])
        text = " | ".join(part for part in (fault["detail"], recovered, fault["why_not"]) if part)
        print(f"{fault['index']:>2}  {fault['kind']:<17}{fault['after_batches']:>8}{at:>9}{t:>8}  "
              f"{'yes' if fault['survived'] else 'NO':<9}{text}")
    figures = outcome["accounting"]
    if figures is None:
        print("no report.json: nothing to account for")
    else:
        print(f"samples distilled {figures['samples_distilled']} + dead-lettered {figures['samples_dead_lettered']} "
              f"/ expected {figures['samples_expected']}; batches {figures['batches_applied']} applied, "
              f"{figures['batches_missing']} missing; student steps {figures['student_steps']} -> duplicates "
              f"applied {figures['duplicates_applied']} (dropped by the ledger {figures['duplicates_dropped']}); "
              f"dead letters {figures['dead_letters']} of {figures['poison_messages']} bad messages; recoveries "
              f"{figures['recoveries']}; job {outcome['wall_seconds']} s")
    if outcome["same_student"]:
        same = outcome["same_student"]
        print(f"student accuracy {same['accuracy']:.3f} against {same['reference']:.3f} without faults "
              f"(difference {same['difference']:+.3f}, tolerance {same['tolerance']:.3f} on {same['rows']} rows): "
              f"{'same' if same['equal'] else 'DIFFERENT'}")
    print(outcome["verdict"], flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "examples" / "tiny.yaml"))
    parser.add_argument("--runs", type=int, default=5, help="faulted runs, seeds seed..seed+runs-1 (default 5)")
    parser.add_argument("--faults", type=int, default=len(KINDS), help=f"faults per run (default {len(KINDS)})")
    parser.add_argument("--seed", type=int, default=None, help="first schedule seed (default: random, printed)")
    parser.add_argument("--kinds", type=parse_kinds, default=KINDS, help=f"comma-separated, from {','.join(KINDS)}")
    parser.add_argument("--languages", default="eng_Latn,swh_Latn")
    parser.add_argument("--samples", type=int, default=400, help="training sentences per language")
    parser.add_argument("--eval-split", default="test", help="held-out split the students are compared on")
    # One epoch: with cache-writer faults the cache is on, and a sealed cache would serve later epochs
    # without teachers (nothing left for teacher, pool or poison-work faults to hit).
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=2, help="teacher replicas")
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other job override")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "chaos"), help="the jobs' output dirs (emptied first)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "chaos.json"))
    parser.add_argument("--timeout-s", type=float, default=900, help="ask a job to stop after this long")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.seed is None:
        args.seed = time.time_ns() % 1_000_000
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    summary = run(args)
    print(f"\n{summary['verdict']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
