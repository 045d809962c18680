"""The Lightning module: the model library's Transformer, its loss, AdamW and the schedule, and the
metrics of a training run. Lightning stays here; ``mta_lab.model`` never sees it."""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch

from mta_lab.config import RunConfig
from mta_lab.config.train import Decay, ScheduleConfig
from mta_lab.hf.convert import load_init
from mta_lab.model import Transformer
from mta_lab.train.budget import Budget, TrainingClock, resolve_budget
from mta_lab.train.evaluate import Evaluator, masked_mean_nll, token_nll


def lr_factor(step: int, total: int, schedule: ScheduleConfig) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then decay to
    min_lr_ratio at the last step."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    return decay_factor((step - schedule.warmup_steps) / max(1, total - 1 - schedule.warmup_steps), schedule)


def decay_factor(progress: float, schedule: ScheduleConfig) -> float:
    """Multiplier of the peak lr after warmup, at ``progress`` (0 to 1) through the rest of the budget."""
    if schedule.decay == Decay.constant:
        return 1.0
    progress = min(1.0, max(0.0, progress))
    shape = 1 - progress if schedule.decay == Decay.linear else 0.5 * (1 + math.cos(math.pi * progress))
    return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * shape


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def rank_seed(seed: int, rank: int) -> int:
    """The dropout seed of data-parallel rank ``rank`` > 0: distinct from every rank's of every other
    ``train.seed`` (``seed + rank`` would give rank 1 of seed 0 the masks of seed 1)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


class LanguageModel(L.LightningModule):
    def __init__(
        self,
        config: RunConfig,
        budget: Budget | None = None,
        evaluator: Evaluator | None = None,
        device: torch.device | None = None,
    ):
        """``budget`` defaults to the config's; ``device`` is where the model will train: its layers'
        execution paths are chosen for it."""
        super().__init__()
        self.budget = budget or resolve_budget(config)
        self.config, self.evaluator = config, evaluator
        torch.manual_seed(config.train.seed)  # the init seed; the data order has its own
        self.model = Transformer(config.model, config.runtime, device or torch.device("cpu"))
        if config.train.init_from is not None:  # pretrained weights; MTA stages stay at identity
            load_init(self.model, config.model, Path(config.train.init_from))
        # Compiling a separate handle keeps the state dict free of torch.compile's prefixes, so
        # checkpoints move between compiled and eager runs.
        self.forward_fn = torch.compile(self.model) if config.train.compile else self.model
        self.tokens_per_row = config.data.seq_len
        # What a token of training costs, analytically (mta_lab.model.flops): compute-matched comparisons.
        self.flops_per_token = self.budget.flops_per_token
        # Training time, evaluation excluded (a time budget's clock); the seconds at the end of warmup,
        # where a time budget's decay starts.
        self.clock, self._warmup_end_s = TrainingClock(), 0.0
        self._window_loss, self._window_steps, self._last_step = 0.0, 0, 0
        self._step_loss: list[torch.Tensor] = []
        self._window_start = time.perf_counter()
        self._window_tokens = 0
        # The run's own time across resumes (checkpointed), so a stop and a later resume add no downtime.
        self._wall_before, self._fit_start = 0.0, time.perf_counter()
        self.final_metrics: dict[str, float] = {}

    def setup(self, stage: str) -> None:
        # Rank 0 keeps the init seed's generator, so one process is rank 0 of one; the others draw
        # their own dropout masks (identical generators would give every rank's row i the same masks).
        rank = self.trainer.global_rank
        if rank > 0:
            torch.manual_seed(rank_seed(self.config.train.seed, rank))

    def on_train_start(self) -> None:
        self._fit_start = time.perf_counter()
        if self.config.train.init_from and self.global_step == 0 and self.evaluator is not None:
            self._evaluate(0)  # what the run starts from: the loaded weights (MTA on top at identity)
        self.clock.resume()

    def on_train_end(self) -> None:
        self.clock.pause()

    def done(self, step: int) -> bool:
        """Whether optimizer step ``step`` is the budget's last (with a time budget, read from a clock that
        every rank has agreed on)."""
        if self.budget.steps is not None:
            return step >= self.budget.steps
        return self.clock.now() >= self.budget.seconds

    def lr_factor(self, step: int) -> float:
        schedule = self.config.train.schedule
        if self.budget.steps is not None:
            return lr_factor(step, self.budget.steps, schedule)
        if step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        self._agree_on_clock()  # every rank must step with the same learning rate
        if step == schedule.warmup_steps:
            self._warmup_end_s = self.clock.now()
        spent = (self.clock.now() - self._warmup_end_s) / max(1e-9, self.budget.seconds - self._warmup_end_s)
        return decay_factor(spent, schedule)

    def _agree_on_clock(self) -> None:
        """Every rank takes rank 0's training clock, so that a time budget's schedule and its last step
        are the same on all of them (their own clocks differ by what each waited)."""
        if self.budget.steps is not None or self._trainer is None or self.trainer.world_size == 1:
            return
        running = self.clock.running
        self.clock.pause()  # the broadcast's wait is not training
        self.clock.seconds = self.trainer.strategy.broadcast(self.clock.seconds, src=0)
        if running:
            self.clock.resume()

    def wall_time_s(self) -> float:
        return self._wall_before + time.perf_counter() - self._fit_start

    def forward(self, inputs_bt: torch.Tensor) -> torch.Tensor:
        return self.forward_fn(inputs_bt)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        world = self.trainer.world_size
        if world == 1:
            loss = masked_mean_nll(self(batch["inputs"]), batch["targets"], batch["mask"])
            mean = loss.detach()
        else:
            loss, mean = self._shared_loss(batch, world)
        self._step_loss.append(mean)
        self._window_tokens += batch["inputs"].numel() * world
        self.log("loss", mean, prog_bar=True, logger=False)
        return loss

    def _shared_loss(self, batch: dict[str, torch.Tensor], world: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(what this rank back-propagates, the batch's loss) when ``world`` ranks share the batch.

        The batch's loss is the mean NLL over the target positions of all ranks' rows. Ranks' rows hold
        different numbers of targets (tasks' rows are padded), so a mean of their own means would
        weigh them wrongly: each rank scales its NLL sum by the batch's target count, times ``world``
        because DDP averages the gradients."""
        nll_sum = (token_nll(self(batch["inputs"]), batch["targets"]) * batch["mask"]).sum()
        local = torch.stack([nll_sum.detach(), batch["mask"].sum().to(nll_sum.dtype)])
        total_nll, targets = self.trainer.strategy.reduce(local, reduce_op="sum").unbind()
        targets = targets.clamp(min=1)
        return nll_sum * world / targets, total_nll / targets

    def configure_optimizers(self):
        optim = self.config.train.optim
        optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=optim.lr,
            betas=(optim.beta1, optim.beta2),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = [p.grad.detach().norm() for p in self.model.parameters() if p.grad is not None]
        self._grad_norm = torch.stack(norms).norm().item() if norms else 0.0

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        step = self.global_step
        if step == self._last_step:
            return  # inside a gradient-accumulation window
        self._last_step = step
        step_loss = torch.stack(self._step_loss).mean().item()
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"the training loss is {step_loss} at step {step}")
        self._window_loss += step_loss
        self._window_steps += 1
        self._step_loss = []
        self._agree_on_clock()
        train, last = self.config.train, self.done(step)
        if step % train.log_every == 0 or last:
            self._log_train(step)
        every = self.config.eval.every
        if self.evaluator is not None and ((every and step % every == 0) or last):
            self._evaluate(step)
        if last:
            self.trainer.should_stop = True  # a time budget's end; a step budget's is max_steps too
        else:
            self.clock.resume()  # what ran since the step's end (evaluation, checkpoints) is not training

    def _log_train(self, step: int) -> None:
        elapsed = time.perf_counter() - self._window_start
        tokens = step * self.config.train.tokens_per_step(self.tokens_per_row)
        metrics = {
            "train/loss": self._window_loss / self._window_steps,
            "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
            "train/grad_norm": self._grad_norm,
            "train/tokens": tokens,
            "train/flops": tokens * self.flops_per_token,
            "train/seconds": self.clock.now(),
            "train/tokens_per_s": self._window_tokens / elapsed,
            "sys/peak_memory_mb": peak_memory_mb(self.device),
            "sys/wall_time_s": self.wall_time_s(),
        }
        self._log(metrics, step)
        self._window_loss, self._window_steps, self._window_tokens = 0.0, 0, 0
        self._window_start = time.perf_counter()

    def _evaluate(self, step: int) -> None:
        """Rank 0 evaluates (every rank holds the same weights); the others wait for it."""
        if self.trainer.is_global_zero:
            autocast = self.trainer.precision_plugin.forward_context
            metrics = self.evaluator(self.model, self.device, autocast)
            self._log(metrics, step)
            self.final_metrics = metrics
        self.trainer.strategy.barrier("evaluate")
        self._window_start = time.perf_counter()  # evaluation time is not training throughput

    def _log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:  # MLflow, and a sweep worker's progress file
            logger.log_metrics(metrics, step=step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Dropout draws from torch's global generators: resuming restores them for an exact replay.
        # (Data and tasks use their own seeded generators; nothing else is random in training.)
        checkpoint["wall_time_s"] = self.wall_time_s()
        checkpoint["training_clock"] = {"seconds": self.clock.now(), "warmup_end_s": self._warmup_end_s}
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        checkpoint["rng"] = rng  # rank 0's: only rank 0 writes the checkpoint
        if self.trainer.world_size > 1:  # every rank calls this hook
            ranks: list[dict | None] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(ranks, rng)
            checkpoint["rng_ranks"] = ranks

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._last_step = checkpoint["global_step"]
        self._wall_before = checkpoint.get("wall_time_s", 0.0)
        clock = checkpoint.get("training_clock", {})
        self.clock = TrainingClock(clock.get("seconds", 0.0))
        self._warmup_end_s = clock.get("warmup_end_s", 0.0)
        rng = checkpoint.get("rng")
        ranks, rank = checkpoint.get("rng_ranks"), self.trainer.global_rank
        if ranks is not None and len(ranks) == self.trainer.world_size:
            rng = ranks[rank]
        elif rank > 0:
            rng = None  # saved by fewer ranks: this one keeps the generator setup() seeded
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
