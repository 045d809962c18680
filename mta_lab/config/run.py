"""The root of a run's configuration; presets, files and ``key=value`` overrides all address it."""

from __future__ import annotations

from dataclasses import dataclass, field

from mta_lab.config.data import DataConfig, TasksConfig, TokenizerKind
from mta_lab.config.model import ModelConfig, _check
from mta_lab.config.runtime import RuntimeConfig
from mta_lab.config.train import EvalConfig, TrackingConfig, TrainConfig

TRAIN_METRICS = ("loss", "lr", "grad_norm", "tokens", "flops", "seconds", "tokens_per_s")
"""Logged every ``train.log_every`` steps, after ``train/``; ``flops`` is cumulative training FLOPs
(forward + backward, analytic: mta_lab.model.flops), ``seconds`` cumulative training time on the run's
device (evaluation and checkpoints excluded; what a time budget counts)."""
VAL_METRICS = ("loss", "ppl", "bpb")
"""Logged at each evaluation for each corpus (``val/<corpus>/loss``) and averaged (``val/loss``)."""

# Token ids each fixed-vocabulary tokenizer needs.
FIXED_VOCAB = {TokenizerKind.byte: 260, TokenizerKind.char: 32}


@dataclass
class RunConfig:
    """Everything one run needs. Keys are dotted paths from here, e.g. ``model.mta.pre_qk_conv``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    data: DataConfig = field(default_factory=DataConfig)
    """Tokenizer and text corpora."""
    tasks: TasksConfig = field(default_factory=TasksConfig)
    """Synthetic tasks mixed into training and evaluated."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, schedule, budget, precision, seeds."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic evaluation."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow experiment and run name."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """How the attention computes (kernels, tiles) and on how many processes: the same numbers every way,
    not in the config hash."""

    def __post_init__(self) -> None:
        tokenizer = self.data.tokenizer
        if (
            tokenizer.kind in FIXED_VOCAB
        ):  # a BPE's size is known once it is loaded (it may come with a dataset)
            needed = FIXED_VOCAB[tokenizer.kind]
            _check(
                self.model.vocab_size >= needed,
                "model.vocab_size",
                f"{self.model.vocab_size} is smaller than the {tokenizer.kind.value} tokenizer's {needed} ids; "
                f"set model.vocab_size={needed}",
            )
        longest = self.model.max_seq_len
        _check(
            self.data.seq_len <= longest,
            "data.seq_len",
            f"{self.data.seq_len} exceeds model.max_seq_len={longest}; lower it or raise model.max_seq_len",
        )
        tasks = self.tasks
        if tasks.niah is not None:
            too_long = [c for c in tasks.niah.contexts if c > longest]
            _check(not too_long, "tasks.niah.contexts", f"{too_long} exceed model.max_seq_len={longest}")
        if tasks.babilong is not None:
            too_long = [d for d in tasks.babilong.distractors if d >= longest]
            _check(
                not too_long,
                "tasks.babilong.distractors",
                f"{too_long} leave no room for a story within model.max_seq_len={longest}",
            )
        if tasks.mqar is not None:
            too_long = [n for n in tasks.mqar.eval_lengths if n > longest]
            _check(not too_long, "tasks.mqar.eval_lengths", f"{too_long} exceed model.max_seq_len={longest}")
            _check(
                4 * tasks.mqar.pairs <= self.data.seq_len or tasks.mqar.weight == 0,
                "tasks.mqar.pairs",
                f"{tasks.mqar.pairs} pairs and their queries do not fit a training row of "
                f"data.seq_len={self.data.seq_len} (need 4 * pairs <= seq_len)",
            )
        if tasks.toy_block is not None and tasks.toy_block.weight > 0:
            _check(
                tasks.toy_block.length + 1 <= self.data.seq_len,
                "tasks.toy_block.length",
                f"{tasks.toy_block.length} characters + BOS + EOS do not fit data.seq_len + 1 = "
                f"{self.data.seq_len + 1} tokens",
            )
        devices = self.runtime.devices
        _check(
            self.train.batch_size % devices == 0,
            "train.batch_size",
            f"{self.train.batch_size} sequences do not split evenly between runtime.devices={devices} "
            "processes; make train.batch_size a multiple of runtime.devices",
        )
        weights = [c.weight for c in self.data.active_corpora().values()] + [
            t.weight for t in tasks.enabled().values()
        ]
        _check(
            sum(weights) > 0,
            "data.corpora",
            "nothing to train on: every corpus and task has weight 0 (give a corpus or a task a weight > 0)",
        )

    def logged_metrics(self) -> list[str]:
        """Every metric a run of this config logs while it trains (MLflow and a sweep's progress)."""
        names = [f"train/{name}" for name in TRAIN_METRICS] + ["sys/peak_memory_mb", "sys/wall_time_s"]
        corpora = list(self.data.active_corpora())
        if corpora:
            names += [f"val/{name}" for name in VAL_METRICS]
            names += [f"val/{corpus}/{name}" for corpus in corpora for name in VAL_METRICS]
        for task, config in self.tasks.enabled().items():
            names += [f"{task}/{name}" for name in config.metric_names()]
        return names
