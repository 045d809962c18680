"""Training configuration: optimizer, schedule, budget, precision, seeds, evaluation and tracking."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from mta_lab.config.model import _check


class Decay(str, Enum):
    """Learning-rate shape after warmup."""

    linear = "linear"
    """Linear to min_lr_ratio at the last step (the paper's schedule, with ratio 0)."""
    cosine = "cosine"
    """Half cosine to min_lr_ratio at the last step."""
    constant = "constant"
    """Stay at lr (the toy task's schedule)."""


class Precision(str, Enum):
    """Numeric precision of training."""

    auto = "auto"
    """bf16 mixed precision on a GPU, fp32 on CPU."""
    fp32 = "fp32"
    """Full fp32."""
    bf16 = "bf16"
    """bf16 mixed precision (weights and optimizer in fp32)."""


@dataclass
class OptimConfig:
    """AdamW, one parameter group (weight decay on every parameter, as in the paper's runs)."""

    lr: float = 3e-4
    """Peak learning rate."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2 (the paper: 0.98)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (the paper: 0.05)."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", f"{self.lr} must be > 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta2", "betas must be in [0, 1)")
        _check(self.eps > 0, "eps", f"{self.eps} must be > 0")
        _check(self.weight_decay >= 0, "weight_decay", f"{self.weight_decay} must be >= 0")


@dataclass
class ScheduleConfig:
    """Linear warmup from 0, then ``decay`` to ``min_lr_ratio * lr`` at the last step."""

    warmup_steps: int = 0
    """Optimizer steps of linear warmup."""
    decay: Decay = Decay.cosine
    """``linear``, ``cosine`` or ``constant``."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""

    def __post_init__(self) -> None:
        _check(self.warmup_steps >= 0, "warmup_steps", f"{self.warmup_steps} must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"{self.min_lr_ratio} must be in [0, 1]")


BUDGET_KINDS = ("steps", "tokens", "flops", "seconds")
"""The ways to say how long a run trains; a config gives exactly one."""


@dataclass
class TrainConfig:
    """How long and how to train. The budget is one of ``steps``, ``tokens``, ``flops`` or ``seconds``;
    the others are null. A budget in tokens is rounded up to whole optimizer steps, one in FLOPs to the
    nearest, and the learning-rate schedule spans whichever budget is given."""

    steps: int | None = 1000
    """Budget in optimizer steps."""
    tokens: int | None = None
    """Budget in training tokens; set steps to null to use it."""
    flops: float | None = None
    """Budget in training FLOPs (forward + backward, analytic: ``mta-lab info`` shows them per token), so
    that a costlier model trains on fewer tokens; set steps to null to use it."""
    seconds: float | None = None
    """Budget in seconds of training on the run's device: evaluation and checkpoints excluded, resumes
    continue the clock; set steps to null to use it."""
    batch_size: int = 8
    """Sequences per micro-batch, of all processes together (``runtime.devices`` share it)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    grad_clip: float | None = 1.0
    """Clip the gradient norm to this; null switches clipping off."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    precision: Precision = Precision.auto
    """``auto`` (bf16 mixed on GPU, fp32 on CPU), ``fp32`` or ``bf16``."""
    compile: bool = False
    """Run the model through torch.compile."""
    seed: int = 0
    """Seed of the weight init and of dropout."""
    init_from: str | None = None
    """Start from these weights (a ``.safetensors`` file of mta-lab's parameter names, as ``mta-lab
    import`` writes them): every parameter in it must match the model's; MTA stages the file lacks
    keep their identity init, so step 0 computes what the weights did. Null: a fresh init."""
    log_every: int = 10
    """Optimizer steps between logged training metrics."""
    checkpoint_every: int | None = 100
    """Optimizer steps between checkpoints (kept: the last one); null: only at the end."""

    def __post_init__(self) -> None:
        given = {name: getattr(self, name) for name in BUDGET_KINDS if getattr(self, name) is not None}
        shown = " and ".join(f"{name}={value}" for name, value in given.items()) or "all null"
        _check(
            len(given) == 1,
            list(given)[-1] if given else "steps",
            f"the budget is {shown}; give exactly one of steps, tokens, flops or seconds and set the "
            "others to null (e.g. train.steps=null train.flops=1e15)",
        )
        for name in ("steps", "tokens"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, f"{value} is not a budget; use an integer >= 1")
        for name in ("flops", "seconds"):
            value = getattr(self, name)
            _check(value is None or value > 0, name, f"{value} is not a budget; use a number > 0")
        for name in ("batch_size", "grad_accum", "log_every"):
            value = getattr(self, name)
            _check(value >= 1, name, f"{value} is not allowed; use an integer >= 1")
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", f"{self.grad_clip} must be > 0")
        _check(0 <= self.seed < 2**32, "seed", f"{self.seed} must be in 0..4294967295")
        _check(
            self.checkpoint_every is None or self.checkpoint_every >= 1,
            "checkpoint_every",
            f"{self.checkpoint_every} must be >= 1 (or null)",
        )

    @property
    def budget_kind(self) -> str:
        """Which of steps, tokens, flops or seconds the budget is given in."""
        return next(name for name in BUDGET_KINDS if getattr(self, name) is not None)

    def tokens_per_step(self, seq_len: int) -> int:
        return self.batch_size * self.grad_accum * seq_len


@dataclass
class EvalConfig:
    """Periodic evaluation: validation loss per corpus, and every configured task."""

    every: int | None = 100
    """Optimizer steps between evaluations (and always at the end); null: only at the end."""
    batches: int = 8
    """Validation batches per corpus."""
    batch_size: int | None = None
    """Sequences per evaluation batch; null: train.batch_size."""

    def __post_init__(self) -> None:
        _check(self.every is None or self.every >= 1, "every", f"{self.every} must be >= 1 (or null)")
        _check(self.batches >= 1, "batches", f"{self.batches} must be >= 1")
        _check(
            self.batch_size is None or self.batch_size >= 1, "batch_size", f"{self.batch_size} must be >= 1"
        )


@dataclass
class TrackingConfig:
    """Where a run is recorded in MLflow (the store itself is --tracking-uri / MLFLOW_TRACKING_URI)."""

    experiment: str = "mta-lab"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name; null: the preset name and the overrides."""
