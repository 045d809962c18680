"""What every command shares: argument conventions, config loading, console output, input errors."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from mta_lab.config import RunConfig, load_config

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """Bad command-line input: reported as one line with exit code 2."""


def console() -> Console:
    """Rich output; when piped (logs, files) wide enough that tables do not wrap."""
    default = Console()
    return default if default.is_terminal else Console(width=140)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", metavar="NAME_OR_PATH", help="a preset name (see `mta-lab presets`) or a YAML file"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. model.mta.pre_qk_conv.key_kernel=9",
    )


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)",
    )
    parser.add_argument(
        "--runs-dir", type=Path, default=Path("runs"), help="checkpoints go here (default: runs)"
    )


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; use an integer >= 1")
    return value


def load(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)
