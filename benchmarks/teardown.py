"""The end of `polydistill run`, repeated: every run must exit 0 without a crash at interpreter exit.

    python benchmarks/teardown.py               # 20 runs of examples/tiny.yaml, one epoch each
    python benchmarks/teardown.py --runs 5

Each run is a fresh `polydistill run` process (private Redis, local Ray, two teacher replicas, the
student, evaluation and the report), so the whole shutdown path runs every time: actors killed,
Ray shut down, the Redis server stopped, then the interpreter's own teardown with torch, Ray's
core worker and gRPC loaded. A crash there shows as a negative return code (the signal) or 139.
Exit status 0 only when every run exited 0.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"


def run_once(out_dir: Path) -> tuple[int, float, str]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "polydistill", "run", str(TINY), "--output", str(out_dir), "--no-progress",
         "--set", "training.epochs=1"],
        capture_output=True, text=True, timeout=600,
    )
    return result.returncode, time.perf_counter() - started, result.stderr[-2000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="polydistill-teardown-") as folder:
        for index in range(args.runs):
            code, seconds, stderr = run_once(Path(folder) / f"run{index}")
            failures += code != 0
            print(f"run {index + 1}/{args.runs}: exit {code} in {seconds:.1f} s", flush=True)
            if code != 0:
                print(stderr, file=sys.stderr)
    print(f"{args.runs - failures} of {args.runs} runs exited 0")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
