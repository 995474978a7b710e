"""``polydistill``: the command line.

    polydistill run CONFIG [--set dotted.key=value ...] [--output DIR]
    polydistill validate CONFIG [--set ...]
    polydistill finetune CONFIG [--set ...]       fine-tune the teacher only (cached by recipe)
    polydistill resume OUTPUT_DIR [--set ...]     continue a stopped or crashed run from its checkpoint
    polydistill tune CONFIG --space SPACE.yaml [--output DIR]   hyper-parameter search (Ray Tune)
    polydistill examples DIR                       write the bundled examples and Grafana dashboard
    polydistill --version

On a Ray cluster (cluster/jobs.py; --address: the dashboard, e.g. http://HEAD:8265):
    polydistill submit CONFIG [--set ...] [--output DIR] [--redis-url URL]   prints the job id
    polydistill status JOB | logs JOB [--follow] | stop JOB | scale JOB --teachers N | --auto

Exit status: 0 when the job completed with exact accounting, 2 for an invalid config or
input, a Redis that does not answer or refuses the job's credentials, or a job id that another
run holds (nothing was started), 1 when the job ran and failed, 3 when it was stopped from outside
(`polydistill stop`, SIGTERM with a configured Redis) before it completed, 4 when it completed
with dead letters (every sample distilled once or dead-lettered with its reason), 130 when Ctrl-C
stopped it. A stopped job
prints one line (samples distilled, where its checkpoint is) and `polydistill resume OUTPUT_DIR`
continues it. The first Ctrl-C lets the students save a checkpoint; a second one quits at once.
"""

from __future__ import annotations

import argparse
import logging
import sys

from polydistill.cluster.config import ConfigError, load_config
from polydistill.cluster.exit_codes import EXIT_BAD_INPUT, EXIT_DEAD_LETTERS, EXIT_FAILED, EXIT_INTERRUPTED
from polydistill.cluster.quiet import quiet_libraries


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polydistill", description="Distil multilingual teachers into small students.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"polydistill {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    examples = commands.add_parser("examples", help="write the bundled example configs, their data and the "
                                   "Grafana dashboard into a folder")
    examples.add_argument("folder", help="where to write them (created; existing files are kept)")

    run = commands.add_parser("run", help="run a distillation job on the local machine or the Ray cluster")
    _add_config_arguments(run)
    run.add_argument("--output", help="output directory (overrides output_dir)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    validate = commands.add_parser("validate", help="check a config and print it with every default filled in")
    _add_config_arguments(validate)

    finetune = commands.add_parser(
        "finetune", help="fine-tune the configured teacher on the job's labelled data (cached); print its path"
    )
    _add_config_arguments(finetune)
    finetune.add_argument("--output", help="output directory (overrides output_dir)")

    resume = commands.add_parser("resume", help="continue a stopped or crashed `run` from the student's checkpoint")
    resume.add_argument("output", help="the output directory of the run (holds job.yaml and checkpoints/)")
    resume.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a saved key, e.g. --set transport.redis_url=redis://HOST:6379/0 (the job "
                        "reads the Redis password again where it runs: transport.password_env, password_file or "
                        "$POLYDISTILL_REDIS_PASSWORD)")
    resume.add_argument("--no-progress", action="store_true", help="no progress bar")

    export = commands.add_parser("export", help="write a saved student as ONNX (float and int8) that onnxruntime "
                                 "runs without polydistill")
    export.add_argument("folder", help="the student's folder (e.g. OUTPUT/student)")
    export.add_argument("--format", choices=["onnx"], default="onnx", help="the format to write (onnx)")
    export.add_argument("--output", help="where to write it (default: FOLDER/onnx)")
    export.add_argument("--no-int8", action="store_true", help="the float graph only")

    push = commands.add_parser("push", help="upload a saved student and its model card to a model hub repository "
                               "(huggingface_hub; token from HF_TOKEN or a stored login)")
    push.add_argument("folder", help="the student's folder (e.g. OUTPUT/student)")
    push.add_argument("--repo-id", required=True, help="OWNER/NAME of the repository (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")

    submit = commands.add_parser("submit", help="submit a job to a Ray cluster (Ray Jobs API); prints its id")
    _add_config_arguments(submit)
    submit.add_argument("--output", help="output directory on the cluster (overrides output_dir)")
    _add_job_arguments(submit, job=False)
    status = commands.add_parser("status", help="a submitted job's state and progress")
    _add_job_arguments(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    logs = commands.add_parser("logs", help="a submitted job's driver output")
    _add_job_arguments(logs, redis=False)
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    stop = commands.add_parser("stop", help="stop a submitted job cleanly (students checkpoint, actors exit)")
    _add_job_arguments(stop)
    stop.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the job to end")
    scale = commands.add_parser("scale", help="set a running job's teacher pool size")
    _add_job_arguments(scale)
    size = scale.add_mutually_exclusive_group(required=True)
    size.add_argument("--teachers", type=int, help="run this many teacher replicas until told otherwise")
    size.add_argument("--auto", action="store_true", help="hand the pool back to its policy")
    from polydistill.cluster.tune import add_tune_command  # `polydistill tune JOB --space SPACE`: cluster/tune.py

    add_tune_command(commands)
    return parser


def _add_job_arguments(parser: argparse.ArgumentParser, job: bool = True, redis: bool = True) -> None:
    if job:
        parser.add_argument("job", help="the job id `polydistill submit` printed")
    parser.add_argument("--address", help="Ray dashboard address, e.g. http://HEAD:8265 "
                        "(default: $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS, else the local cluster)")
    if redis:
        parser.add_argument("--redis-url", help="the job's Redis (default: $POLYDISTILL_REDIS_URL, or what the "
                            "job stored at submission)")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="job YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.epochs=2 (YAML value)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:  # Ctrl-C outside a job (a job's own is `run_job`'s): nothing to keep
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(args: argparse.Namespace) -> int:
    quiet_libraries()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "examples":
        return _write_examples(args.folder)
    if args.command == "tune":
        from polydistill.cluster.tune import run_tune_command

        return run_tune_command(args)
    if args.command == "export":
        return _export(args)
    if args.command == "push":
        return _push(args)
    if args.command in _JOB_COMMANDS:
        return _job_command(args)
    try:
        if args.command == "resume":
            from polydistill.cluster.resume import load_job_config

            config = load_job_config(args.output, args.overrides)
        else:
            config = load_config(args.config, args.overrides, getattr(args, "output", None))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command == "validate":
        import yaml

        from polydistill.cluster.secrets import redacted

        print(yaml.safe_dump(redacted(config), sort_keys=False), end="")
        return 0
    if args.command == "finetune":
        return _finetune(config)
    return _run(config, show_progress=not args.no_progress, resume=args.command == "resume")


_JOB_COMMANDS = ("submit", "status", "logs", "stop", "scale")


def _export(args: argparse.Namespace) -> int:
    from polydistill.student.onnx_export import ExportError, export_classifier_onnx

    try:
        done = export_classifier_onnx(args.folder, args.output, int8=not args.no_int8)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{done.float_path} (largest logit difference from torch {done.float_max_abs_diff:.2e})")
    if done.int8_path is not None:
        print(f"{done.int8_path} (int8 weights; largest logit difference from torch {done.int8_max_abs_diff:.2e})")
    return 0


def _push(args: argparse.Namespace) -> int:
    from polydistill.cluster.push import PushError, push_student

    try:
        url = push_student(args.folder, args.repo_id, private=args.private)
    except PushError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # the hub unreachable, a token refused: one line, not a traceback
        print(f"error: pushing {args.folder} to {args.repo_id} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(url)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("polydistill")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _write_examples(folder: str) -> int:
    """Copies the examples installed with the package; they run from there as from the repository."""
    import shutil
    from importlib.util import find_spec
    from pathlib import Path

    spec = find_spec("polydistill.examples")
    if spec is None or not spec.submodule_search_locations:
        print("error: this installation carries no examples; reinstall polydistill from its wheel", file=sys.stderr)
        return EXIT_FAILED
    target = Path(folder)
    shutil.copytree(Path(list(spec.submodule_search_locations)[0]), target, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
    grafana = Path(__file__).resolve().parent / "grafana"
    shutil.copytree(grafana, target / "grafana", dirs_exist_ok=True)
    print(f"examples written to {target}: try `polydistill run {target / 'tiny.yaml'} --output out`")
    return 0


def _job_command(args: argparse.Namespace) -> int:
    import json
    import os

    from polydistill.cluster import jobs
    from polydistill.cluster.services import REDIS_URL_ENV

    redis_url = getattr(args, "redis_url", None) or os.environ.get(REDIS_URL_ENV) or None
    try:
        if args.command == "submit":
            print(jobs.submit(args.address, args.config, args.overrides, args.output, redis_url))
        elif args.command == "status":
            result = jobs.status(args.address, args.job, redis_url)
            print(json.dumps(result, indent=2) if args.json else jobs.format_status(result))
        elif args.command == "logs":
            jobs.logs(args.address, args.job, follow=args.follow, out=sys.stdout)
        elif args.command == "stop":
            final = jobs.stop(args.address, args.job, redis_url, wait_s=args.wait)
            print(f"job {args.job}: {final}")
            return 0 if final in jobs.TERMINAL else EXIT_FAILED
        elif args.command == "scale":
            jobs.scale(args.address, args.job, None if args.auto else args.teachers, redis_url)
    except (ConfigError, jobs.JobsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ConnectionError, RuntimeError) as exc:  # no cluster there, unknown job id, auth refused
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _finetune(config) -> int:
    from pathlib import Path

    from polydistill.cluster.prepare import prepare_teacher
    from polydistill.storage.datasets import DataSourceError
    from polydistill.storage.job_data import load_job_split
    from polydistill.student.architecture import ModelSetupError

    try:
        train = load_job_split(config.data, config.data.train_split)
        print(prepare_teacher(config, Path(config.output_dir).resolve(), train))
    except (ModelSetupError, DataSourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _summary_line(report: dict) -> str | None:
    """Retention and speed-up in one line, when the run evaluated its models."""
    overall, costs = report.get("overall"), report.get("efficiency") or {}
    if not overall or overall.get("retention") is None:
        return None
    parts = [f"retention {overall['retention']:.1%} overall"]
    if overall.get("retention_min_language") is not None:
        parts.append(f"{overall['retention_min_language']:.1%} in the weakest language")
    if costs.get("speedup_batch32"):
        parts.append(f"student {costs['speedup_batch32']:.2f}x faster at batch 32")
    if costs.get("param_ratio"):
        parts.append(f"{costs['param_ratio']:.1%} of the teacher's parameters")
    return "; ".join(parts)


def _run(config, show_progress: bool, resume: bool = False) -> int:
    from polydistill.cluster.failures import exit_status_of, failure_line
    from polydistill.cluster.services import job_redis

    try:
        # Before the job's heavy imports (seconds): a Redis that does not answer or refuses the job's
        # credentials, or a job id that another run holds, fails at once. A Redis lost mid-run is
        # reported outside the lease, so that ending it does not wait for that Redis once more.
        with job_redis(config) as redis_service:
            from polydistill.cluster.driver import run_job

            report = run_job(config, show_progress=show_progress, resume=resume, redis_service=redis_service)
    except Exception as exc:
        status = exit_status_of(exc)
        if status is None:
            raise
        print(failure_line(exc), file=sys.stderr)
        return status
    from polydistill.student.report import format_language_table

    print(format_language_table(report))
    summary = _summary_line(report)
    if summary:
        print(summary)
    print(
        f"distilled {report['samples_distilled']}/{report['samples_expected']} samples in "
        f"{report['wall_seconds']:.1f} s ({report['epochs']} epochs, {report['teacher_replicas']} teacher replicas, "
        f"{report['duplicates_dropped']} duplicates dropped); student: {report['student_path']}"
    )
    if report["status"] == "completed_with_dead_letters":
        print(f"completed with dead letters: {report.get('samples_dead_lettered')} samples by reason "
              "(see the job's dead-letter stream and report.json)", file=sys.stderr)
        return EXIT_DEAD_LETTERS
    return 0


if __name__ == "__main__":
    sys.exit(main())
