"""Sweep commands: ``sweep`` (plan, launch, resume), ``worker`` (join from any machine), ``status``,
``cancel`` (a sweep's Slurm jobs), ``ui`` (the MLflow UI on the default store)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from enum import Enum
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
    _add_slurm(sweep)
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
    worker.add_argument(
        "--devices",
        type=common.positive_int,
        default=1,
        help="processes (GPUs on CUDA) that train each cell together with DDP (default 1)",
    )
    _add_profile_and_stores(worker)
    worker.set_defaults(run=_worker)

    status = commands.add_parser(
        "status", help="cells done, running, failed and pending, and the best so far"
    )
    status.add_argument("sweep", metavar="NAME_OR_PATH", help="a sweep name or YAML file")
    _add_profile_and_stores(status)
    status.set_defaults(run=_status)

    cancel = commands.add_parser(
        "cancel",
        help="cancel a sweep's Slurm jobs (their cells stop, are queued again, and resume next launch)",
    )
    cancel.add_argument("sweep", metavar="NAME_OR_PATH", help="a sweep name or YAML file")
    _add_profile_and_stores(cancel)
    cancel.set_defaults(run=_cancel)

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
        "--gpus-per-trial",
        type=common.positive_int,
        help="GPUs per trial, trained together with DDP (default 1; with --launcher slurm: GPUs per job, "
        "default none)",
    )
    parser.add_argument(
        "--processes-per-trial",
        type=common.positive_int,
        default=1,
        help="on CPU: processes per trial, trained together with DDP over gloo (default 1)",
    )


class Launcher(str, Enum):
    """Where a sweep's workers run."""

    local = "local"
    """Processes on this machine, one per GPU slot (or CPU worker)."""
    slurm = "slurm"
    """Jobs of a Slurm job array, one worker each (submitted with submitit)."""


def _add_slurm(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--launcher",
        type=Launcher,
        choices=list(Launcher),
        default=Launcher.local,
        help="local (default): workers on this machine; slurm: workers as Slurm jobs",
    )
    group = parser.add_argument_group(
        "Slurm (with --launcher slurm; --workers is the number of jobs, --gpus-per-trial the GPUs of each)"
    )
    group.add_argument("--partition", help="sbatch --partition")
    group.add_argument("--account", help="sbatch --account")
    group.add_argument("--qos", help="sbatch --qos")
    group.add_argument(
        "--time",
        default="4:00:00",
        help="each job's time limit, as sbatch takes it (MM, HH:MM:SS, D-HH:MM; default 4:00:00); a cell "
        "longer than it resumes in the requeued job",
    )
    group.add_argument("--max-running", type=common.positive_int, help="at most this many jobs at once")
    group.add_argument("--cpus-per-gpu", type=common.positive_int, help="sbatch --cpus-per-gpu")
    group.add_argument("--mem-per-gpu", help="sbatch --mem-per-gpu, e.g. 64G")
    group.add_argument(
        "--cpus-per-worker", type=common.positive_int, help="CPU jobs: cores each (default: one per process)"
    )
    group.add_argument("--mem", help="sbatch --mem (memory per job), e.g. 16G")
    group.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="a further #SBATCH option, e.g. --sbatch=--constraint=a100 (repeatable)",
    )
    group.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="a shell line each job runs first, e.g. --setup 'module load cuda' (repeatable)",
    )


def _slurm_options(args: argparse.Namespace):
    """The Slurm options given, or None for a local sweep (where Slurm options are refused)."""
    from mta_lab.sweep.slurm import SlurmOptions, parse_time, sbatch_options

    given = [
        name
        for name in (
            "partition",
            "account",
            "qos",
            "max_running",
            "cpus_per_gpu",
            "mem_per_gpu",
            "cpus_per_worker",
            "mem",
        )
        if getattr(args, name) is not None
    ] + [name for name in ("sbatch", "setup") if getattr(args, name)]
    if args.launcher == Launcher.local:
        if given:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
            raise common.UsageError(f"{flags}: Slurm options; add --launcher slurm")
        return None
    if args.gpus is not None:
        raise common.UsageError("--gpus: Slurm chooses the GPUs of each job (use --gpus-per-trial)")
    try:
        minutes = parse_time(args.time)
    except ValueError as error:
        raise common.UsageError(f"--time {error}") from None
    sbatch_options(tuple(args.sbatch))  # one line naming a malformed option, before anything starts
    return SlurmOptions(
        workers=args.workers,
        max_running=args.max_running,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        time_min=minutes,
        gpus_per_trial=args.gpus_per_trial or 0,
        processes_per_trial=args.processes_per_trial,
        cpus_per_gpu=args.cpus_per_gpu,
        mem_per_gpu=args.mem_per_gpu,
        cpus_per_worker=args.cpus_per_worker,
        mem=args.mem,
        sbatch=tuple(args.sbatch),
        setup=tuple(args.setup),
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
        gpus_per_trial=args.gpus_per_trial or 1,
        processes_per_trial=args.processes_per_trial,
        slurm=_slurm_options(args),
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
    from mta_lab.sweep.storage import default_storage
    from mta_lab.sweep.worker import join

    study_name, sweep_dir = _study_name_and_dir(args)
    storage = _storage(args) or default_storage(sweep_dir)
    join(study_name, storage, args.tracking_uri, sweep_dir, args.index, args.devices)
    return 0


def _status(args: argparse.Namespace) -> int:
    from mta_lab.sweep.slurm import job_states
    from mta_lab.sweep.spec import expand, load_sweep
    from mta_lab.sweep.status import status_table
    from mta_lab.sweep.storage import default_storage, open_study

    sweep = load_sweep(args.sweep, args.profile)
    sweep_dir = (args.runs_dir / "sweeps" / sweep.study_name).resolve()
    study = open_study(sweep, _storage(args) or default_storage(sweep_dir))
    cells = expand(sweep) if sweep.spec.search is None else None
    console = common.console()
    console.print(status_table(study, sweep, cells))
    jobs = job_states(sweep_dir / "slurm")
    if jobs:
        console.print(
            "Slurm jobs: " + ", ".join(f"{job} {state.lower()}" for job, state in jobs), highlight=False
        )
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from mta_lab.infra import slurm
    from mta_lab.sweep.slurm import live_jobs

    _, sweep_dir = _study_name_and_dir(args)
    jobs = live_jobs(sweep_dir / "slurm")
    if not jobs:
        common.console().print(f"{args.sweep}: no Slurm job of this sweep is queued or running")
        return 0
    slurm.cancel(jobs)
    common.console().print(
        f"cancelled Slurm jobs {', '.join(jobs)}: their cells stop (marked KILLED) and go back to the queue; "
        f"`mta-lab sweep {args.sweep} --launcher slurm` resumes them",
        highlight=False,
    )
    return 0


def _ui(args: argparse.Namespace) -> int:
    from mta_lab.infra.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    print(f"MLflow UI for {mask(uri)} at http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    command = [mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)]
    return subprocess.call(command)
