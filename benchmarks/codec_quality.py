"""Does packing the soft labels change what the student learns? The two language-modelling examples,
each run with the teacher's top-k sent as float32 (``distill.value_bits`` 32, what version 1 sent),
in 16 bits (the default) and in 8 bits, same seed; and with float32 again under another seed, which
says how far a student moves by chance alone (the seed draws the random teacher too).

    python benchmarks/codec_quality.py            # about 10 minutes on 2 cores

Each run is a whole job (``run_job``) on a private Redis and a local Ray; the teacher is a random
model with a wide initialisation (``initializer_range`` 0.3) so that its distributions are peaked
enough for the value bits to matter. Per language the report's student scores: agreement (the
student's top-1 is the teacher's), next-token / masked-token accuracy, and mean NLL of the text.
Writes ``benchmarks/results/codec_quality.json`` and prints a table.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))

EXAMPLES = {"masked-lm": REPO / "examples" / "tiny_masked_lm.yaml", "causal-lm": REPO / "examples" / "tiny_causal_lm.yaml"}
RUNS = (("float32", 32, 0), ("16 bits", 16, 0), ("8 bits", 8, 0), ("float32, seed 1", 32, 1))
SCORES = ("agreement", "accuracy", "nll")


def run(example: Path, value_bits: int, seed: int, redis_url: str, out: Path) -> dict:
    from polydistill.cluster.config import load_config
    from polydistill.cluster.driver import run_job

    config = load_config(example, [f"transport.redis_url={redis_url}", f"distill.value_bits={value_bits}",
                                   f"training.seed={seed}", "teacher.config.initializer_range=0.3",
                                   "evaluation.latency=false"], output_dir=str(out))
    started = time.perf_counter()
    report = run_job(config, show_progress=False)
    return {"seconds": round(time.perf_counter() - started, 1),
            "wire_bytes_per_sample": report["wire_bytes_per_sample"],
            "per_language": {language: {score: row["student"][score] for score in SCORES}
                             for language, row in report["per_language"].items()}}


def mean_over_languages(result: dict, score: str) -> float:
    rows = result["per_language"].values()
    return sum(row[score] for row in rows) / len(rows)


def main() -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    from polydistill.cluster.quiet import quiet_libraries
    from polydistill.storage.redis_server import PrivateRedisServer

    quiet_libraries()
    results: dict = {}
    with PrivateRedisServer() as server, tempfile.TemporaryDirectory(prefix="polydistill-codec-") as work:
        for task, example in EXAMPLES.items():
            for label, bits, seed in RUNS:
                print(f"{task}: {label} ...", file=sys.stderr, flush=True)
                results.setdefault(task, {})[label] = run(example, bits, seed, server.url,
                                                          Path(work) / f"{task}-{bits}-{seed}")
    out = REPO / "benchmarks" / "results" / "codec_quality.json"
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print("| task | run | wire bytes / sample | agreement | accuracy | NLL |")
    print("| --- | --- | --- | --- | --- | --- |")
    for task, runs in results.items():
        for label, result in runs.items():
            figures = " | ".join(f"{mean_over_languages(result, score):.4f}" for score in SCORES)
            print(f"| {task} | {label} | {result['wire_bytes_per_sample']:,.0f} | {figures} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
