"""One training run, end to end: data, MLflow run, Lightning fit, checkpoints, resume, status.

Order matters for bad input: the config is validated when loaded and the data here, before an
MLflow run exists; once it exists, every way out of :func:`train` sets a terminal status.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader
from tqdm import tqdm

from mta_lab.assembly.mixture import TrainStream, collate
from mta_lab.assembly.run_data import RunData, load_run_data
from mta_lab.config import ConfigError, RunConfig, load_config, resolved_yaml
from mta_lab.config.train import Precision
from mta_lab.data.errors import DataError
from mta_lab.hf.convert import check_init_from
from mta_lab.infra.signals import stop_once
from mta_lab.infra.tracking import (
    RunRecord,
    SilentRecord,
    config_hash,
    flat_params,
    manifest,
    resolve_tracking_uri,
)
from mta_lab.model.execution import plan_execution, unmet_requirement
from mta_lab.secrets import TRACKING_ENV, is_masked, mask
from mta_lab.train import ddp
from mta_lab.train.budget import Budget, resolve_budget
from mta_lab.train.device import training_device
from mta_lab.train.evaluate import Evaluator
from mta_lab.train.loggers import MlflowLogger
from mta_lab.train.module import LanguageModel

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    tracking_uri: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)


class MixtureData(L.LightningDataModule):
    """The training stream, restarted at the row the restored optimizer step has reached. With several
    ranks, each reads every world-th row of each global batch (``train.batch_size`` rows): together, the
    rows one process would have read."""

    def __init__(self, run_data: RunData):
        super().__init__()
        self.run_data = run_data

    def train_dataloader(self) -> DataLoader:
        train = self.run_data.config.train
        world = self.trainer.world_size
        start_row = self.trainer.global_step * train.grad_accum * train.batch_size  # after any restore
        stream = TrainStream(self.run_data.mixture(), start_row, self.trainer.global_rank, world)
        # A DataLoader iterator draws a seed from torch's global generator unless it has its own; that
        # draw would shift the dropout masks of a resumed run relative to an uninterrupted one.
        return DataLoader(
            stream,
            batch_size=train.batch_size // world,  # RunConfig checks that it divides
            collate_fn=collate,
            num_workers=0,
            generator=torch.Generator(),
        )


class PauseClock(Callback):
    """First of the callbacks: a step's end stops the training clock, so that checkpoints and the
    module's evaluation after it are not training time (the module starts the clock again)."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        module.clock.pause()


class StepProgress(Callback):
    """A progress bar over optimizer steps (over seconds of training for a time budget), with loss."""

    def __init__(self, budget: Budget, enabled: bool):
        self.budget, self.enabled, self.bar = budget, enabled, None

    def on_train_start(self, trainer, module) -> None:
        timed = self.budget.steps is None
        self.bar = tqdm(
            total=self.budget.seconds if timed else self.budget.steps,
            initial=round(module.clock.now()) if timed else trainer.global_step,
            desc="train",
            unit="s" if timed else "step",
            disable=not self.enabled,
            # Into a log file or a pipe, a line every half minute rather than a redraw every 0.1 s.
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        done = round(module.clock.now(), 1) if self.budget.steps is None else trainer.global_step
        if self.bar is not None and done > self.bar.n:
            self.bar.update(done - self.bar.n)
            loss = float(trainer.callback_metrics.get("loss", float("nan")))
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)  # drawn with the next update

    def on_train_end(self, trainer, module) -> None:
        if self.bar is not None:
            self.bar.close()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole or not at all: to a temporary file, then renamed over the last one,
    which is kept as ``<name>.previous.ckpt`` until the next save. A kill or a full disk mid-write
    leaves the last complete checkpoint in place."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        if path.is_file():
            os.replace(path, previous_checkpoint(path))
        os.replace(partial, path)


def previous_checkpoint(path: Path) -> Path:
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def readable_checkpoint(last: Path, record: RunRecord) -> Path | None:
    """The newest checkpoint of a run that loads (``last``, else the one before it); a damaged one
    is set aside, and the run is told what it resumes from."""
    problems = []
    for candidate in (last, previous_checkpoint(last)):
        if not candidate.is_file():
            continue
        try:
            torch.load(candidate, map_location="cpu", weights_only=False)
        except Exception as error:  # a torn or overwritten file: pickle, zip and EOF errors alike
            problems.append(
                f"{candidate.name} could not be read ({type(error).__name__}: {str(error)[:200]})"
            )
            candidate.rename(candidate.with_name(candidate.name + ".damaged"))
            continue
        if problems:
            note = f"resumed from {candidate.name}: {'; '.join(problems)}"
            logger.warning("%s", note)
            record.set_tags({"mta.resumed_from": note})
        return candidate
    if problems:
        note = f"started again from step 0: {'; '.join(problems)}"
        logger.warning("%s", note)
        record.set_tags({"mta.resumed_from": note})
    return None


def lightning_precision(precision: Precision, device: torch.device) -> str:
    if precision == Precision.fp32 or (precision == Precision.auto and device.type != "cuda"):
        return "32-true"
    return "bf16-mixed"


RUN_NAME_CHARS = 80


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; it is marked KILLED and resumes from its last checkpoint."""

    def __init__(self, run_id: str, run_dir: Path):
        super().__init__(f"run {run_id} stopped")
        self.run_id, self.run_dir = run_id, run_dir


def default_run_name(source: str, overrides: list[str]) -> str:
    """The preset or file, then each override by the last part of its key
    (``model.mta.pre_qk_conv.key_kernel=9`` -> ``key_kernel=9``), within 80 characters; the run's
    ``mta.overrides`` tag keeps them whole."""
    name = Path(source).stem if source.endswith((".yaml", ".yml")) else source
    for index, item in enumerate(overrides):
        key, _, value = item.partition("=")
        part = f"{key.rsplit('.', 1)[-1]}={value}"
        rest = f" (+{len(overrides) - index} more)"
        if len(name) + 1 + len(part) > RUN_NAME_CHARS - (len(rest) if index < len(overrides) - 1 else 0):
            return name + rest
        name += " " + part
    return name


def train(
    config: RunConfig,
    source: str,
    *,
    tracking_uri: str | None = None,
    runs_dir: Path = Path("runs"),
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    progress: bool = True,
) -> RunResult:
    """Train ``config`` as a new run; ``source`` is the preset or file it came from (for the record)."""
    _check_runnable(config)
    run_data = load_run_data(config)  # raises DataError before anything is recorded
    uri = resolve_tracking_uri(tracking_uri)
    record_tags = {
        "mta.source": source,
        "mta.config_hash": config_hash(config),
        **(tags or {}),
    }
    name = run_name or config.tracking.run_name or source
    record = RunRecord.create(uri, config.tracking.experiment, name, record_tags)
    run_dir = runs_dir / record.run_id
    return fit_run(config, run_data, record, run_dir, uri, source, resume=False, progress=progress)


def _check_runnable(config: RunConfig) -> None:
    """Kernels this machine cannot run, or weights that do not fit, stop the run before anything is
    recorded."""
    unmet = unmet_requirement(config.model, config.runtime, training_device())
    if unmet:
        raise ConfigError(unmet)
    _check_devices(config, training_device())
    check_init_from(config)  # the weights a run starts from must fit its model


def _check_devices(config: RunConfig, device: torch.device) -> None:
    """On CUDA, one GPU per process: those this process sees (a sweep slot's, CUDA_VISIBLE_DEVICES)."""
    devices = config.runtime.devices
    if device.type == "cuda" and devices > torch.cuda.device_count():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise ConfigError(
            f"runtime.devices: {devices} processes need {devices} GPUs, but this process sees "
            f"{torch.cuda.device_count()}{shown}"
        )


def resume(run_dir: Path, *, tracking_uri: str | None = None, progress: bool = True) -> RunResult:
    """Continue a run from its last checkpoint, in the same MLflow run."""
    info_path = run_dir / RUN_FILE
    if not info_path.is_file():
        raise DataError(f"{run_dir}: not a run directory (no {RUN_FILE})")
    info = json.loads(info_path.read_text())
    config = load_config(str(run_dir / CONFIG_FILE))
    _check_runnable(config)
    run_data = load_run_data(config)
    uri = (
        resolve_tracking_uri(tracking_uri)
        if tracking_uri or os.environ.get(TRACKING_ENV)
        else info["tracking_uri"]
    )
    if is_masked(uri):
        raise DataError(
            f"{run_dir}: its MLflow store is {uri} (the password is not kept): give --tracking-uri or {TRACKING_ENV}"
        )
    record = RunRecord.reopen(uri, info["run_id"])
    return fit_run(config, run_data, record, run_dir, uri, info["source"], resume=True, progress=progress)


def fit_run(
    config: RunConfig,
    run_data: RunData,
    record: RunRecord,
    run_dir: Path,
    uri: str,
    source: str,
    *,
    resume: bool,
    progress: bool,
    loggers: Sequence[Logger] = (),
    rank_of: ddp.SharedRun | None = None,
) -> RunResult:
    """Train in an MLflow run that exists (``record``), checkpointing to ``run_dir``. With ``resume``
    the run was started before: continue from its last checkpoint, if it has one. ``loggers`` get
    the same metrics as MLflow. Every way out sets the run's terminal status.

    With ``runtime.devices`` > 1 this process is rank 0 and starts the others (:mod:`mta_lab.train.ddp`);
    each of them comes back here with ``rank_of``, the run rank 0 shared: it records nothing, and
    leaves stopping to rank 0."""
    device = training_device()
    status, module = "FAILED", None
    # A second Ctrl-C or SIGTERM must not cut the status update short; a rank > 0 has none to make.
    with stop_once() if rank_of is None else nullcontext():
        try:
            _check_devices(config, device)
            last = run_dir / "checkpoints" / "last.ckpt"
            if rank_of is not None:
                checkpoint = None if rank_of.checkpoint is None else Path(rank_of.checkpoint)
            else:
                if not resume:
                    _record_start(config, record, run_dir, uri, device, source)
                else:  # what an earlier attempt left no longer describes the run
                    record.clear_tags("mta.error", "mta.stopped", "mta.resumed_from")
                # A run killed before its first checkpoint starts over, in the same MLflow run.
                checkpoint = readable_checkpoint(last, record) if resume else None

            budget = resolve_budget(config)
            eval_batch = config.eval.batch_size or config.train.batch_size
            evaluator = Evaluator(run_data, config.eval.batches, eval_batch)
            module = LanguageModel(config, budget, evaluator, device)
            if not resume:  # the cost side of a comparison
                record.log_metrics(
                    {"model/parameters": sum(p.numel() for p in module.model.parameters())}, step=0
                )
            with warnings.catch_warnings():
                _quiet_lightning()
                trainer = _trainer(
                    config,
                    budget,
                    [MlflowLogger(record), *loggers],
                    run_dir,
                    device,
                    progress and rank_of is None,
                )
                shared = ddp.SharedRun(
                    record.run_id,
                    str(run_dir.resolve()),
                    None if checkpoint is None else str(checkpoint.resolve()),
                    os.getpid(),
                )
                with ddp.ranks_of(trainer, shared):
                    trainer.fit(module, datamodule=MixtureData(run_data), ckpt_path=checkpoint)
                    trainer.save_checkpoint(last)  # every rank takes part; rank 0 writes it
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit, SIGTERMException) as error:
            # Ctrl-C (Lightning exits after its graceful shutdown), SIGTERM: an interruption, not a failure.
            status = "KILLED"
            record.set_tags({"mta.stopped": type(error).__name__})
            raise RunInterrupted(record.run_id, run_dir) from None
        except BaseException as error:
            record.set_tags({"mta.error": mask(f"{type(error).__name__}: {error}")[:5000]})
            record.log_text(mask(traceback.format_exc()), "error.txt")
            raise
        finally:
            record.end(status)
    return RunResult(record.run_id, run_dir, uri, status, module.final_metrics if module else {})


def join_run(run: ddp.SharedRun) -> None:
    """Train as a rank > 0 of the run rank 0 shared: its config (from the run directory, where rank 0
    wrote it before starting this process) and its checkpoint; nothing is recorded."""
    run_dir = Path(run.run_dir)
    config = load_config(str(run_dir / CONFIG_FILE))
    run_data = load_run_data(config)
    fit_run(
        config, run_data, SilentRecord(run.run_id), run_dir, "", "", resume=True, progress=False, rank_of=run
    )


def _record_start(config: RunConfig, record: RunRecord, run_dir: Path, uri: str, device, source: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    execution = [layer.record() for layer in plan_execution(config.model, config.runtime, device)]
    facts = manifest(config, device, source, execution)
    (run_dir / CONFIG_FILE).write_text(resolved_yaml(config))
    (run_dir / "manifest.json").write_text(json.dumps(facts, indent=2) + "\n")
    info = {"run_id": record.run_id, "tracking_uri": mask(uri), "source": source}
    (run_dir / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
    record.log_params(flat_params(config))
    git_tags = {"mlflow.source.git.commit": facts["git_commit"]} if facts["git_commit"] else {}
    record.set_tags({"mta.run_dir": str(run_dir.resolve()), "mta.device": facts["device"], **git_tags})
    record.log_text(resolved_yaml(config), CONFIG_FILE)
    record.log_text(json.dumps(facts, indent=2) + "\n", "manifest.json")


def _trainer(config: RunConfig, budget: Budget, loggers: list[Logger], run_dir: Path, device, progress: bool):
    train = config.train
    callbacks: list[Callback] = [PauseClock(), StepProgress(budget, progress)]
    if train.checkpoint_every is not None:
        callbacks.append(
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints",
                every_n_train_steps=train.checkpoint_every,
                save_top_k=0,
                save_last=True,
            )
        )
    devices = config.runtime.devices
    trainer = L.Trainer(
        accelerator=device.type,
        devices=devices,
        strategy=ddp.strategy(devices),
        precision=lightning_precision(train.precision, device),
        max_steps=-1 if budget.steps is None else budget.steps,  # a time budget: the module stops it
        max_epochs=-1,
        accumulate_grad_batches=train.grad_accum,
        gradient_clip_val=train.grad_clip,
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=train.checkpoint_every is not None,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=run_dir,
    )
    ddp.leave_sigterm_alone(trainer)
    return trainer


def _quiet_lightning() -> None:
    """Lightning's notices about hardware and loaders are noise in this setting."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (
        ".*`srun` command is available on your system but is not used.*",  # DDP is this machine's
        ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
        ".*does not have many workers.*",
        ".*resuming from a checkpoint that ended before the epoch ended.*",
        ".*Checkpoint directory .* exists and is not empty.*",
        ".*`training_step` returned `None`.*",
    ):
        warnings.filterwarnings("ignore", message=message)
