"""The whole model: placement, parameter counts (paper Table 8), identity at the model level,
gradients and learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import every_stage_mta

from mta_lab.config import (
    MTA_STAGES,
    DepthScaling,
    GateKind,
    KernelInit,
    ModelConfig,
    QKConvConfig,
    load_config,
)
from mta_lab.model import Transformer, parameter_counts

# Spec 2.2 and paper Table 8 (830M); the others recomputed from the released configs.
PAPER_COUNTS = {
    "paper-300m-baseline": 388_277_248,
    "paper-300m-talking-heads": 388_277_248 + 2 * 20 * 16**2,
    "paper-300m-mta": 388_277_248 + 23_380,
    "paper-550m-baseline": 651_818_240,
    "paper-550m-talking-heads": 651_818_240 + 2 * 24 * 10**2,
    "paper-550m-mta": 651_818_240 + 18_888,
    "paper-830m-baseline": 876_553_728,
    "paper-830m-talking-heads": 876_566_016,
    "paper-830m-mta": 876_583_320,
    "paper-1b-baseline": 1_495_894_016,
    "paper-1b-talking-heads": 1_495_894_016 + 2 * 24 * 16**2,
    "paper-1b-mta": 1_495_894_016 + 31_128,
}


def meta_model(preset: str, *overrides: str) -> Transformer:
    config = load_config(preset, overrides).model
    with torch.device("meta"):
        return Transformer(config)


@pytest.mark.parametrize("preset", PAPER_COUNTS)
def test_paper_parameter_counts(preset):
    assert sum(parameter_counts(meta_model(preset)).values()) == PAPER_COUNTS[preset]
    assert sum(p.numel() for p in meta_model(preset).parameters()) == PAPER_COUNTS[preset]


def test_paper_mta_extra_parameters_match_the_paper_formula():
    """Paper Table 8: extra = 2 L M (c_q c_k / 4 + c_h) + L (2 d + 1) with c_h = M, KQ conv on 1/4 of layers."""
    counts = parameter_counts(meta_model("paper-830m-mta"))
    L, M, d = 24, 16, 96
    extra = sum(
        counts[k]
        for k in ("pre_qk_conv", "post_qk_conv", "pre_head_mix", "post_head_mix", "out_norm", "out_norm gate")
    )
    assert extra == 2 * L * M * (6 * 11 / 4 + M) + L * (2 * d + 1) == 876_583_320 - 876_553_728


def test_paper_mta_placement():
    """Spec 1.6: KQ convs in 0-based layers 2, 6, ..., 22; head mixing, norm and gate in all layers."""
    model = meta_model("paper-830m-mta")
    conv_layers = [p.layer_id for p in model.plans if p.mta.pre_qk_conv is not None]
    assert conv_layers == [2, 6, 10, 14, 18, 22]
    assert [p.layer_id for p in model.plans if p.mta.post_qk_conv is not None] == conv_layers
    assert all(p.mta.pre_head_mix and p.mta.post_head_mix and p.mta.out_norm for p in model.plans)
    assert all((block.attention.execution.path != "sdpa") for block in model.layers)
    assert model.layers[2].attention.pre_qk_conv.weight.shape == (16, 6, 11)
    assert model.layers[3].attention.pre_qk_conv is None

    model_300m = meta_model("paper-300m-mta")
    assert [p.layer_id for p in model_300m.plans if p.mta.pre_qk_conv] == [2, 6, 10, 14, 18]


def test_baselines_come_from_the_same_code_path():
    baseline = meta_model("paper-300m-baseline")
    assert all(
        p.mta is None and not (block.attention.execution.path != "sdpa")
        for p, block in zip(baseline.plans, baseline.layers, strict=True)
    )
    talking = meta_model("paper-300m-talking-heads")
    for plan in talking.plans:
        assert list(plan.mta.mechanisms()) == ["pre_head_mix", "post_head_mix"]
    toy = meta_model("toy-block-mta")
    assert all(list(p.mta.mechanisms()) == ["pre_qk_conv"] for p in toy.plans)
    assert toy.layers[0].attention.pre_qk_conv.weight.shape == (2, 2, 9)


def test_out_norm_alone_keeps_the_fast_path():
    # A dict override merges into the preset's block; null it first to replace it.
    model = meta_model("tiny", "model.mta=null", "model.mta.out_norm.gate=scalar")
    assert all(
        not (block.attention.execution.path != "sdpa") and block.attention.out_norm is not None
        for block in model.layers
    )


def test_explicit_and_every_k_placement():
    model = meta_model(
        "tiny", "model.mta.pre_qk_conv.layers.indices=[0,3]", "model.mta.post_head_mix.layers.every=2"
    )
    assert [p.layer_id for p in model.plans if p.mta.pre_qk_conv] == [0, 3]
    assert [p.layer_id for p in model.plans if p.mta.post_head_mix] == [0, 2]
    model = meta_model("tiny", "model.mta.out_norm.layers.every=3", "model.mta.out_norm.layers.offset=1")
    assert [p.layer_id for p in model.plans if p.mta.out_norm] == [1]


def every_stage_config(**model) -> ModelConfig:
    conv = QKConvConfig(query_kernel=3, key_kernel=5)
    mta = every_stage_mta(conv, gate=GateKind.elementwise)
    return ModelConfig(
        **{
            "vocab_size": 40,
            "dim": 32,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "multiple_of": 16,
            "mta": mta,
            **model,
        }
    )


def test_identity_init_model_equals_the_baseline_model():
    """The whole network: with every score-map stage at identity init, MTA reproduces the baseline."""
    mta_config = every_stage_config()
    mta_config.mta.out_norm = None
    baseline_config = every_stage_config(mta=None)
    torch.manual_seed(0)
    baseline = Transformer(baseline_config).double()
    mta = Transformer(mta_config).double()
    mta.load_state_dict(baseline.state_dict(), strict=False)
    tokens = torch.randint(40, (2, 17))
    torch.testing.assert_close(mta(tokens), baseline(tokens), rtol=0, atol=1e-11)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = Transformer(every_stage_config())
    tokens = torch.randint(40, (2, 12))
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    stages = {
        name.split(".")[3]
        for name, _ in model.named_parameters()
        if name.split(".")[3:4] and name.split(".")[3] in MTA_STAGES
    }
    assert stages == set(MTA_STAGES)  # every stage of the config has parameters, and they learn


def test_tiny_preset_learns():
    config = load_config("tiny").model
    torch.manual_seed(0)
    model = Transformer(config)
    tokens = torch.randint(config.vocab_size, (4, 65))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_tiny_and_small_sizes():
    assert sum(p.numel() for p in meta_model("tiny").parameters()) < 1_000_000
    assert 5_000_000 <= sum(p.numel() for p in meta_model("small").parameters()) <= 15_000_000


def test_sequence_longer_than_max_seq_len_is_refused():
    model = Transformer(load_config("tiny", ["model.max_seq_len=8", "data.seq_len=8"]).model)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_untied_output_and_kernel_inits_build():
    model = Transformer(every_stage_config(tie_embeddings=False))
    assert (
        model.output is not None and model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()
    )
    tied = Transformer(every_stage_config(tie_embeddings=True))
    assert tied.output is None
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in tied.parameters()) == 40 * 32
    for init in KernelInit:
        if init != KernelInit.identity:
            config = every_stage_config()
            config.mta.pre_qk_conv = QKConvConfig(query_kernel=2, key_kernel=3, init=init)
            assert torch.isfinite(Transformer(config)(torch.zeros(1, 4, dtype=torch.long))).all()


@pytest.mark.parametrize(
    ("scaling", "factors"),
    [
        # Hand values: inverse_sqrt is 1 / sqrt(layer + 1); diff is 0.2 + 0.6 exp(-0.3 layer) (spec 1.5).
        (DepthScaling.inverse_sqrt, [1.0, 0.7071068, 0.5773503]),
        (DepthScaling.diff, [0.8, 0.6444909, 0.5292870]),
    ],
)
def test_prenorm_scaling_scales_each_layer_by_its_own_depth(scaling, factors):
    model = Transformer(every_stage_config(n_layers=3, prenorm_scaling=scaling)).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    plain = x / x.pow(2).mean(-1, keepdim=True).add(model.config.norm_eps).sqrt()
    for block, factor in zip(model.layers, factors, strict=True):
        for norm in (block.attention_norm, block.ffn_norm):
            torch.testing.assert_close(norm(x), plain * factor, rtol=1e-6, atol=1e-9)
