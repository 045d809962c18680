"""``mta-lab import`` / ``export`` and ``train.init_from``: whole files written, or none.

An import writes two files beside each other: ``NAME.safetensors`` (mta-lab's parameter names) and
``NAME.yaml``, a preset whose ``model`` computes what the checkpoint does and whose ``train.init_from``
names the weights, so that ``mta-lab train NAME.yaml`` continues the pretrained model, and
``mta-lab train NAME.yaml model.mta.pre_qk_conv.query_kernel=3 ...`` continues it with MTA stages that
start at identity (step 0 computes what the checkpoint did).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mta_lab.config import ModelConfig, RunConfig, load_config
from mta_lab.config.model import MTA_STAGES
from mta_lab.data.errors import DataError
from mta_lab.hf.checkpoint import (
    check_finite,
    from_hf,
    hf_config,
    model_overrides,
    read_config,
    read_weights,
    same_shape,
    to_hf,
    unsupported_for_hf,
)


def import_model(directory: Path, out: Path) -> tuple[Path, Path]:
    """A Hugging Face model directory -> ``out.yaml`` (preset) and ``out.safetensors``; every check
    runs before anything is written."""
    from safetensors.torch import save_file

    hf = read_config(directory)
    overrides = model_overrides(hf)
    try:
        model = ModelConfig(**overrides)
    except ValueError as error:
        raise DataError(f"{directory / 'config.json'}: {error}") from None
    state = from_hf(read_weights(directory), model, directory)
    expected = _shapes(model)
    same_shape(expected, state, directory)
    absent = sorted(set(expected) - set(state))
    if absent:
        raise DataError(f"{directory}: the weights lack {absent[0]}")
    check_finite(state, directory)
    yaml_path, weights_path = out.with_suffix(".yaml"), out.with_suffix(".safetensors")
    tokenizer_path = out.with_name(out.name + ".tokenizer.json")
    tokenizer = _tokenizer_settings(directory, hf, tokenizer_path)
    data = {"seq_len": min(1024, model.max_seq_len), "tokenizer": tokenizer}
    preset = {"model": overrides, "train": {"init_from": str(weights_path.resolve())}, "data": data}
    load_config_text = OmegaConf.to_yaml(OmegaConf.create(preset))
    header = (
        f"# Imported from {directory.resolve()} ({hf['architectures'][0]}) by `mta-lab import` on "
        f"{time.strftime('%Y-%m-%d')}.\n# Its weights: {weights_path.name}; MTA stages configured on top "
        "start at identity.\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    # A copy beside the weights: the preset outlives the model directory.
    _atomic(tokenizer_path, lambda path: path.write_bytes((directory / "tokenizer.json").read_bytes()))
    _atomic(weights_path, lambda path: save_file({k: v.contiguous() for k, v in state.items()}, str(path)))
    _atomic(yaml_path, lambda path: path.write_text(header + load_config_text))
    load_config(str(yaml_path))  # the preset loads as written (a bug here, not bad input)
    return yaml_path, weights_path


def _tokenizer_settings(directory: Path, hf: dict, copy: Path) -> dict:
    """``data.tokenizer`` of the model's own tokenizer.json: its data must be tokenized as it was."""
    source = directory / "tokenizer.json"
    if not source.is_file():
        raise DataError(
            f"{source}: not found: a model continues on text tokenized its own way (tokenizer.json is "
            "saved with the model by transformers' save_pretrained)"
        )
    from mta_lab.data.tokenizers import PretrainedTokenizer

    bos, eos = hf.get("bos_token_id"), hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if bos is None or eos is None:
        raise DataError(
            f"{directory / 'config.json'}: bos_token_id and eos_token_id are needed with a tokenizer.json"
        )
    try:
        vocab = PretrainedTokenizer(source, bos, eos).vocab_size
    except Exception as error:  # the tokenizers library's own parse errors
        raise DataError(f"{source}: could not be read ({str(error)[:200]})") from None
    if vocab > hf["vocab_size"]:
        raise DataError(f"{source}: {vocab} ids, more than the model's vocab_size {hf['vocab_size']}")
    return {"kind": "pretrained", "path": str(copy.resolve()), "bos_id": bos, "eos_id": eos}


def export_run(run_dir: Path, out: Path) -> Path:
    """A finished (or checkpointed) run without MTA -> a Hugging Face Llama directory at ``out``."""
    from safetensors.torch import save_file

    config, state = run_weights(run_dir)
    why = unsupported_for_hf(config.model)
    if why:
        raise DataError(
            f"{run_dir}: cannot be written for Hugging Face: {why}; `--format safetensors` writes its "
            "weights for mta-lab (train.init_from)"
        )
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not empty; give a new directory")
    hf = to_hf(state, config.model)
    if config.model.tie_embeddings:
        hf.pop("lm_head.weight", None)
    staging = out.with_name(out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    save_file(hf, str(staging / "model.safetensors"), metadata={"format": "pt"})
    (staging / "config.json").write_text(json.dumps(hf_config(config.model), indent=2) + "\n")
    if out.exists():
        out.rmdir()
    os.replace(staging, out)
    return out


def export_weights(run_dir: Path, out: Path) -> Path:
    """A run's model weights as an mta-lab ``.safetensors`` (what ``train.init_from`` reads)."""
    from safetensors.torch import save_file

    _, state = run_weights(run_dir)
    path = out.with_suffix(".safetensors")
    _atomic(path, lambda p: save_file(state, str(p)))
    return path


def run_weights(run_dir: Path) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """A run's config and the model's weights from its last checkpoint."""
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not (run_dir / "config.yaml").is_file():
        raise DataError(f"{run_dir}: not a run directory (no config.yaml)")
    if not checkpoint.is_file():
        raise DataError(f"{checkpoint}: not found (the run saved no checkpoint yet)")
    config = load_config(str(run_dir / "config.yaml"))
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    except Exception as error:  # a torn or foreign file: pickle, zip and key errors alike
        raise DataError(f"{checkpoint}: could not be read ({type(error).__name__})") from None
    prefix = "model."  # the Lightning module's Transformer
    state = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
    return config, state


def check_init_from(config: RunConfig) -> None:
    """A run's ``train.init_from`` must load into its model: checked before anything is recorded."""
    path = config.train.init_from
    if path is None:
        return
    _matching(config.model, Path(path))


def load_init(model: torch.nn.Module, config: ModelConfig, path: Path) -> None:
    """Copy the file's weights into ``model`` (its other parameters, MTA stages, keep their init)."""
    state = _matching(config, path)
    with torch.no_grad():
        own = model.state_dict()
        for name, tensor in state.items():
            own[name].copy_(tensor.to(own[name].dtype))


def _matching(config: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = f"train.init_from: {path}"
    if not path.is_file():
        raise DataError(f"{where}: no such file")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise DataError(f"{where}: not a safetensors file ({error})") from None
    expected = _shapes(config)
    same_shape(expected, state, Path(where))
    # Only MTA stages may be missing: they start at identity. A missing projection would start random.
    missing = [n for n in expected if n not in state and not _is_mta(n)]
    if missing:
        raise DataError(
            f"{where}: lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    return state


def _is_mta(name: str) -> bool:
    return any(f".attention.{stage}." in name for stage in MTA_STAGES)


def _shapes(config: ModelConfig) -> dict[str, torch.Size]:
    from mta_lab.model import Transformer

    with torch.device("meta"):
        model = Transformer(config, device=torch.device("cpu"))
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def _atomic(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)
