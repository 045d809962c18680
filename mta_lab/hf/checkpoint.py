"""Hugging Face Llama-layout checkpoints <-> mta-lab's model.

The two networks are the same function once three things are carried over (each checked against
``transformers`` in float64 by tests/test_hf.py):

- **RoPE pairs.** Hugging Face rotates channel j with channel j + d/2 of a head (``rotate_half``);
  mta-lab rotates interleaved pairs (2i, 2i + 1), as the official MTA code does. Both give pair i the
  frequency theta^(-2i/d), so permuting each head's q and k rows (HF row i -> 2i, row i + d/2 -> 2i + 1)
  makes the rotations, and so the attention scores, identical. v, o and everything else map 1:1.
- **The FFN width** (``intermediate_size`` -> ``model.ffn_hidden_size``).
- **The RMSNorm epsilon** (``rms_norm_eps`` -> ``model.norm_eps``).

Supported: ``LlamaForCausalLM`` and ``MistralForCausalLM`` (the same layout) without biases, with
plain RoPE (no ``rope_scaling``) and, for Mistral, no sliding window. Anything else is refused in one
line naming the file and the setting (mta-lab's attention has no q/k/v biases, no q/k norms and no
sliding window, so Qwen2/Qwen3 or a windowed Mistral would not compute what they were trained to).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mta_lab.config import ModelConfig
from mta_lab.data.errors import DataError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
WEIGHTS_INDEX = "model.safetensors.index.json"


def _fail(path: Path, message: str) -> DataError:
    return DataError(f"{path}: {message}")


def read_config(directory: Path) -> dict:
    """``config.json`` of a supported model, checked; a DataError names what is not supported."""
    path = directory / "config.json"
    if not directory.is_dir():
        raise _fail(directory, "not a directory (give a Hugging Face model directory with config.json)")
    if not path.is_file():
        raise _fail(path, "not found: a Hugging Face model directory has config.json beside its weights")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _fail(path, f"not valid JSON ({error})") from None
    architectures = config.get("architectures") or [config.get("model_type", "?")]
    if architectures[0] not in ARCHITECTURES:
        raise _fail(
            path, f"architectures: {architectures[0]} is not supported (allowed: {', '.join(ARCHITECTURES)})"
        )
    unsupported = {
        "attention_bias": (config.get("attention_bias", False), "q/k/v/o biases"),
        "mlp_bias": (config.get("mlp_bias", False), "feed-forward biases"),
        "rope_scaling": (_scaled_rope(config), "scaled RoPE, only plain theta^(-2i/d)"),
        "sliding_window": (config.get("sliding_window"), "sliding-window attention"),
    }
    for key, (value, what) in unsupported.items():
        if value:
            raise _fail(path, f"{key}: {value!r} is not supported (mta-lab's attention has no {what})")
    if config.get("hidden_act", "silu") != "silu":
        raise _fail(path, f"hidden_act: {config['hidden_act']!r} is not supported (allowed: silu, SwiGLU)")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if head_dim * heads != config["hidden_size"]:
        raise _fail(path, f"head_dim: {head_dim} x {heads} heads != hidden_size {config['hidden_size']}")
    return config


def _scaled_rope(config: dict):
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return None if kind == "default" else scaling


def rope_theta(config: dict) -> float:
    parameters = config.get("rope_parameters") or {}
    return float(parameters.get("rope_theta", config.get("rope_theta", 10_000.0)))


def model_overrides(config: dict) -> dict:
    """The ``model`` section of mta-lab's config that computes what ``config`` describes."""
    return {
        "vocab_size": config["vocab_size"],
        "dim": config["hidden_size"],
        "n_layers": config["num_hidden_layers"],
        "n_heads": config["num_attention_heads"],
        "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "ffn_hidden_size": config["intermediate_size"],
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "rope_theta": rope_theta(config),
        "max_seq_len": config.get("max_position_embeddings", 2048),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "dropout": 0.0,
        "mta": None,
    }


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory's safetensors (one file, or shards with their index)."""
    from safetensors.torch import load_file

    index = directory / WEIGHTS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / shard for shard in shards]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise _fail(
            directory, "no *.safetensors weights (PyTorch .bin files are not read: save with safetensors)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise _fail(index, f"names the shard {file.name}, which is not there")
        tensors |= load_file(file)
    return tensors


def rope_permutation(head_dim: int) -> torch.Tensor:
    """mta-lab's row r of a head is Hugging Face's row ``permutation[r]``: pairs (2i, 2i+1) <- (i, i+d/2)."""
    half = head_dim // 2
    return torch.tensor([r // 2 + (half if r % 2 else 0) for r in range(head_dim)])


def _heads(weight: torch.Tensor, heads: int, order: torch.Tensor) -> torch.Tensor:
    head_dim = weight.shape[0] // heads
    return weight.view(heads, head_dim, -1)[:, order].reshape(weight.shape)


def from_hf(tensors: dict[str, torch.Tensor], model: ModelConfig, where: Path) -> dict[str, torch.Tensor]:
    """Hugging Face parameter names and layouts -> mta-lab's (``Transformer.state_dict`` names)."""
    order = rope_permutation(model.head_dim)
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}
    if not model.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "ffn.w1",
        "mlp.up_proj": "ffn.w3",
        "mlp.down_proj": "ffn.w2",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for layer in range(model.n_layers):
        for theirs, ours in per_layer.items():
            names[f"model.layers.{layer}.{theirs}.weight"] = f"layers.{layer}.{ours}.weight"
    missing = [name for name in names if name not in tensors]
    if missing:
        raise _fail(
            where,
            f"weights lack {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""),
        )
    state = {}
    for theirs, ours in names.items():
        weight = tensors[theirs]
        if ours.endswith("attention.wq.weight"):
            weight = _heads(weight, model.n_heads, order)
        elif ours.endswith("attention.wk.weight"):
            weight = _heads(weight, model.kv_heads, order)
        state[ours] = weight.contiguous()
    return state


def to_hf(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`from_hf` (for a model without MTA)."""
    inverse = torch.argsort(rope_permutation(model.head_dim))
    out = {}
    renames = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    per_layer = {
        "attention.wq": "self_attn.q_proj",
        "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj",
        "ffn.w1": "mlp.gate_proj",
        "ffn.w3": "mlp.up_proj",
        "ffn.w2": "mlp.down_proj",
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for name, weight in state.items():
        if name in renames:
            out[renames[name]] = weight.contiguous()
            continue
        parts = name.split(".")  # layers.<i>.<module>.weight
        layer, module = parts[1], ".".join(parts[2:-1])
        if ours := per_layer.get(module):
            if module == "attention.wq":
                weight = _heads(weight, model.n_heads, inverse)
            elif module == "attention.wk":
                weight = _heads(weight, model.kv_heads, inverse)
            out[f"model.layers.{layer}.{ours}.weight"] = weight.contiguous()
    return out


def hf_config(model: ModelConfig, dtype: str = "float32") -> dict:
    """``config.json`` of a LlamaForCausalLM that computes what ``model`` (without MTA) does."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.dim,
        "intermediate_size": model.ffn_hidden,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": model.tie_embeddings,
        "torch_dtype": dtype,
    }


def unsupported_for_hf(model: ModelConfig) -> str | None:
    """Why a model cannot be written as a Hugging Face Llama, or None."""
    if model.mta is not None:
        return "it has MTA stages, which no Hugging Face architecture computes"
    if model.prenorm_scaling.value != "none":
        return f"model.prenorm_scaling={model.prenorm_scaling.value} rescales its norms, which Llama does not"
    return None


def check_finite(state: dict[str, torch.Tensor], where: Path) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _fail(where, f"{name} holds NaN or infinite values")


def same_shape(ours: dict[str, torch.Size], theirs: dict[str, torch.Tensor], where: Path) -> None:
    """Every tensor of a weights file must be a parameter of the model, of the same shape."""
    for name, tensor in theirs.items():
        if name not in ours:
            raise _fail(where, f"{name} is not a parameter of this model (a different architecture?)")
        if tuple(tensor.shape) != tuple(ours[name]):
            raise _fail(where, f"{name} is {tuple(tensor.shape)}, the model's is {tuple(ours[name])}")
