"""Model commands: ``presets``, ``info`` (resolved config, parameters, layer plan), ``check``."""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import TYPE_CHECKING

from rich.table import Table

from mta_lab.cli import common
from mta_lab.config import MTA_STAGES, preset_names, resolved_yaml
from mta_lab.config.loading import preset_description

if TYPE_CHECKING:
    from mta_lab.model import LayerPlan


def register(commands) -> None:
    info = commands.add_parser(
        "info",
        help="print a resolved config and its parameter counts",
        description="Print the resolved config (YAML), the parameter count per component and what each "
        "layer runs. The model is built on the meta device: nothing is allocated.",
    )
    common.add_config_arguments(info)
    info.set_defaults(run=_info)

    check = commands.add_parser(
        "check",
        help="run a few training steps of a preset on random tokens",
        description="Build the model, fit one random batch for a few AdamW steps on CPU (or GPU), and "
        "report the loss and speed: a quick proof that a config builds, trains and learns.",
    )
    common.add_config_arguments(check)
    check.add_argument("--steps", type=common.positive_int, default=10, help="optimizer steps (default 10)")
    check.add_argument(
        "--batch-size", type=common.positive_int, default=4, help="sequences per step (default 4)"
    )
    check.add_argument(
        "--seq-len", type=common.positive_int, default=128, help="tokens per sequence (default 128)"
    )
    check.add_argument("--seed", type=int, default=0, help="seed for the weights and tokens (default 0)")
    check.set_defaults(run=_check)

    presets = commands.add_parser("presets", help="list the named presets")
    presets.set_defaults(run=_presets)


def _presets(args: argparse.Namespace) -> int:
    table = Table("preset", "what it is", box=None)
    for name in preset_names():
        table.add_row(name, preset_description(name))
    common.console().print(table)
    return 0


def _info(args: argparse.Namespace) -> int:
    import torch

    from mta_lab.model import Transformer, parameter_counts

    config = common.load(args)
    with torch.device("meta"):
        model = Transformer(config.model)
    console = common.console()
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
    console.print(_flops_table(config))
    console.print(_layer_table(model.plans))
    return 0


def _flops_table(config) -> Table:
    """Training FLOPs (forward + backward) per token at the configured sequence length, and per step."""
    from mta_lab.model.flops import training_flops_per_token

    seq_len, tokens_per_step = config.data.seq_len, config.train.tokens_per_step(config.data.seq_len)
    per_token = training_flops_per_token(config.model, seq_len)
    total = sum(per_token.values())
    table = Table(
        "component",
        "FLOPs per token",
        "share",
        f"per step ({tokens_per_step:,} tokens)",
        title=f"Training FLOPs (forward + backward) at seq_len {seq_len}",
        title_justify="left",
        box=None,
    )
    for component, flops in per_token.items():
        table.add_row(component, f"{flops:,.0f}", f"{flops / total:.1%}", f"{flops * tokens_per_step:.3g}")
    table.add_row("total", f"{total:,.0f}", "100%", f"{total * tokens_per_step:.3g}", style="bold")
    table.caption = (
        "matmul-like work only (norms, softmax and other elementwise work left out); causal scores"
    )
    return table


def _layer_table(plans: list[LayerPlan]) -> Table:
    """One row per distinct layer plan, with the layers that share it."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for plan in plans:
        mechanisms = plan.mta.mechanisms() if plan.mta else {}
        path = "score map" if plan.uses_score_map else "sdpa"
        row = (path, *(mechanisms[s].describe() if s in mechanisms else "-" for s in MTA_STAGES))
        groups.setdefault(row, []).append(plan.layer_id)
    headers = [stage.replace("_qk_", " ").replace("_head_", " ").replace("_", " ") for stage in MTA_STAGES]
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

    config = common.load(args)
    if args.seq_len > config.model.max_seq_len:
        raise common.UsageError(
            f"--seq-len {args.seq_len} exceeds model.max_seq_len={config.model.max_seq_len}"
        )
    device = training_device()
    torch.manual_seed(args.seed)
    model = Transformer(config.model, config.runtime, device).to(device)
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
