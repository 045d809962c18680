"""MLflow records of training runs.

One training run is one MLflow run: the flattened resolved config as params, metrics per step, the
resolved config YAML and a manifest (config hash, git commit and dirty flag, package versions,
device) as artifacts. The run's terminal status (FINISHED, FAILED, KILLED) is set by the code that
owns the run, in a ``finally``, so no run is left RUNNING by an error or an interruption.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import platform
import random
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from mta_lab.config import RunConfig, config_hash
from mta_lab.infra.signals import stop_after

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""An SQLite file in the working directory: what `mlflow ui` and `mta-lab ui` open by default."""
PACKAGES = ("mta-lab", "torch", "lightning", "mlflow", "optuna", "omegaconf", "polars", "numpy", "tokenizers")


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The store to use, with a relative SQLite path made absolute: a run resumed from another
    directory must find the store it started in."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def quiet_mlflow() -> None:
    """MLflow's store migrations and client notices are not the user's business; nor are its own
    tracebacks of database errors, which reach mta-lab as exceptions and are reported in one line."""
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


BUSY_STORE = ("database is locked", "database table is locked")
"""What SQLite says when another process holds the file longer than its busy timeout."""
BUSY_RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0)


def _patient(method):
    """Call ``method`` again, after a growing and jittered pause, while the store says it is busy.

    A refused SQLite transaction changed nothing (MLflow rolls it back), so calling again is safe,
    also for a write."""

    @functools.wraps(method)
    def call(*args, **kwargs):
        with stop_after():  # a call cut short by Ctrl-C or SIGTERM could leave the store locked
            return _retried(method, *args, **kwargs)

    return call


def _retried(method, *args, **kwargs):
    for delay in BUSY_RETRY_DELAYS_S:
        try:
            return method(*args, **kwargs)
        except MlflowException as error:
            if not any(message in str(error) for message in BUSY_STORE):
                raise
            time.sleep(delay * random.uniform(0.5, 1.5))
    return method(*args, **kwargs)


_HELD_STORE_LOCKS: set[str] = set()


@contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold ``<file>.lock`` beside an SQLite store, so that one process at a time creates or migrates it.

    MLflow creates and upgrades an SQLite store's schema when a client first opens it, with no lock of
    its own: three processes opening a new file together fail in most tries (alembic's "Online
    migration expected to match one row", "No such index"). A server or another database serialises
    this itself, so only ``sqlite:///`` stores are locked. Re-entrant within a process, where a
    launcher holds it around its whole set-up and opens clients inside."""
    path = tracking_uri.removeprefix("sqlite:///") if tracking_uri.startswith("sqlite:///") else ""
    key = str(Path(path + ".lock").resolve()) if path else ""
    if not key or key in _HELD_STORE_LOCKS:
        yield
        return
    Path(key).parent.mkdir(parents=True, exist_ok=True)
    with open(key, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, or its process dies
        _HELD_STORE_LOCKS.add(key)
        try:
            yield
        finally:
            _HELD_STORE_LOCKS.discard(key)


class TrackingClient(MlflowClient):
    """An MLflow client that opens its store under ``store_lock`` and waits out a busy store.

    The training processes, workers and launcher of a sweep on one machine all write one SQLite
    file; under load (a slow disk, many cells) one of them can wait past SQLite's busy timeout and be
    refused with "database is locked". That is a wait, not a failure: the calls mta-lab makes are
    repeated for about half a minute before the error is let through."""

    def __init__(self, tracking_uri: str):
        with store_lock(tracking_uri):
            super().__init__(tracking_uri)  # MLflow opens the store here: creates or migrates its schema


for _name in (
    "create_experiment", "get_experiment_by_name", "create_run", "update_run", "get_run", "search_runs",
    "get_metric_history", "log_batch", "set_tag", "delete_tag", "set_terminated", "log_text",
    "log_figure", "log_table", "log_artifact",
):  # fmt: skip
    setattr(TrackingClient, _name, _patient(getattr(MlflowClient, _name)))


# Characters MLflow refuses in a param name (it allows word characters, - . space : /).
NOT_IN_PARAM_NAMES = re.compile(r"[^\w\-. :/]")


def flat_params(config: object, prefix: str = "") -> dict[str, str]:
    """A config dataclass as dotted keys, e.g. ``model.mta.pre_qk_conv.key_kernel``: MLflow params.
    Keys that come from user-chosen names (a sweep's variants, e.g. ``pre c_h=1``) have the characters
    MLflow refuses replaced by ``_``."""
    flat: dict[str, str] = {}

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                key = NOT_IN_PARAM_NAMES.sub("_", str(key))
                walk(value, f"{path}.{key}" if path else key)
        else:
            flat[path] = json.dumps(node) if isinstance(node, list | dict) else str(node)

    walk(OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True), prefix)
    return flat


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout mta_lab runs from; (None, None) for an installed package."""
    source = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(
                ["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    return commit, bool(git("status", "--porcelain", "--untracked-files=no"))


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda {torch.version.cuda})"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def manifest(config: RunConfig, device: torch.device, source: str, execution: list[dict]) -> dict:
    """What identifies a run and where it ran; ``execution`` is how each layer computed there."""
    commit, dirty = git_state()
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "config_hash": config_hash(config),
        "config_source": source,
        "git_commit": commit,
        "git_dirty": dirty,
        "packages": versions,
        "python": sys.version.split()[0],
        "device": describe_device(device),
        "execution": execution,
        "hostname": socket.gethostname(),
        "command": sys.argv,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class RunRecord:
    """One MLflow run, created for a new training run or reopened to resume one."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def create(cls, tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> RunRecord:
        quiet_mlflow()
        client = TrackingClient(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        return cls(client, run.info.run_id)

    @classmethod
    def reopen(cls, tracking_uri: str, run_id: str) -> RunRecord:
        quiet_mlflow()
        client = TrackingClient(tracking_uri)
        client.update_run(run_id, status="RUNNING")
        return cls(client, run_id)

    def log_params(self, params: dict[str, str]) -> None:
        items = [Param(key, value[:6000]) for key, value in params.items()]
        for first in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[first : first + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def clear_tags(self, *keys: str) -> None:
        """Remove tags that no longer hold (an earlier attempt's error, once the run resumes)."""
        present = self.client.get_run(self.run_id).data.tags
        for key in keys:
            if key in present:
                self.client.delete_tag(self.run_id, key)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for first in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[first : first + 1000])

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


class SilentRecord(RunRecord):
    """A run record that records nothing: for data-parallel ranks other than 0."""

    def __init__(self, run_id: str):
        super().__init__(None, run_id)

    def log_params(self, params: dict[str, str]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def clear_tags(self, *keys: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def end(self, status: str) -> None: ...
