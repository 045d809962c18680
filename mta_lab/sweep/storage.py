"""Where a sweep's Optuna study lives, and opening it.

- one machine, default: a journal file (``journal:PATH``), safe for many processes;
- ``sqlite:///PATH``: fine for one or two workers;
- ``postgresql://`` or ``mysql://``: many machines. These get heartbeats, so the trials of a worker
  that died are failed after a grace period and their cells enqueued again (up to 3 times).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState

from mta_lab.config import ConfigError
from mta_lab.config.sweep import Goal, PrunerKind, SweepSpec
from mta_lab.secrets import mask
from mta_lab.sweep.spec import Sweep

logger = logging.getLogger(__name__)

HEARTBEAT_S = int(os.environ.get("MTA_LAB_HEARTBEAT_S", "30"))
"""Seconds between a worker's heartbeats on a database storage ($MTA_LAB_HEARTBEAT_S)."""
GRACE_S = 4 * HEARTBEAT_S  # > 3 heartbeats: a long evaluation must not get a live trial failed
RETRIES = 3


def open_study(sweep: Sweep, storage: str, create: bool = False) -> optuna.Study:
    """The sweep's study at ``storage``; created with ``create``, else it must exist (one clear line)."""
    direction = "minimize" if sweep.spec.metric.goal == Goal.minimize else "maximize"
    sampler = optuna.samplers.TPESampler(seed=sweep.spec.search.seed) if sweep.spec.search else None
    backend = open_storage(storage)
    if create:
        return optuna.create_study(
            study_name=sweep.study_name,
            storage=backend,
            direction=direction,
            sampler=sampler,
            load_if_exists=True,
        )
    try:
        return optuna.load_study(study_name=sweep.study_name, storage=backend, sampler=sampler)
    except KeyError:
        raise ConfigError(
            f"no study '{sweep.study_name}' at {mask(storage)}: run `mta-lab sweep {sweep.spec.name}` first"
        ) from None


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Fail a RUNNING trial that another process owned, with ``reason`` as its ``error`` attribute.
    False if it had already ended (another worker or launcher got there first).

    Optuna's public API ends another process's trial (``tell`` by number) but cannot set its attributes;
    this is the one place mta-lab reaches into Optuna's storage, pinned by ``tests/test_sweep_queue.py``."""
    try:
        study._storage.set_trial_user_attr(trial._trial_id, "error", reason)
        study.tell(trial.number, state=TrialState.FAIL)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
        return False
    return True


def default_storage(sweep_dir: Path) -> str:
    return f"journal:{(sweep_dir / 'optuna.journal').resolve()}"


def open_storage(url: str) -> BaseStorage:
    """An Optuna storage for a URL (see the module docstring)."""
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_journal(path)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    if url.startswith(("postgresql", "mysql")):
        given = url
        if url.startswith("postgresql://"):  # psycopg 3 is the driver mta-lab installs
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5, and what we need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url,
                    engine_kwargs={"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
                    if url.startswith("postgresql")
                    else {"pool_pre_ping": True},
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=RETRIES),
                )
        except Exception as error:  # SQLAlchemy's and the driver's errors: one line, not 30
            raise ConfigError(f"--storage {mask(given)}: {_connection_problem(given, error)}") from None
    raise ConfigError(
        f"--storage {url}: unsupported (allowed: journal:PATH, sqlite:///PATH, postgresql://..., mysql://...)"
    )


def repair_journal(path: Path) -> str | None:
    """Set aside what a full disk or a kill mid-write left in a journal: a last record cut short
    (the next append would run into it) and records that do not parse. The cells those records were
    about run again. Returns what was done, also logged; None for a sound journal."""
    if not path.is_file():
        return None
    with _journal_lock(path):
        data = path.read_bytes()
        lines = data.split(b"\n")
        torn = lines.pop() if lines else b""  # after the last newline: empty when the file is whole
        kept, damaged = [], []
        for line in lines:
            try:
                json.loads(line)
                kept.append(line)
            except ValueError:
                damaged.append(line)
        if torn:
            damaged.append(torn)
        if not damaged:
            return None
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        aside.write_bytes(data)
        path.write_bytes(b"".join(line + b"\n" for line in kept))
    note = (
        f"{path}: {len(damaged)} damaged record(s) (a full disk or a kill while writing) set aside; the whole "
        f"file as it was is in {aside.name}; the cells they were about run again"
    )
    logger.warning("%s", note)
    return note


@contextmanager
def _journal_lock(path: Path) -> Iterator[None]:
    """The lock Optuna's journal takes for every append, so that no worker writes during a repair."""
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _connection_problem(url: str, error: Exception) -> str:
    """Where the database is and what went wrong, from the driver's own first line."""
    parts = urlsplit(url)
    port = parts.port or (5432 if url.startswith("postgresql") else 3306)
    where = f"{parts.hostname or 'localhost'}:{port}/{parts.path.lstrip('/')}"
    cause = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    detail = next((line for line in lines if "FATAL" in line or "refused" in line or "timeout" in line), None)
    return (
        f"cannot open the database {where}: {mask(detail or (lines[0] if lines else type(cause).__name__))}"
    )


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """The sweep's pruner. Every process must pass it: Optuna stores no pruner with a study and
    defaults to the median pruner, which would cut ablation runs short."""
    settings = spec.search.pruner if spec.search is not None else None
    if settings is None or settings.kind == PrunerKind.none:
        return optuna.pruners.NopPruner()
    if settings.kind == PrunerKind.median:
        return optuna.pruners.MedianPruner(
            n_startup_trials=settings.startup_trials, n_warmup_steps=settings.warmup_steps
        )
    if settings.kind == PrunerKind.percentile:
        return optuna.pruners.PercentilePruner(
            settings.percentile,
            n_startup_trials=settings.startup_trials,
            n_warmup_steps=settings.warmup_steps,
        )
    return optuna.pruners.HyperbandPruner()
