"""Config loading: presets as deltas, precedence, and one clear error per kind of bad input."""

from __future__ import annotations

import pytest

from mta_lab.config import (
    ConfigError,
    ConfigFieldError,
    HeadMixConfig,
    KernelInit,
    KeyPadding,
    LayerSelection,
    ModelConfig,
    MTAConfig,
    QKConvConfig,
    config_hash,
    load_config,
    preset_names,
    resolved_yaml,
)

PAPER_PRESETS = [
    f"paper-{size}-{variant}"
    for size in ("300m", "550m", "830m", "1b")
    for variant in ("baseline", "talking-heads", "mta")
]


def test_required_presets_exist():
    assert {"tiny", "small", "toy-block-baseline", "toy-block-mta", *PAPER_PRESETS} <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_round_trips(name, tmp_path):
    config = load_config(name)
    path = tmp_path / "resolved.yaml"
    path.write_text(resolved_yaml(config))
    assert load_config(str(path)) == config


def test_released_830m_mta_settings():
    """The released configs/830M_mta.yaml, knob by knob (spec 2.2)."""
    model = load_config("paper-830m-mta").model
    assert (model.dim, model.n_layers, model.n_heads, model.vocab_size) == (1536, 24, 16, 128256)
    assert model.rope_theta == 100_000 and model.tie_embeddings and model.ffn_hidden == 4096
    for conv in (model.mta.pre_qk_conv, model.mta.post_qk_conv):
        assert (conv.query_kernel, conv.key_kernel, conv.key_padding, conv.init) == (
            6,
            11,
            KeyPadding.both,
            KernelInit.identity,
        )
        assert conv.layers.layer_ids(24) == [2, 6, 10, 14, 18, 22]
    assert model.mta.pre_head_mix.size(16) == model.mta.post_head_mix.size(16) == 16
    assert model.mta.out_norm.norm and model.mta.out_norm.gate.value == "scalar"
    assert model.mta.out_norm.depth_scaling.value == "none"


def test_precedence_defaults_preset_file_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: tiny\nmodel:\n  dim: 128\n  n_layers: 6\n")
    config = load_config(str(path), ["model.n_layers=3"])
    assert config.model.dim == 128  # file over preset
    assert config.model.n_layers == 3  # override over file
    assert config.model.n_heads == 4  # preset over defaults
    assert config.model.norm_eps == ModelConfig().norm_eps  # defaults
    assert config.model.mta.pre_qk_conv.key_kernel == 11  # the preset's own base (paper-mta)


def test_base_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: tiny\nmodel: {dim: 96}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nmodel: {n_layers: 3}\n")
    config = load_config(str(tmp_path / "sub" / "b.yaml"))
    assert (config.model.dim, config.model.n_layers, config.model.n_heads) == (96, 3, 4)


def test_null_switches_a_mechanism_off():
    config = load_config("tiny", ["model.mta.post_qk_conv=null", "model.mta.pre_head_mix=null"])
    assert list(config.model.mta.mechanisms()) == ["pre_qk_conv", "post_head_mix", "out_norm"]
    assert load_config("tiny", ["model.mta=null"]).model.mta is None


def test_indices_replace_an_every_k_pattern():
    selection = load_config(
        "tiny", ["model.mta.pre_qk_conv.layers.indices=[0,3]"]
    ).model.mta.pre_qk_conv.layers
    assert (selection.every, selection.offset, selection.layer_ids(4)) == (1, 0, [0, 3])
    assert LayerSelection(every=4, offset=2).layer_ids(24) == [2, 6, 10, 14, 18, 22]
    assert LayerSelection().layer_ids(3) == [0, 1, 2]


# Each bad input: the error names the key and the allowed values, and is raised at load time.
BAD_OVERRIDES = {
    "a million layers (info would build them for ever)": (
        ["model.n_layers=1000000"],
        ["model.n_layers", "1000000 is more than 1024", "allowed: 1..1024"],
    ),
    "even key kernel with both padding": (
        ["model.mta.pre_qk_conv.key_kernel=4"],
        ["model.mta.pre_qk_conv.key_kernel", "4 is even", "allowed: odd values, or key_padding=left|right"],
    ),
    "head group not dividing n_heads": (
        ["model.mta.pre_head_mix.group_size=3"],
        ["model.mta.pre_head_mix.group_size", "n_heads=4", "allowed: 1, 2, 4"],
    ),
    "identity init with one-sided padding": (
        ["model.mta.post_qk_conv.key_padding=right"],
        ["model.mta.post_qk_conv.init", "key_padding=both", "zero|const|uniform|normal|diagonal"],
    ),
    "unknown key": (
        ["model.mta.pre_qk_conv.key_kernal=5"],
        [
            "model.mta.pre_qk_conv.key_kernal",
            "unknown key",
            "did you mean 'key_kernel'",
            "allowed: query_kernel",
        ],
    ),
    "wrong type": (["model.n_layers=four"], ["model.n_layers", "could not be converted to Integer"]),
    "bad enum": (
        ["model.mta.pre_qk_conv.key_padding=middle"],
        ["key_padding", "expected one of [both, left, right]"],
    ),
    "layer index out of range": (
        ["model.mta.pre_qk_conv.layers.indices=[1,4]"],
        ["model.mta.pre_qk_conv.layers.indices", "[4] out of range for n_layers=4", "allowed: 0..3"],
    ),
    "placement selecting nothing": (
        ["model.mta.out_norm.layers.offset=9"],
        ["model.mta.out_norm.layers", "selects none"],
    ),
    "n_heads not divisible by n_kv_heads": (["model.n_kv_heads=3"], ["model.n_kv_heads", "allowed: 1, 2, 4"]),
    "dim not divisible by n_heads": (["model.n_heads=5"], ["model.n_heads", "does not divide dim=64"]),
    "init_scale without a scaled init": (
        ["model.mta.pre_qk_conv.init_scale=0.1"],
        ["init_scale", "const|uniform|normal"],
    ),
    "depth scaling without norm": (
        ["model.mta.out_norm.norm=false", "model.mta.out_norm.depth_scaling=diff"],
        ["depth_scaling", "needs norm=true"],
    ),
    "dropout out of range": (["model.dropout=1.5"], ["model.dropout", "[0, 1)"]),
    "dropout of 1 (drops everything)": (["model.dropout=1.0"], ["model.dropout", "[0, 1)"]),
    "negative dropout": (["model.dropout=-0.1"], ["model.dropout", "[0, 1)"]),
    "not key=value": (["model.dim"], ["expected key=value"]),
}


@pytest.mark.parametrize("case", BAD_OVERRIDES)
def test_bad_overrides(case):
    overrides, fragments = BAD_OVERRIDES[case]
    with pytest.raises(ConfigError) as error:
        load_config("tiny", overrides)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"override '{overrides[-1]}'")
    for fragment in fragments:
        assert fragment in message


def test_error_names_the_file_that_set_the_bad_value(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("base: tiny\nmodel:\n  mta:\n    post_head_mix: {group_size: 8}\n")
    with pytest.raises(
        ConfigError, match=r"exp\.yaml: model\.mta\.post_head_mix\.group_size: 8 does not divide"
    ):
        load_config(str(path), ["model.dim=128"])


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("model:\n  dim: [1\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("base: tiny\ntrainer: {}\n", "trainer: unknown key; did you mean 'train'? allowed: model, data"),
        ("base: [tiny, 3]\n", "base: expected a preset name"),
        ("base: nope\n", "unknown preset 'nope'"),
    ],
)
def test_bad_files(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="bad.yaml|unknown preset") as error:
        load_config(str(path))
    assert fragment in str(error.value)


def test_base_cycle_and_missing_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        load_config("tinny")


def test_dataclasses_validate_when_built_in_python():
    with pytest.raises(ConfigFieldError, match="key_kernel: 4 is even"):
        QKConvConfig(key_kernel=4)
    with pytest.raises(ValueError, match="init: identity needs key_padding=both"):
        QKConvConfig(key_padding=KeyPadding.left)
    with pytest.raises(ValueError, match="mta.pre_head_mix.group_size: 3 does not divide n_heads=8"):
        ModelConfig(mta=MTAConfig(pre_head_mix=HeadMixConfig(group_size=3)))
    QKConvConfig(key_kernel=4, key_padding=KeyPadding.right, init=KernelInit.zero)  # valid


def test_how_a_run_computes_is_not_part_of_what_it_is():
    """The runtime section (kernels, tiles) gives the same numbers every way: not in the config hash."""
    tiny = config_hash(load_config("tiny"))
    how = ["runtime.attention_kernel=reference", "runtime.attention_tile_rows=7", "runtime.score_conv=torch"]
    assert config_hash(load_config("tiny", how)) == tiny
    assert config_hash(load_config("tiny", ["model.mta.pre_qk_conv.key_kernel=5"])) != tiny
    assert "attention_tile_rows: 7" in resolved_yaml(load_config("tiny", how))  # still recorded
    with pytest.raises(ConfigError, match="runtime.attention_tile_rows: 0 is not allowed"):
        load_config("tiny", ["runtime.attention_tile_rows=0"])


def test_an_execution_setting_under_model_points_to_runtime():
    with pytest.raises(
        ConfigError, match=r"model.attention_kernel: unknown key; it is runtime.attention_kernel"
    ):
        load_config("tiny", ["model.attention_kernel=fused"])
