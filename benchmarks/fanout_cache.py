"""Fan-out and the knowledge cache, measured on whole jobs (``cluster/driver.py``'s ``run_job``).

- **fan-out**: one job in which K students learn from one teacher pass (each its own consumer
  group on the knowledge stream) ÷ K separate jobs of one student each, in distillation wall time
  (the driver's ``stage_seconds.distill``: actors started, every student done). Below 1: the
  shared pass saves time; 1/K would be free students.
- **cache**: the student's epoch wall time when every batch is recomputed by a teacher replica ÷
  the same epoch served from a complete knowledge cache (no teacher running). Above 1: the cache
  is faster.

Every job uses examples/tiny.yaml's models with pinned threads (student 1, teacher replica 1).
The models are built once and every job reads the same teacher folder, so the cache key matches.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from polydistill.cluster.config import JobConfig, load_config
from polydistill.cluster.driver import run_job

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"


@dataclass(frozen=True)
class FanoutSettings:
    languages: tuple[str, ...]
    limit_per_language: int
    epochs: int
    fanout_k: tuple[int, ...]
    repeats: int


QUICK = FanoutSettings(("eng_Latn", "swh_Latn"), 200, 2, (2, 4), 2)
FULL = FanoutSettings(("eng_Latn", "fra_Latn", "swh_Latn", "zho_Hans"), 300, 2, (2, 4), 2)


def _config(settings: FanoutSettings, work_dir: Path, name: str, redis_url: str, *extra: str) -> JobConfig:
    languages = "[" + ", ".join(settings.languages) + "]"
    return load_config(TINY, [
        f"job_id=bench-{name}", f"data.languages={languages}", f"data.limit_per_language={settings.limit_per_language}",
        "data.eval_split=null", f"training.epochs={settings.epochs}", "training.batch_size=32",
        "training.log_every=1000000", "teacher.replicas=1", "teacher.threads=1", "teacher.num_cpus=1",
        "student.threads=1", f"transport.redis_url={redis_url}", *extra,
    ], output_dir=str(work_dir / name))


def _extra_students(k: int) -> str:
    # The same architecture as the main student: the fan-out figure then isolates the shared pass.
    return "extra_students=[" + ", ".join(
        f"{{name: s{i}, config: {{num_hidden_layers: 2, hidden_size: 64, num_attention_heads: 2, "
        f"intermediate_size: 128}}, threads: 1, num_cpus: 1}}" for i in range(1, k)) + "]"


def measure(settings: FanoutSettings, redis_url: str, log) -> dict:
    work_dir = Path(tempfile.mkdtemp(prefix="polydistill-fanout-"))
    try:
        log("fan-out and cache: building the models once ...")
        base = run_job(_config(settings, work_dir, "base", redis_url), show_progress=False)
        teacher = f"teacher.model={base['teacher_path']}"
        single, fanned = [], {k: [] for k in settings.fanout_k}
        recompute, cached = [], []
        for repeat in range(settings.repeats):
            log(f"fan-out: 1 student, repeat {repeat + 1}/{settings.repeats} ...")
            single.append(_distill_seconds(run_job(
                _config(settings, work_dir, f"single-{repeat}", redis_url, teacher), show_progress=False)))
            for k in settings.fanout_k:
                log(f"fan-out: {k} students from one pass ...")
                report = run_job(_config(settings, work_dir, f"fan{k}-{repeat}", redis_url, teacher, _extra_students(k)),
                                 show_progress=False)
                _check_exact(report, k)
                fanned[k].append(_distill_seconds(report))
            cache_dir = f"knowledge_cache.dir={work_dir / f'cache-{repeat}'}"
            log("cache: an epoch recomputed by the teacher (filling the cache) ...")
            filling = run_job(_config(settings, work_dir, f"fill-{repeat}", redis_url, teacher,
                                      "knowledge_cache.enabled=true", cache_dir, "training.epochs=1"),
                              show_progress=False)
            if not filling["knowledge_cache"]["writer"]["sealed"]:
                raise RuntimeError("the cache was not sealed after a full epoch: the benchmark cannot go on")
            recompute.append(filling["student_seconds"]["total"])
            log("cache: the same epoch from the cache ...")
            served = run_job(_config(settings, work_dir, f"served-{repeat}", redis_url, teacher,
                                     "knowledge_cache.enabled=true", cache_dir, "training.epochs=1"),
                             show_progress=False)
            if not served["knowledge_cache"]["read_from_start"]:
                raise RuntimeError("the second job did not read the cache: its key differs")
            cached.append(served["student_seconds"]["total"])
        single_s = statistics.median(single)
        by_k = {str(k): round(statistics.median(times) / (k * single_s), 4) for k, times in fanned.items()}
        return {
            "fanout_by_k": by_k,
            "fanout": by_k[str(max(settings.fanout_k))],
            "cache_speedup": round(statistics.median(recompute) / statistics.median(cached), 4),
            "details": {
                "single_student_distill_seconds": single,
                "fanout_distill_seconds": {str(k): v for k, v in fanned.items()},
                "epoch_recomputed_student_seconds": recompute,
                "epoch_from_cache_student_seconds": cached,
                "samples_per_epoch": base["samples_expected"] // settings.epochs,
            },
        }
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _distill_seconds(report: dict) -> float:
    return float(report["stage_seconds"]["distill"])


def _check_exact(report: dict, k: int) -> None:
    students = [report, *report["extra_students"].values()]
    if len(students) != k or any(s["samples_distilled"] != report["samples_expected"] for s in students):
        raise RuntimeError(f"fan-out run with {k} students lost samples: the figure would be meaningless")
