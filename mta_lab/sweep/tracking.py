"""A sweep in MLflow: an experiment per sweep, one parent run per sweep and profile (reused when the
sweep is run again), one child run per cell and seed (resumed, never duplicated)."""

from __future__ import annotations

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from mta_lab.infra.tracking import RunRecord, TrackingClient, quiet_mlflow
from mta_lab.sweep.spec import Cell, Sweep


def client_for(tracking_uri: str) -> MlflowClient:
    quiet_mlflow()
    return TrackingClient(tracking_uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def find_parent(client: MlflowClient, experiment: str, study: str) -> Run | None:
    runs = client.search_runs(
        [experiment],
        f"tags.`mta.role` = 'parent' AND tags.`mta.study` = '{study}'",
        order_by=["attributes.start_time ASC"],
    )
    return runs[0] if runs else None


def parent_run(client: MlflowClient, experiment: str, sweep: Sweep, params: dict[str, str]) -> str:
    """The sweep's parent run: created once, set RUNNING again when the sweep is run again."""
    found = find_parent(client, experiment, sweep.study_name)
    if found is not None:
        client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id
    tags = {
        "mta.role": "parent",
        "mta.sweep": sweep.spec.name,
        "mta.study": sweep.study_name,
        "mta.profile": sweep.profile.value,
        "mta.source": sweep.source,
        "mlflow.note.content": sweep.spec.description,
    }
    run = client.create_run(experiment, run_name=f"{sweep.spec.name} ({sweep.profile.value})", tags=tags)
    RunRecord(client, run.info.run_id).log_params(params)
    return run.info.run_id


def child_runs(client: MlflowClient, experiment: str, parent: str) -> list[Run]:
    return client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=50_000)


def find_child(client: MlflowClient, experiment: str, parent: str, cell_hash: str) -> Run | None:
    runs = client.search_runs(
        [experiment],
        f"tags.`mlflow.parentRunId` = '{parent}' AND tags.`mta.config_hash` = '{cell_hash}'",
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


def create_child(
    client: MlflowClient, experiment: str, parent: str, sweep: Sweep, cell: Cell, trial: int
) -> str:
    tags = {
        "mlflow.parentRunId": parent,
        "mta.sweep": sweep.spec.name,
        "mta.study": sweep.study_name,
        "mta.profile": sweep.profile.value,
        "mta.axis": cell.axis,
        "mta.variant": cell.label,
        "mta.role": cell.role,
        "mta.seed": str(cell.seed),
        "mta.config_hash": cell.config_hash,
        "mta.source": sweep.source,
        "optuna.study": sweep.study_name,
        "optuna.trial": str(trial),
    }
    return client.create_run(experiment, run_name=cell.run_name, tags=tags).info.run_id
