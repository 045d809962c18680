"""The decoder-only language model (Llama style, as in the paper's App. D)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mta_lab.config import ModelConfig, RuntimeConfig
from mta_lab.model.attention import Attention
from mta_lab.model.execution import LayerExecution, plan_execution
from mta_lab.model.init import init_weights_
from mta_lab.model.layers import RMSNorm, SwiGLU, rope_tables
from mta_lab.model.plan import LayerPlan, plan_layers


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, config: ModelConfig, plan: LayerPlan, execution: LayerExecution):
        super().__init__()
        self.layer_id = plan.layer_id
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, scale=plan.prenorm_scale)
        self.attention = Attention(config, plan, execution)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, scale=plan.prenorm_scale)
        self.ffn = SwiGLU(config.dim, config.ffn_hidden)

    def forward(self, x_btd: torch.Tensor, cos_tf: torch.Tensor, sin_tf: torch.Tensor) -> torch.Tensor:
        h_btd = x_btd + self.attention(self.attention_norm(x_btd), cos_tf, sin_tf)
        return h_btd + self.ffn(self.ffn_norm(h_btd))


class Transformer(nn.Module):
    """Token ids (b, t) -> next-token logits (b, t, vocab).

    Each layer's execution path is chosen here, for ``device`` (default: torch's default device), from
    ``runtime``; a model moved to another kind of device afterwards should be built for it instead.
    Build on the meta device to inspect a large model without allocating it:
    ``with torch.device("meta"): Transformer(config)``.
    """

    def __init__(
        self, config: ModelConfig, runtime: RuntimeConfig | None = None, device: torch.device | None = None
    ):
        super().__init__()
        self.config = config
        self.plans = plan_layers(config)
        self.execution = plan_execution(
            config, runtime or RuntimeConfig(), device or torch.get_default_device()
        )
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(
            Block(config, plan, execution) for plan, execution in zip(self.plans, self.execution, strict=True)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        init_weights_(self)

    def forward(self, tokens_bt: torch.Tensor) -> torch.Tensor:
        seq_len = tokens_bt.shape[1]
        if seq_len > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds model.max_seq_len={self.config.max_seq_len}; "
                "raise model.max_seq_len or shorten the sequences"
            )
        cos_tf, sin_tf = rope_tables(seq_len, self.config.head_dim, self.config.rope_theta, tokens_bt.device)
        h_btd = self.tok_embeddings(tokens_bt)
        for block in self.layers:
            h_btd = block(h_btd, cos_tf, sin_tf)
        h_btd = self.norm(h_btd)
        if self.output is None:
            return F.linear(h_btd, self.tok_embeddings.weight)
        return self.output(h_btd)
