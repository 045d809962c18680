"""Lightning loggers of a training run: into its MLflow record, and into a JSON-lines file a sweep
worker follows."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from mta_lab.infra.tracking import RunRecord


class _MetricsLogger(Logger):
    """A Lightning logger that takes metrics only: params are the flattened config, logged once by
    the run's owner."""

    def __init__(self, name: str, version: str):
        super().__init__()
        self._name, self._version = name, version

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return self._version

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class MlflowLogger(_MetricsLogger):
    """Lightning's view of a :class:`RunRecord`: metrics only; params, artifacts and the run's status
    belong to the code that owns the run."""

    def __init__(self, record: RunRecord):
        super().__init__("mlflow", record.run_id)
        self.record = record

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.record.log_metrics(metrics, step or 0)


class JsonlLogger(_MetricsLogger):
    """Metrics as JSON lines ``{"step": ..., "metrics": {...}}``, flushed at once: how a sweep worker
    follows the training process it started."""

    def __init__(self, path: Path):
        super().__init__("jsonl", path.name)
        self.path = path

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        with self.path.open("a") as stream:
            stream.write(json.dumps({"step": step or 0, "metrics": metrics}) + "\n")
