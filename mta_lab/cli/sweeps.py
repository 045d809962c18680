"""Sweep commands: ``sweep`` (plan, launch, resume), ``worker`` (join from any machine), ``status``,
``ui`` (the MLflow UI on the default store)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from mta_lab.cli import common
from mta_lab.config import ConfigError
from mta_lab.secrets import STORAGE_ENV, mask
from mta_lab.sweep.spec import Profile, sweep_names


def register(commands) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="run an ablation or search: one trial per GPU, resumable, tracked in MLflow",
        description="Run a sweep file (sweeps/NAME.yaml or a path). Every cell's config is validated first. "
        "Cells run in worker processes (one per GPU slot, or --workers on a CPU), each training in a child "
        "process, all recorded under one MLflow parent run. Running the command again resumes.",
        epilog=f"sweeps: {', '.join(sweep_names())}",
    )
    sweep.add_argument("sweep", metavar="NAME_OR_PATH", help="a sweep name or YAML file")
    sweep.add_argument(
        "--dry-run", action="store_true", help="print the cells, MLflow names and budget; run nothing"
    )
    _add_placement(sweep)
    _add_profile_and_stores(sweep)
    sweep.set_defaults(run=_sweep)

    worker = commands.add_parser(
        "worker",
        help="join a running sweep (e.g. from another machine)",
        description="Take cells of a sweep's Optuna study and train them until none is left. On another "
        "machine give the shared --storage (postgresql://...) and --tracking-uri (http://...).",
    )
    worker.add_argument("sweep", metavar="NAME", help="the sweep's name (or a sweep file)")
    worker.add_argument(
        "--index",
        type=common.nonnegative_int,
        default=0,
        help="this worker's number k: a search's sampler uses seed + k, so give each worker of a sweep "
        "its own (the launcher numbers its own 0, 1, ...; default 0)",
    )
    _add_profile_and_stores(worker)
    worker.set_defaults(run=_worker)

    status = commands.add_parser(
        "status", help="cells done, running, failed and pending, and the best so far"
    )
    status.add_argument("sweep", metavar="NAME_OR_PATH", help="a sweep name or YAML file")
    _add_profile_and_stores(status)
    status.set_defaults(run=_status)

    ui = commands.add_parser("ui", help="open the MLflow UI on the runs' store (127.0.0.1)")
    ui.add_argument("--tracking-uri", metavar="URI", help="the store (default: as for train and sweep)")
    ui.add_argument("--port", type=common.positive_int, default=5000, help="default 5000")
    ui.set_defaults(run=_ui)


def _add_placement(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=common.positive_int,
        help="worker processes (default: one per GPU slot; on CPU one per core, up to 4)",
    )
    parser.add_argument("--gpus", type=_gpu_list, help="GPUs to use, e.g. 0,1,2,3 (default: all)")
    parser.add_argument(
        "--gpus-per-trial", type=common.positive_int, default=1, help="GPUs per trial (default 1)"
    )


def _add_profile_and_stores(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        type=Profile,
        choices=list(Profile),
        default=Profile.auto,
        help="full: the file's budget; cpu: its cpu block; auto (default): cpu without a GPU",
    )
    parser.add_argument(
        "--storage",
        metavar="URL",
        help=f"Optuna storage (default: ${STORAGE_ENV}, else a journal file under --runs-dir; postgresql://... "
        "for many machines; a password is safer in the variable, or in ~/.pgpass, than on a command line)",
    )
    common.add_tracking_arguments(parser)


def _storage(args: argparse.Namespace) -> str | None:
    return args.storage or os.environ.get(STORAGE_ENV) or None


def _gpu_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a comma-separated list of GPU indices, e.g. 0,1,2"
        ) from None


def _sweep(args: argparse.Namespace) -> int:
    from mta_lab.config.sweep import Design
    from mta_lab.sweep.launcher import launch
    from mta_lab.sweep.spec import load_sweep

    code = launch(
        args.sweep,
        profile=args.profile,
        workers=args.workers,
        gpus=args.gpus,
        gpus_per_trial=args.gpus_per_trial,
        storage=_storage(args),
        tracking_uri=args.tracking_uri,
        runs_dir=args.runs_dir,
        dry_run=args.dry_run,
        console=common.console(),
    )
    if code == 0 and not args.dry_run and load_sweep(args.sweep, args.profile).spec.design == Design.scaling:
        _say_multipliers(args)
    return code


def _say_multipliers(args: argparse.Namespace) -> None:
    """A scaling sweep ends with its answer: each variant's compute multiplier (the report adds the
    curves)."""
    import polars as pl

    from mta_lab.analysis import results_frame, sweep_runs
    from mta_lab.analysis.scaling import by_rung, ladder_multipliers
    from mta_lab.cli.analysis import print_multipliers

    data = sweep_runs(args.sweep, args.profile, args.tracking_uri)
    runs, _ = by_rung(results_frame(data))
    rows, _ = ladder_multipliers(runs.filter(pl.col("status") == "FINISHED"), data.sweep.spec.metric.name)
    print_multipliers(rows)
    console = common.console()
    console.print(f"curves and the comparison at the top rung: mta-lab report {args.sweep}", highlight=False)


def _study_name_and_dir(args: argparse.Namespace) -> tuple[str, Path]:
    from mta_lab.sweep.spec import load_sweep, resolve_profile

    try:
        study_name = load_sweep(args.sweep, args.profile).study_name
    except ConfigError:
        if "/" in args.sweep or args.sweep.endswith((".yaml", ".yml")):
            raise
        # A worker elsewhere may lack the sweep file: the name then is the study's.
        cpu = resolve_profile(args.profile) == Profile.cpu and not args.sweep.endswith("-cpu")
        study_name = f"{args.sweep}-cpu" if cpu else args.sweep
    return study_name, (args.runs_dir / "sweeps" / study_name).resolve()


def _worker(args: argparse.Namespace) -> int:
    import optuna

    from mta_lab.sweep.storage import default_storage, make_pruner, open_storage
    from mta_lab.sweep.worker import Context, run_worker

    study_name, sweep_dir = _study_name_and_dir(args)
    storage = _storage(args) or default_storage(sweep_dir)
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:
        raise ConfigError(
            f"no study '{study_name}' at {mask(storage)}: start it with `mta-lab sweep`"
        ) from None
    context = Context.load(study, args.tracking_uri, sweep_dir)
    study.pruner = make_pruner(context.sweep.spec)  # Optuna keeps no pruner with the study
    search = context.sweep.spec.search
    if search is not None:  # worker k uses seed + k: different points per worker, the same on a rerun
        study.sampler = optuna.samplers.TPESampler(seed=search.seed + args.index)
    run_worker(study, context)
    return 0


def _status(args: argparse.Namespace) -> int:
    from mta_lab.sweep.spec import expand, load_sweep
    from mta_lab.sweep.status import status_table
    from mta_lab.sweep.storage import default_storage, open_study

    sweep = load_sweep(args.sweep, args.profile)
    sweep_dir = (args.runs_dir / "sweeps" / sweep.study_name).resolve()
    study = open_study(sweep, _storage(args) or default_storage(sweep_dir))
    cells = expand(sweep) if sweep.spec.search is None else None
    common.console().print(status_table(study, sweep, cells))
    return 0


def _ui(args: argparse.Namespace) -> int:
    from mta_lab.infra.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    print(f"MLflow UI for {mask(uri)} at http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    command = [mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)]
    return subprocess.call(command)
