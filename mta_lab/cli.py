"""The ``mta-lab`` command line.

Every command loads configs the same way: a preset name or YAML path, then ``key=value`` overrides.
A bad input (config, argument) is one line on stderr and exit code 2; nothing is left half-done.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from mta_lab.config import ConfigError, RunConfig, load_config, preset_names, resolved_yaml
from mta_lab.config.loading import preset_description
from mta_lab.data.errors import DataError

if TYPE_CHECKING:
    from mta_lab.model import LayerPlan

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """Bad command-line input: reported as one line with exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after options (`check tiny --steps 5 model.dim=32`); argparse
    # stops collecting positionals at the first option, so the rest arrive as extras.
    args, extras = parser.parse_known_args(argv)
    unknown = [item for item in extras if "=" not in item or item.startswith("-")]
    if unknown or (extras and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extras)}")
    if extras:
        args.overrides = [*args.overrides, *extras]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.run(args)
    except (ConfigError, UsageError, DataError) as error:
        print(f"mta-lab: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("mta-lab: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mta-lab",
        description="Ablations of Multi-Token Attention (arXiv 2504.00927).",
        epilog=f"presets: {', '.join(preset_names())}",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each layer runs")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    info = commands.add_parser(
        "info",
        help="print a resolved config and its parameter counts",
        description="Print the resolved config (YAML), the parameter count per component and what each "
        "layer runs. The model is built on the meta device: nothing is allocated.",
    )
    _add_config_arguments(info)
    info.set_defaults(run=_info)

    check = commands.add_parser(
        "check",
        help="run a few training steps of a preset on random tokens",
        description="Build the model, fit one random batch for a few AdamW steps on CPU (or GPU), and "
        "report the loss and speed: a quick proof that a config builds, trains and learns.",
    )
    _add_config_arguments(check)
    check.add_argument("--steps", type=_positive_int, default=10, help="optimizer steps (default 10)")
    check.add_argument("--batch-size", type=_positive_int, default=4, help="sequences per step (default 4)")
    check.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per sequence (default 128)")
    check.add_argument("--seed", type=int, default=0, help="seed for the weights and tokens (default 0)")
    check.set_defaults(run=_check)

    train = commands.add_parser(
        "train",
        help="train one run and record it in MLflow",
        description="Train a preset or YAML config end to end, with periodic evaluation, checkpoints and "
        "one MLflow run (default store: sqlite:///mlflow.db in the working directory).",
    )
    train.add_argument("config", nargs="?", metavar="NAME_OR_PATH", help="a preset name or a YAML file")
    train.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=50"
    )
    train.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last checkpoint"
    )
    _add_tracking_arguments(train)
    train.set_defaults(run=_train)

    data = commands.add_parser("data", help="prepare corpora").add_subparsers(required=True, metavar="ACTION")
    prepare = data.add_parser(
        "prepare",
        help="tokenize text, JSONL or Parquet into a dataset",
        description="Tokenize text files, directories of them, JSONL (one document per line) and Parquet (one "
        "per row) into memory-mapped train/val shards; the split is by document and deterministic. Use the "
        "result in a run with data.corpora.NAME.path=OUT.",
    )
    prepare.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="files or directories")
    prepare.add_argument("--out", type=Path, required=True, help="the dataset directory to write")
    prepare.add_argument("--tokenizer", choices=["byte", "bpe", "char"], default="byte", help="default: byte")
    prepare.add_argument(
        "--vocab-size", type=_positive_int, default=4096, help="BPE vocabulary (default 4096)"
    )
    prepare.add_argument("--text-field", default="text", help="JSONL field / Parquet column (default: text)")
    prepare.add_argument("--val-fraction", type=float, default=0.05, help="documents held out (default 0.05)")
    prepare.add_argument("--force", action="store_true", help="replace --out if it exists")
    prepare.set_defaults(run=_prepare)

    bench = commands.add_parser("bench", help="measure speed").add_subparsers(required=True, metavar="WHAT")
    bench_train = bench.add_parser(
        "train",
        help="training tokens/s and peak memory: baseline vs talking heads vs MTA",
        description="Time AdamW steps of each preset's model on random tokens (its own batch and sequence "
        "length), as plain attention, talking heads and MTA, each in a fresh process. Prints a table; "
        "ratios are to the baseline of the same preset.",
    )
    bench_train.add_argument("presets", nargs="*", default=["tiny", "small"], metavar="PRESET")
    bench_train.add_argument("--variants", default="baseline,talking-heads,mta", help="comma-separated")
    bench_train.add_argument("--steps", type=_positive_int, default=20, help="timed steps (default 20)")
    bench_train.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    bench_train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for every preset, e.g. --set train.batch_size=4",
    )
    bench_train.set_defaults(run=_bench_train)

    presets = commands.add_parser("presets", help="list the named presets")
    presets.set_defaults(run=_presets)
    return parser


def _console() -> Console:
    """Rich output; when piped (logs, files) wide enough that tables do not wrap."""
    console = Console()
    return console if console.is_terminal else Console(width=140)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", metavar="NAME_OR_PATH", help="a preset name (see `mta-lab presets`) or a YAML file"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. model.mta.pre_qk_conv.key_kernel=9",
    )


def _add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)",
    )
    parser.add_argument(
        "--runs-dir", type=Path, default=Path("runs"), help="checkpoints go here (default: runs)"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; use an integer >= 1")
    return value


def _load(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)


def _presets(args: argparse.Namespace) -> int:
    table = Table("preset", "what it is", box=None)
    for name in preset_names():
        table.add_row(name, preset_description(name))
    _console().print(table)
    return 0


def _train(args: argparse.Namespace) -> int:
    from mta_lab.train.run import default_run_name, resume, train

    if args.resume is not None:
        if args.config or args.overrides:
            raise UsageError("--resume takes the run's own config; give no preset or overrides with it")
        result = resume(args.resume, tracking_uri=args.tracking_uri)
    else:
        if args.config is None:
            raise UsageError("give a preset name or YAML file (see `mta-lab presets`), or --resume RUN_DIR")
        config = _load(args)
        run_name = config.tracking.run_name or default_run_name(args.config, args.overrides)
        result = train(
            config, args.config, tracking_uri=args.tracking_uri, runs_dir=args.runs_dir, run_name=run_name
        )
    _print_result(result)
    return 0


def _print_result(result) -> None:
    console = _console()
    console.print(f"run {result.run_id}: {result.status}", highlight=False)
    table = Table("final metric", "value", box=None)
    for key, value in sorted(result.metrics.items()):
        if key.count("/") == 1 or key.startswith("val/"):  # per-cell task metrics stay in MLflow
            table.add_row(key, f"{value:.4g}")
    console.print(table)
    console.print(f"checkpoints: {result.run_dir}   resume: mta-lab train --resume {result.run_dir}")
    console.print(
        f"MLflow: {result.tracking_uri}   browse: mlflow ui --backend-store-uri {result.tracking_uri}"
    )


def _bench_train(args: argparse.Namespace) -> int:
    from mta_lab.train.bench import VARIANTS, measure_isolated, variant_config

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise UsageError(f"--variants: unknown {', '.join(unknown)} (allowed: {', '.join(VARIANTS)})")
    for preset in args.presets:  # check every config before spending time on any
        for variant in variants:
            variant_config(preset, variant, args.overrides)
    console = _console()
    table = Table(
        "preset",
        "variant",
        "params",
        "batch x seq",
        "tokens/s",
        "ms/step",
        "peak MB",
        "speed vs base",
        "memory vs base",
        title="Training throughput",
        title_justify="left",
        box=None,
    )
    device = ""
    for preset in args.presets:
        base = None
        for variant in variants:
            with console.status(f"{preset} {variant} ..."):
                m = measure_isolated(preset, variant, args.overrides, args.steps, args.warmup)
            base = base or (m if variant == "baseline" else None)
            device = m.device
            table.add_row(
                preset,
                variant,
                f"{m.parameters:,}",
                f"{m.batch} x {m.seq_len}",
                f"{m.tokens_per_s:,.0f}",
                f"{m.step_ms:.1f}",
                f"{m.peak_mb:,.0f}",
                f"{m.tokens_per_s / base.tokens_per_s:.2f}x" if base else "-",
                f"{m.peak_mb / base.peak_mb:.2f}x" if base else "-",
            )
    console.print(table)
    console.print(
        f"device: {device}; {args.steps} timed steps after {args.warmup} warm-up steps; peak MB is "
        "GPU memory allocated on CUDA, the process's peak resident memory on CPU",
        highlight=False,
    )
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from mta_lab.config.data import TokenizerConfig, TokenizerKind
    from mta_lab.data.datasets import prepare_dataset
    from mta_lab.data.documents import read_documents, split_documents
    from mta_lab.data.tokenizers import cached_bpe, fixed_tokenizer

    if not 0 < args.val_fraction < 1:
        raise UsageError(f"--val-fraction {args.val_fraction} must be in (0, 1)")
    documents = read_documents(args.inputs, args.text_field)
    settings = TokenizerConfig(kind=TokenizerKind(args.tokenizer), vocab_size=args.vocab_size)
    tokenizer = fixed_tokenizer(settings)
    if tokenizer is None:  # BPE: learned from the training documents only
        train_docs, _ = split_documents(documents, args.val_fraction)
        tokenizer = cached_bpe([d.text for d in train_docs], args.vocab_size)
    source = {
        "inputs": [str(p) for p in args.inputs],
        "text_field": args.text_field,
        "documents": len(documents),
    }
    dataset = prepare_dataset(documents, tokenizer, args.out, args.val_fraction, source, force=args.force)
    table = Table(
        "split", "documents", "tokens", "bytes", title=str(args.out), title_justify="left", box=None
    )
    for split, info in dataset.meta["splits"].items():
        table.add_row(split, f"{info['documents']:,}", f"{info['tokens']:,}", f"{info['bytes']:,}")
    console = _console()
    console.print(table)
    console.print(
        f"tokenizer {tokenizer.name}; train on it with: data.corpora.{args.out.name}.path={args.out}"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    import torch

    from mta_lab.model import Transformer, parameter_counts

    config = _load(args)
    with torch.device("meta"):
        model = Transformer(config.model)
    console = _console()
    console.print(f"# {args.config} {' '.join(args.overrides)}".rstrip(), highlight=False)
    console.print(resolved_yaml(config), end="", highlight=False, markup=False)

    counts = parameter_counts(model)
    total = sum(counts.values())
    params = Table("component", "parameters", title="Parameters", title_justify="left", box=None)
    for component, count in counts.items():
        params.add_row(component, f"{count:,}")
    params.add_row("total", f"{total:,}", style="bold")
    params.add_row(
        "non-embedding", f"{total - counts.get('embedding', 0) - counts.get('output projection', 0):,}"
    )
    console.print(params)

    console.print(_layer_table(model.plans))
    return 0


def _layer_table(plans: list[LayerPlan]) -> Table:
    """One row per distinct layer plan, with the layers that share it."""
    stages = ("pre_qk_conv", "pre_head_mix", "post_qk_conv", "post_head_mix", "out_norm")
    groups: dict[tuple[str, ...], list[int]] = {}
    for plan in plans:
        mechanisms = plan.mta.mechanisms() if plan.mta else {}
        path = "score map" if plan.uses_score_map else "sdpa"
        row = (path, *(mechanisms[s].describe() if s in mechanisms else "-" for s in stages))
        groups.setdefault(row, []).append(plan.layer_id)
    headers = ("pre conv", "pre mix", "post conv", "post mix", "out norm")
    table = Table("layers", "attention", *headers, title="Layers (0-based)", title_justify="left", box=None)
    for row, layer_ids in groups.items():
        table.add_row(_ranges(layer_ids), *row)
    return table


def _ranges(ids: list[int]) -> str:
    """[0, 1, 3, 4, 5, 7] -> '0-1, 3-5, 7'."""
    spans: list[list[int]] = []
    for i in ids:
        if spans and i == spans[-1][-1] + 1:
            spans[-1][-1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _check(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from mta_lab.model import Transformer
    from mta_lab.train.device import training_device

    config = _load(args)
    if args.seq_len > config.model.max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len} exceeds model.max_seq_len={config.model.max_seq_len}")
    device = training_device()
    torch.manual_seed(args.seed)
    model = Transformer(config.model).to(device)
    tokens = torch.randint(config.model.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.config}: {n_params:,} parameters on {device}; fitting one random batch of "
        f"{args.batch_size}x{args.seq_len} tokens"
    )
    losses = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"  step {step:3d}  loss {losses[-1]:.4f}")
    elapsed = time.perf_counter() - start
    tokens_per_s = args.steps * inputs.numel() / elapsed
    print(f"{tokens_per_s:,.0f} tokens/s (forward + backward + step)")
    if not all(map(math.isfinite, losses)):
        print("FAILED: the loss is not finite", file=sys.stderr)
        return 1
    if args.steps > 1 and losses[-1] >= losses[0]:
        print(f"FAILED: the loss did not decrease ({losses[0]:.4f} -> {losses[-1]:.4f})", file=sys.stderr)
        return 1
    print(f"ok: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
