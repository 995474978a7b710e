"""polydistill benchmarks (issue 7): every figure a ratio of two things measured in this run.

    python benchmarks/run.py --quick                       # ~2-3 min on 2 cores
    python benchmarks/run.py --out benchmarks/results/full.json   # ~10 min

Writes a JSON results file and prints a Markdown table. See benchmarks/README.md for what each
figure means and how to read it on a small machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.summary import build_result, render_table, secondary_row  # noqa: E402


def machine_info() -> dict:
    """What the figures were measured on; no host names, users or paths."""
    import msgpack
    import numpy
    import ray
    import redis
    import torch
    import transformers

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10).stdout
        redis_server = next((part.split("=", 1)[1] for part in server.split() if part.startswith("v=")), server.strip())
    except (OSError, subprocess.SubprocessError):
        redis_server = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "torch_threads_default": torch.get_num_threads(),
        "torch_threads_student": 1,
        "torch_threads_per_teacher_replica": 1,
        "system": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "redis_py": redis.__version__,
                     "msgpack": ".".join(map(str, msgpack.version)), "numpy": numpy.__version__,
                     "transformers": transformers.__version__, "redis_server": redis_server},
        "gpu": "none used",
    }


NULL_REASONS: dict[str, str] = {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and fewer repeats (~2-3 min on 2 cores)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default benchmarks/results/quick.json or full.json)")
    args = parser.parse_args(argv)
    out = args.out or REPO / "benchmarks" / "results" / ("quick.json" if args.quick else "full.json")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    from polydistill.cluster.quiet import quiet_libraries

    quiet_libraries()

    import ray
    import torch

    from benchmarks import capacity, fanout_cache, pace, transport, wire_size
    from polydistill.storage.redis_server import PrivateRedisServer

    machine = machine_info()
    started = time.perf_counter()
    load_before = os.getloadavg()
    mode = "quick" if args.quick else "full"

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    torch.set_num_threads(1)
    with PrivateRedisServer() as server:
        log("starting a local Ray ...")
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 configure_logging=False)
        try:
            log("student pace: no teacher / inline / pipeline ...")
            paced = pace.measure(pace.QUICK if args.quick else pace.FULL, server.url, log)
        finally:
            ray.shutdown()
        # Whole jobs: up to 4 students and a teacher replica, one logical CPU each (threads stay pinned to 1).
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 configure_logging=False)
        try:
            shared = fanout_cache.measure(fanout_cache.QUICK if args.quick else fanout_cache.FULL, server.url, log)
        finally:
            ray.shutdown()
        log("transport ...")
        moved = transport.measure(transport.QUICK if args.quick else transport.FULL, server.url,
                                  paced["realistic_knowledge"], paced["student_step_seconds"],
                                  paced["inline_teacher_forward_seconds"], log)
        served = capacity.measure(server.url, 1.5 if args.quick else 5.0, log)
    wire = wire_size.measure(32 if args.quick else 96, log)

    headline = {
        "student_pace_retention": paced["student_pace_retention"],
        "student_pace_retention_cached": paced["student_pace_retention_cached"],
        "inline_over_pipeline_time": paced["inline_over_pipeline_time"],
        "transport_share_of_step": paced["transport_share_of_step_cached"],
        "topk32_wire_ratio": wire["topk32_wire_ratio"],
        "topk128_bytes_per_token": wire["topk128_bytes_per_token"],
        "topk128_kl_v1_vs_v2": wire["topk128_kl_v1_vs_v2_8bit"],
        "codec_over_memcpy_1mb": moved["sizes"]["1MB"]["v2_hidden_states"]["decode_over_memcpy_throughput"],
        "fanout": shared["fanout"],
        "cache_speedup": shared["cache_speedup"],
    }
    machine["load_average_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    details = {
        "pace": {
            **paced["details"],
            "retention_by_setup": paced["retention_by_setup"],
            "student_wait_share": paced["student_wait_share"],
            "realistic_knowledge": pace.knowledge_sizes(paced["realistic_knowledge"]),
        },
        "transport": moved,
        "wire": wire,
        "fanout_and_cache": shared,
        "capacity": served,
    }
    headline_setup = next(iter(paced["retention_by_setup"]))
    secondary = [
        secondary_row("student wait share", paced["student_wait_share"],
                      "wait_seconds / wall of the pipeline student, steady epochs"),
        secondary_row("student step wall, pipeline ÷ alone", paced["step_over_alone"],
                      "the same step's wall time inside the pipeline ÷ with no teacher: > 1 is lost CPU"),
        secondary_row("student step CPU, pipeline ÷ alone", paced["step_cpu_over_alone"],
                      "the same step's thread CPU time: ≈ 1 means the step does no extra work"),
        secondary_row("student samples per CPU-second, pipeline ÷ alone", paced["cpu_retention"],
                      "retention with the contention and the waiting taken out: the loop's own overhead"),
        *[secondary_row(f"retention, {name.split('_r')[1]} replicas beside the student", value,
                        "as student_pace_retention with this many teacher replicas")
          for name, value in paced["retention_by_setup"].items()
          if name.startswith("colocated") and name != headline_setup],
        secondary_row("teacher forward ÷ student step", paced["teacher_forward_over_student_step"],
                      "inline, 1 thread each: > 1 means one replica on one core cannot keep up with the student"),
        secondary_row("teacher forward, pipeline ÷ inline", paced["teacher_forward_over_inline"],
                      "a replica's forward beside the student ÷ the same forward alone: CPU lost to sharing cores"),
        secondary_row("retention, teachers ahead", paced["retention_by_setup"].get("teachers_ahead"),
                      "as student_pace_retention, but the stream was filled before the student started"),
        secondary_row("decode ÷ memcpy throughput, hidden states 4 MB", moved["sizes"]["4MB"]["v2_hidden_states"][
                      "decode_over_memcpy_throughput"], "as codec_over_memcpy_1mb, a 4 MB message"),
        secondary_row("encode + decode ÷ memcpy, 1 MB top-32, wire v2", moved["sizes"]["1MB"]["v2"][
                      "codec_over_memcpy_throughput"], "wire.encode + wire.decode GB/s ÷ numpy copy GB/s, float32 values"),
        secondary_row("encode + decode ÷ memcpy, 1 MB top-32, wire v1", moved["sizes"]["1MB"]["codec_over_memcpy_throughput"],
                      "the same in version 1 (arrays inside the msgpack map)"),
        secondary_row("top-128 bytes per token, wire v1", wire["topk128_v1_bytes_per_token"],
                      "float32 values and int32 ids, as version 1 sends them"),
        secondary_row("KL v1 ‖ v2 16-bit, top-128 (nats/token)", wire["topk128_kl_v1_vs_v2_16bit"],
                      "distill.value_bits 16 (the default): mean per token, worst of the two logit shapes"),
        secondary_row("transport ÷ step, read in the loop", moved["transport_share_of_step"],
                      "decode + Redis round trip of the job's message ÷ the step: what reading ahead takes off the loop"),
        secondary_row("transport ÷ step, teachers beside the student",
                      paced["details"]["pipeline_by_setup"][headline_setup]["transport_share_of_step"],
                      "as transport_share_of_step in the co-located run: there fetching includes waiting for teachers"),
        secondary_row("Redis round trip ÷ redis-benchmark, 1 MB",
                      moved["sizes"]["1MB"]["round_trip_over_redis_benchmark_throughput"],
                      "XADD + XREADGROUP + XACK/XDEL via JobStreams ÷ redis-benchmark SET + GET, GB/s"),
        secondary_row("top-32 wire ratio, fp16 values", wire["topk32_fp16_wire_ratio"],
                      "as topk32_wire_ratio if the teacher sent its top-k values as float16"),
        secondary_row("KL full ‖ top-32, Zipf 1.5, T=1 (nats)",
                      wire["fidelity"]["zipf_1.5"]["kl_full_vs_topk_nats_per_token"]["top32_T1_fp32values"]["median"],
                      "synthetic peaked logits (no real LM head offline); median per token"),
        *[secondary_row(f"fan-out, {k} students ÷ {k} separate runs", value,
                        "distillation wall time of one teacher pass feeding K students ÷ K one-student jobs")
          for k, value in shared["fanout_by_k"].items() if value != shared["fanout"]],
        secondary_row("extra consumer ÷ teacher forward", moved["extra_consumer"]["extra_consumer_over_teacher_forward"],
                      "a second student reading a message (XREADGROUP + XACK + decode) ÷ recomputing it"),
    ]
    result = build_result(
        headline, NULL_REASONS, machine, details,
        mode=mode,
        runtime_seconds=round(time.perf_counter() - started, 1),
        student_wait_share=paced["student_wait_share"],
        secondary=secondary,
        notes=[
            f"{machine['cpu_count']} cores shared by the student (1 thread), each teacher replica (1 thread), "
            "Redis, Ray and anything else running: on a small machine teachers and student compete for cores, "
            "which the pace figures include. details.pace.retention_by_setup.teachers_ahead shows the student's pace "
            "when the stream was filled before it started (teachers on other hardware that keep up).",
            "Absolute timings are noisy; only ratios of medians taken in this run are reported as figures.",
        ],
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=_json_default) + "\n", encoding="utf-8")
    print(render_table(result))
    print(f"runtime {result['runtime_seconds']} s ({mode}); results in {_shown(out)}")
    _remove(paced["work_dir"])
    return 0


def _json_default(value):
    import numpy as np

    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to the results file")


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _remove(directory: Path) -> None:
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
