"""Analytic FLOP counts against torch's own counter (torch.utils.flop_counter.FlopCounterMode) on the
reference path, which computes the full (query, key) map: there the counts must agree exactly, op by op
family. Where they differ, by design: the analytic count keeps only the causal half of the map, and
both leave elementwise work out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mta_lab.cli import main
from mta_lab.config import AttentionKernel, GateKind, RuntimeConfig, load_config
from mta_lab.model import Transformer, parameter_counts
from mta_lab.model.flops import forward_flops, training_flops_per_token

REFERENCE = RuntimeConfig(attention_kernel=AttentionKernel.reference)


def counted(model: Transformer, tokens: torch.Tensor, backward: bool = False) -> dict[str, int]:
    """What FlopCounterMode counts for one forward (and backward) pass, by aten op."""
    with FlopCounterMode(display=False) as counter:
        logits = model(tokens[:, :-1])
        if backward:
            F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return {str(op): count for op, count in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # tiny: head mixing in every layer, convolutions in layer 2, norm and scalar gate
        ["model.n_kv_heads=2", "model.mta.out_norm.gate=elementwise", "model.mta.pre_head_mix.group_size=2"],
        ["model.tie_embeddings=false", "model.mta.post_qk_conv=null"],
    ],
    ids=["tiny", "gqa-groups-elementwise-gate", "untied-pre-conv-only"],
)
def test_forward_counts_equal_torch_counter_on_the_full_score_map(overrides):
    config = load_config("tiny", overrides).model
    seq_len, batch = 24, 2
    model = Transformer(config, REFERENCE, torch.device("cpu"))
    ops = counted(model, torch.randint(0, config.vocab_size, (batch, seq_len + 1)))
    ours = forward_flops(config, seq_len, causal=False)
    convolutions = ours.get("pre_qk_conv", 0) + ours.get("post_qk_conv", 0)
    assert ops.get("aten.convolution", 0) == batch * convolutions
    assert sum(ops.values()) == batch * sum(ours.values())


def test_plain_attention_counts_and_the_causal_half():
    config = load_config("tiny", ["model.mta=null"]).model
    model = Transformer(config, REFERENCE, torch.device("cpu"))
    ops = counted(model, torch.randint(0, config.vocab_size, (1, 9)))
    ours = forward_flops(config, 8, causal=False)
    # torch's counter sees no FLOPs in CPU's fused SDPA kernel: everything else is equal.
    assert sum(ops.values()) == sum(ours.values()) - ours["attention scores and values"]
    # By hand, at T = 4 with 4 heads of 16: q.k and probs.v, 2 FLOPs per multiply-add, 10 kept scores
    # (1 + 2 + 3 + 4) per head and layer, over 4 layers.
    assert forward_flops(config, 4)["attention scores and values"] == 4 * 2 * 2 * 4 * 16 * 10
    assert forward_flops(config, 4, causal=False)["attention scores and values"] == 4 * 2 * 2 * 4 * 16 * 16


def test_mta_stages_by_hand():
    """tiny at T = 4: per layer 4 heads; 6x11 convolutions in layer 2 only; all-head mixing (c_h = 4)
    before and after softmax in all 4 layers; a scalar gate on head_dim 16."""
    flops = forward_flops(load_config("tiny").model, 4)
    assert flops["pre_qk_conv"] == flops["post_qk_conv"] == 2 * 6 * 11 * 4 * 10
    assert flops["pre_head_mix"] == flops["post_head_mix"] == 4 * 2 * 4 * 4 * 10
    assert flops["out_norm gate"] == 4 * 2 * 4 * 4 * 16 * 1
    gateless = load_config("tiny", [f"model.mta.out_norm.gate={GateKind.none.value}"]).model
    assert "out_norm gate" not in forward_flops(gateless, 4)


def test_training_is_three_forwards_as_the_counter_sees_matmuls():
    """Backward: two products per product (both operands' gradients). Checked on the matmuls; torch's
    counter over-counts a grouped convolution's input gradient (by its groups: the heads), so the
    convolutions are left out of this comparison."""
    config = load_config("tiny", ["model.mta.pre_qk_conv=null", "model.mta.post_qk_conv=null"]).model
    model = Transformer(config, REFERENCE, torch.device("cpu"))
    tokens = torch.randint(0, config.vocab_size, (2, 17))
    forward, both = counted(model, tokens), counted(model, tokens, backward=True)
    assert sum(both.values()) == 3 * sum(forward.values())
    per_token = training_flops_per_token(config, 16)
    assert sum(per_token.values()) * 16 == 3 * sum(forward_flops(config, 16).values())


def test_the_weights_cost_six_flops_per_parameter_and_token():
    """Kaplan et al.'s 6N: each weight is used once per token, a multiply-add forward and two backward."""
    config = load_config("tiny", ["model.mta=null"]).model
    with torch.device("meta"):
        model = Transformer(config)
    counts = parameter_counts(model)
    matrices = counts["attention projections"] + counts["feed-forward"] + config.vocab_size * config.dim
    per_token = training_flops_per_token(config, 64)
    assert per_token["attention projections"] + per_token["feed-forward"] + per_token[
        "output projection"
    ] == (6 * matrices)


def test_info_prints_the_flops_per_component(capsys):
    assert main(["info", "tiny"]) == 0
    out = capsys.readouterr().out
    total = sum(training_flops_per_token(load_config("tiny").model, 128).values())
    assert "Training FLOPs (forward + backward) at seq_len 128" in out and f"{total:,.0f}" in out
