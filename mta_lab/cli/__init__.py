"""The ``mta-lab`` command line.

Every command loads configs the same way: a preset name or YAML path, then ``key=value`` overrides.
A bad input (config, argument, data) is one line on stderr and exit code 2; nothing is left half-done.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from mta_lab.cli import analysis, checkpoints, common, models, runs, sweeps
from mta_lab.config import ConfigError, preset_names
from mta_lab.data.errors import DataError
from mta_lab.secrets import mask


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after options (`check tiny --steps 5 model.dim=32`); argparse
    # stops collecting positionals at the first option, so the rest arrive as extras.
    args, extras = parser.parse_known_args(argv)
    unknown = [item for item in extras if "=" not in item or item.startswith("-")]
    if unknown or (extras and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extras)}")
    if extras:
        args.overrides = [*args.overrides, *extras]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.run(args)
    except (ConfigError, common.UsageError, DataError) as error:
        print(f"mta-lab: error: {mask(str(error))}", file=sys.stderr)
        return common.EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("mta-lab: interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug or a broken store: the traceback, with any password in it masked
        print(mask(traceback.format_exc()), file=sys.stderr, end="")
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mta-lab",
        description="Ablations of Multi-Token Attention (arXiv 2504.00927).",
        epilog=f"presets: {', '.join(preset_names())}",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each layer runs")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    sweeps.register(commands)
    analysis.register(commands)
    runs.register(commands)
    models.register(commands)
    checkpoints.register(commands)
    return parser
