"""Lightning loggers of a training run: into its MLflow record, and into a JSON-lines file a sweep
worker follows."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from mta_lab.infra.tracking import RunRecord


class MlflowLogger(Logger):
    """Lightning's view of a :class:`RunRecord`: metrics only; params, artifacts and the run's status
    belong to the code that owns the run."""

    def __init__(self, record: RunRecord):
        super().__init__()
        self.record = record

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self.record.run_id

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.record.log_metrics(metrics, step or 0)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """Params are the flattened config, logged once by the run's owner."""


class JsonlLogger(Logger):
    """Metrics as JSON lines ``{"step": ..., "metrics": {...}}``, flushed at once: how a sweep worker
    follows the training process it started."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return self.path.name

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        with self.path.open("a") as stream:
            stream.write(json.dumps({"step": step or 0, "metrics": metrics}) + "\n")

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """Not needed by the reader."""
