"""``polydistill``: the command line.

    polydistill run CONFIG [--set dotted.key=value ...] [--output DIR]
    polydistill validate CONFIG [--set ...]

Exit status: 0 when the job completed with exact accounting, 2 for an invalid config or
input (nothing was started), 1 when the job ran and failed.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cluster.config import ConfigError, load_config
from cluster.quiet import quiet_libraries

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polydistill", description="Distil multilingual teachers into small students.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a distillation job on the local machine or the Ray cluster")
    _add_config_arguments(run)
    run.add_argument("--output", help="output directory (overrides output_dir)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    validate = commands.add_parser("validate", help="check a config and print it with every default filled in")
    _add_config_arguments(validate)
    return parser


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="job YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.epochs=2 (YAML value)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_libraries()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides, getattr(args, "output", None))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command == "validate":
        import yaml

        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    return _run(config, show_progress=not args.no_progress)


def _run(config, show_progress: bool) -> int:
    from cluster.driver import JobFailed, run_job
    from student.build import ModelSetupError
    from storage.datasets import DataSourceError

    try:
        report = run_job(config, show_progress=show_progress)
    except (ModelSetupError, DataSourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except JobFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    from student.report import format_language_table

    print(format_language_table(report))
    print(
        f"distilled {report['samples_distilled']}/{report['samples_expected']} samples in "
        f"{report['wall_seconds']:.1f} s ({report['epochs']} epochs, {report['teacher_replicas']} teacher replicas, "
        f"{report['duplicates_dropped']} duplicates dropped); student: {report['student_path']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
