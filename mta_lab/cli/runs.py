"""Run commands: ``train`` (and ``--resume``), ``data prepare``, ``bench train``, ``bench attention`` and
``bench kernels``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.table import Table

from mta_lab.cli import common
from mta_lab.secrets import mask


def register(commands) -> None:
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
    common.add_tracking_arguments(train)
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
        "--vocab-size", type=common.positive_int, default=4096, help="BPE vocabulary (default 4096)"
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
    bench_train.add_argument("--steps", type=common.positive_int, default=20, help="timed steps (default 20)")
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

    bench_attention = bench.add_parser(
        "attention",
        help="one attention layer: SDPA vs the reference MTA path (full and tiled) vs the fused kernel",
        description="Time forward and forward+backward of one attention layer's core (after the q, k, v "
        "projections) and its peak extra memory, as plain SDPA, the reference MTA path (full score "
        "map, eager and torch.compile; tiled in blocks of query rows, convolving by F.conv2d or, as "
        "tiled-triton, by the Triton score-map kernel) and the fused Triton kernel. Medians over repeats "
        "with CUDA events; ratios are to SDPA. Defaults: the issue's shape (B=8, H=16, T=2048, d=64, bf16) "
        "on a GPU, a small fp32 shape on CPU (where the Triton kernels run only under TRITON_INTERPRET=1).",
    )
    bench_attention.add_argument(
        "layers", nargs="*", default=["pre-conv-6x11", "paper-layer"], metavar="LAYER", help="MTA layers"
    )
    bench_attention.add_argument(
        "--paths",
        default="sdpa,reference,reference-compiled,tiled,tiled-triton,fused",
        help="comma-separated",
    )
    _shape_arguments(bench_attention, cpu="1, 4, 256, 32")
    bench_attention.set_defaults(run=_bench_attention)

    bench_kernels = bench.add_parser(
        "kernels",
        help="each Triton kernel under a grid of launch settings, checked against its definition",
        description="Time forward and forward+backward of each Triton kernel of the fused and tiled MTA "
        "paths (band-attention: the fused pre-conv layer's band-FlashAttention call; score-conv: the "
        "convolution of a full score map; diagonals: the raw scores next to the causal edge) under a grid "
        "of tiles, warps, pipeline stages and backward variants, each checked against its definition first "
        "(on the first batch element). Prints a table per kernel, fastest first, and the fastest correct "
        "setting. Defaults: the issue's shape on a GPU with a 6x11 convolution. On CPU (TRITON_INTERPRET=1) "
        "the launch settings do not apply: only the defaults run, at a small shape.",
    )
    bench_kernels.add_argument(
        "kernels", nargs="*", default=["band-attention", "score-conv", "diagonals"], metavar="KERNEL"
    )
    bench_kernels.add_argument(
        "--conv", default="6x11", metavar="QxK", help="query x key kernel sizes, odd K (default 6x11)"
    )
    _shape_arguments(bench_kernels, cpu="1, 2, 64, 16")
    bench_kernels.set_defaults(run=_bench_kernels)


def _shape_arguments(parser: argparse.ArgumentParser, cpu: str) -> None:
    """--batch, --heads, --seq-len, --head-dim, --dtype and --repeats; ``cpu`` names the CPU defaults of
    the first four (the GPU's are the issue's: 8, 16, 2048, 64, bf16)."""
    batch, heads, seq_len, head_dim = cpu.split(", ")
    parser.add_argument("--batch", type=common.positive_int, help=f"default 8 on GPU, {batch} on CPU")
    parser.add_argument("--heads", type=common.positive_int, help=f"default 16 on GPU, {heads} on CPU")
    parser.add_argument("--seq-len", type=common.positive_int, help=f"default 2048 on GPU, {seq_len} on CPU")
    parser.add_argument("--head-dim", type=common.positive_int, help=f"default 64 on GPU, {head_dim} on CPU")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--repeats", type=common.positive_int, default=10, help="timed repeats (default 10)")
    parser.set_defaults(cpu_shape=tuple(int(x) for x in cpu.split(", ")))


def _shape(args: argparse.Namespace, gpu: bool):
    import torch

    from mta_lab.bench.attention import Shape

    batch, heads, seq_len, head_dim = (8, 16, 2048, 64) if gpu else args.cpu_shape
    return Shape(
        batch=args.batch or batch,
        heads=args.heads or heads,
        seq_len=args.seq_len or seq_len,
        head_dim=args.head_dim or head_dim,
        dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            args.dtype or ("bf16" if gpu else "fp32")
        ],
    )


def _device_name(gpu: bool) -> str:
    import torch

    return torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)"


def _train(args: argparse.Namespace) -> int:
    from mta_lab.train.run import RunInterrupted, default_run_name, resume, train

    try:
        if args.resume is not None:
            if args.config or args.overrides:
                raise common.UsageError(
                    "--resume takes the run's own config; give no preset or overrides with it"
                )
            result = resume(args.resume, tracking_uri=args.tracking_uri)
        else:
            if args.config is None:
                raise common.UsageError(
                    "give a preset name or YAML file (see `mta-lab presets`), or --resume RUN_DIR"
                )
            config = common.load(args)
            run_name = config.tracking.run_name or default_run_name(args.config, args.overrides)
            tags = {"mta.overrides": " ".join(args.overrides)[:5000]} if args.overrides else {}
            result = train(
                config,
                args.config,
                tracking_uri=args.tracking_uri,
                runs_dir=args.runs_dir,
                run_name=run_name,
                tags=tags,
            )
    except RunInterrupted as stopped:
        print(
            f"mta-lab: stopped; run {stopped.run_id} is marked KILLED. Resume it from its last checkpoint with: "
            f"mta-lab train --resume {stopped.run_dir}",
            file=sys.stderr,
        )
        return 130
    _print_result(result)
    return 0


def _print_result(result) -> None:
    console = common.console()
    console.print(f"run {result.run_id}: {result.status}", highlight=False)
    table = Table("final metric", "value", box=None)
    for key, value in sorted(result.metrics.items()):
        if key.count("/") == 1 or key.startswith("val/"):  # per-cell task metrics stay in MLflow
            table.add_row(key, f"{value:.4g}")
    console.print(table)
    console.print(f"checkpoints: {result.run_dir}   resume: mta-lab train --resume {result.run_dir}")
    uri = mask(result.tracking_uri)
    console.print(f"MLflow: {uri}   browse: mlflow ui --backend-store-uri {uri}")


def _prepare(args: argparse.Namespace) -> int:
    from mta_lab.config.data import TokenizerConfig, TokenizerKind
    from mta_lab.data.datasets import prepare_dataset
    from mta_lab.data.documents import read_documents, split_documents
    from mta_lab.data.tokenizers import cached_bpe, fixed_tokenizer

    if not 0 < args.val_fraction < 1:
        raise common.UsageError(f"--val-fraction {args.val_fraction} must be in (0, 1)")
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
    console = common.console()
    console.print(table)
    console.print(
        f"tokenizer {tokenizer.name}; train on it with: data.corpora.{args.out.name}.path={args.out}"
    )
    return 0


def _bench_train(args: argparse.Namespace) -> int:
    from mta_lab.bench.train import VARIANTS, measure_isolated, variant_config

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise common.UsageError(f"--variants: unknown {', '.join(unknown)} (allowed: {', '.join(VARIANTS)})")
    for preset in args.presets:  # check every config before spending time on any
        for variant in variants:
            variant_config(preset, variant, args.overrides)
    console = common.console()
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


def _bench_attention(args: argparse.Namespace) -> int:

    from mta_lab.bench.attention import LAYERS, PATHS, bench_attention
    from mta_lab.train.device import training_device

    unknown = sorted(set(args.layers) - set(LAYERS))
    if unknown:
        raise common.UsageError(f"LAYER: unknown {', '.join(unknown)} (allowed: {', '.join(LAYERS)})")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise common.UsageError(f"--paths: unknown {', '.join(unknown)} (allowed: {', '.join(PATHS)})")
    device = training_device()
    gpu = device.type == "cuda"
    shape = _shape(args, gpu)
    console = common.console()
    with console.status("measuring ...") as status:
        timings = bench_attention(args.layers, paths, shape, args.repeats, device, progress=status.update)
    sdpa = next((t for t in timings if t.path == "sdpa" and t.forward_backward_ms), None)

    def ms(value):
        return "-" if value is None else f"{value:.2f}"

    table = Table(
        "layer", "path", "fwd ms", "fwd+bwd ms", "extra GiB", "fwd+bwd vs SDPA", "memory vs SDPA", "note",
        title=f"Attention layer, {_describe_shape(shape)}",
        title_justify="left",
        box=None,
    )  # fmt: skip
    for t in timings:
        speed = (
            f"{t.forward_backward_ms / sdpa.forward_backward_ms:.1f}x"
            if sdpa and t.forward_backward_ms
            else "-"
        )
        memory = (
            f"{t.extra_gib / sdpa.extra_gib:.1f}x"
            if sdpa and sdpa.extra_gib and t.extra_gib is not None
            else "-"
        )
        table.add_row(
            t.layer,
            t.path,
            ms(t.forward_ms),
            ms(t.forward_backward_ms),
            ms(t.extra_gib),
            speed,
            memory,
            t.note,
        )
    console.print(table)
    console.print(
        f"device: {_device_name(gpu)}; medians of {args.repeats} repeats after a warm-up"
        + ("" if gpu else "; CPU memory: peak of the tensors ops return (no scratch space)"),
        highlight=False,
    )
    return 0


def _describe_shape(shape) -> str:
    dtype = str(shape.dtype).removeprefix("torch.")
    return f"B={shape.batch} H={shape.heads} T={shape.seq_len} d={shape.head_dim} {dtype}"


def _bench_kernels(args: argparse.Namespace) -> int:
    from mta_lab.bench.kernels import KERNELS, bench_kernels
    from mta_lab.config import QKConvConfig
    from mta_lab.kernels import band_flash
    from mta_lab.train.device import training_device

    unknown = sorted(set(args.kernels) - set(KERNELS))
    if unknown:
        raise common.UsageError(f"KERNEL: unknown {', '.join(unknown)} (allowed: {', '.join(KERNELS)})")
    sizes = args.conv.split("x")
    if len(sizes) != 2 or not all(x.isdigit() and int(x) > 0 for x in sizes) or int(sizes[1]) % 2 == 0:
        raise common.UsageError(f"--conv: {args.conv!r} is not QxK with positive sizes and K odd (e.g. 6x11)")
    if not band_flash.available():
        raise common.UsageError("bench kernels needs Triton (it comes with CUDA builds of torch)")
    device = training_device()
    gpu = device.type == "cuda"
    if not gpu and not band_flash.interpreting():
        raise common.UsageError(
            "bench kernels needs a GPU, or TRITON_INTERPRET=1 on CPU (slow; only the default settings run)"
        )
    shape = _shape(args, gpu)
    console = common.console()
    with console.status("measuring ...") as status:
        timings = bench_kernels(
            args.kernels, shape, QKConvConfig(*map(int, sizes)), args.repeats, device, progress=status.update
        )

    def ms(value):
        return "-" if value is None else f"{value:.3f}"

    for kernel in args.kernels:
        rows = sorted(
            (t for t in timings if t.kernel == kernel),
            key=lambda t: (not t.correct, t.forward_backward_ms or float("inf")),
        )
        table = Table(
            "setting", "error", "fwd ms", "fwd+bwd ms", "vs default", "note",
            title=f"{kernel}, {_describe_shape(shape)}, conv {args.conv}", title_justify="left", box=None,
        )  # fmt: skip
        default = next(t for t in rows if t.default)
        for t in rows:
            ratio = (
                f"{t.forward_backward_ms / default.forward_backward_ms:.2f}x"
                if t.forward_backward_ms and default.forward_backward_ms
                else "-"
            )
            error = "-" if t.error is None else f"{t.error:.1e}" + ("" if t.correct else " WRONG")
            marker = " (default)" if t.default else ""
            table.add_row(
                t.setting + marker, error, ms(t.forward_ms), ms(t.forward_backward_ms), ratio, t.note
            )
        console.print(table)
        best = rows[0]
        if best.correct:
            console.print(f"fastest correct: {best.setting}", highlight=False)
        else:
            console.print(f"[red]no setting of {kernel} matched its definition[/red]")
    console.print(
        f"device: {_device_name(gpu)}; medians of {args.repeats} repeats after a warm-up; error: max |error| / "
        "max |definition| over the output and every input gradient (first batch element)",
        highlight=False,
    )
    return 0 if all(t.correct for t in timings if t.default) else 1
