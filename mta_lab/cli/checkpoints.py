"""Checkpoint commands: ``import`` (a Hugging Face model directory -> preset and weights) and
``export`` (a run -> a Hugging Face directory, or mta-lab weights)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mta_lab.cli import common


def register(commands) -> None:
    importing = commands.add_parser(
        "import",
        help="a local Hugging Face Llama/Mistral directory -> an mta-lab preset and weights",
        description="Read a Hugging Face model directory (config.json and safetensors, sharded or not) of "
        "the Llama layout (LlamaForCausalLM, MistralForCausalLM without a sliding window) and write "
        "OUT.yaml (a preset whose train.init_from names the weights) and OUT.safetensors. Nothing is "
        "downloaded. MTA configured on top starts at identity: `mta-lab train OUT.yaml "
        "model.mta.pre_qk_conv.query_kernel=3 ...` continues the model with MTA.",
    )
    importing.add_argument("directory", type=Path, metavar="DIR", help="the model directory")
    importing.add_argument(
        "--out", type=Path, required=True, metavar="NAME", help="writes NAME.yaml, NAME.safetensors"
    )
    importing.set_defaults(run=_import)

    export = commands.add_parser(
        "export",
        help="a run's weights as a Hugging Face directory (no MTA) or as mta-lab safetensors",
        description="Write a run's last checkpoint as a Hugging Face LlamaForCausalLM directory "
        "(--format hf; models without MTA, which transformers then loads with the same logits) or as "
        "mta-lab's own weights file (--format safetensors, for train.init_from; any model).",
    )
    export.add_argument("run_dir", type=Path, metavar="RUN", help="a run directory (runs/<run id>)")
    export.add_argument("--format", choices=["hf", "safetensors"], default="hf", help="default: hf")
    export.add_argument("--out", type=Path, required=True, help="a new directory (hf) or file name")
    export.set_defaults(run=_export)


def _import(args: argparse.Namespace) -> int:
    from mta_lab.hf.convert import import_model

    preset, weights = import_model(args.directory, args.out)
    console = common.console()
    console.print(f"preset:  {preset}\nweights: {weights}", highlight=False)
    console.print(
        f"continue it: mta-lab train {preset}   (add MTA: model.mta.pre_qk_conv.query_kernel=...)",
        highlight=False,
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from mta_lab.hf.convert import export_run, export_weights

    written = (
        export_run(args.run_dir, args.out) if args.format == "hf" else export_weights(args.run_dir, args.out)
    )
    common.console().print(f"written: {written}", highlight=False)
    return 0
