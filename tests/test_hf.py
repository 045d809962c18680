"""Pretrained checkpoints: small random Hugging Face models built in code (no download), saved,
imported, and held to transformers' own forward in float64; MTA at identity on top changes nothing;
export back gives transformers the same logits; bad directories and weights are one line each.

Tolerance: 1e-6 of the logits' largest magnitude, in float64. transformers keeps RoPE's inverse
frequencies in a float32 buffer even in a float64 model, mta-lab computes them in float64: the angles
differ in the 7th digit, and the logits by 1.2e-7 (measured). A real mismatch is far larger: RMSNorm's
eps left at mta-lab's 1e-5 instead of the model's 1e-6 moves them by 1.4e-2, unpermuted RoPE rows by
more (tested below)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from mta_lab.cli import main
from mta_lab.config import load_config, resolved_yaml
from mta_lab.hf.convert import export_run, import_model, load_init
from mta_lab.model import Transformer

TOLERANCE = 1e-6


def hf_model(family: str, tmp_path, *, tied: bool = False, kv_heads: int = 2, seed: int = 0):
    """A random 2-layer model of ``family``, saved with safetensors; its directory and the model."""
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                  rms_norm_eps=1e-6, tie_word_embeddings=tied)  # fmt: skip
    if family == "llama":
        config = transformers.LlamaConfig(**common, rope_theta=50_000.0)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.MistralConfig(**common, rope_theta=50_000.0, sliding_window=None)
        cls = transformers.MistralForCausalLM
    torch.manual_seed(seed)
    model = cls(config).to(torch.float64).eval()
    with torch.no_grad():  # norms away from 1, so that a wrong eps or a missed norm shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
    directory = tmp_path / f"{family}-{'tied' if tied else 'untied'}-{kv_heads}"
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(directory)
    return directory, model


def ours(preset, overrides=()) -> Transformer:
    config = load_config(str(preset), list(overrides))
    model = Transformer(config.model).to(torch.float64).eval()
    load_init(model, config.model, Path(config.train.init_from))
    return model


TOKENS = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
IDENTITY_MTA = [
    "model.mta.pre_qk_conv.query_kernel=3", "model.mta.pre_qk_conv.key_kernel=5",
    "model.mta.pre_head_mix.group_size=2", "model.mta.post_qk_conv.query_kernel=2",
    "model.mta.post_qk_conv.key_kernel=3", "model.mta.post_head_mix.group_size=4",
]  # fmt: skip


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= TOLERANCE * float(b.abs().max())


@pytest.mark.parametrize(
    ("family", "tied", "kv_heads"), [("llama", False, 2), ("llama", True, 4), ("mistral", False, 1)]
)
def test_imported_models_compute_what_transformers_computes(tmp_path, family, tied, kv_heads):
    directory, reference = hf_model(family, tmp_path, tied=tied, kv_heads=kv_heads)
    preset, weights = import_model(directory, tmp_path / "imported")
    with torch.no_grad():
        expected = reference(TOKENS).logits
        assert close(ours(preset)(TOKENS), expected)
        # MTA on top, every score-map stage at its identity init: the same function.
        assert close(ours(preset, IDENTITY_MTA)(TOKENS), expected)


def test_a_wrong_rope_pairing_would_be_caught(tmp_path, monkeypatch):
    from mta_lab.hf import checkpoint

    directory, reference = hf_model("llama", tmp_path)
    monkeypatch.setattr(checkpoint, "rope_permutation", lambda d: torch.arange(d))  # HF's order, unmapped
    preset, _ = import_model(directory, tmp_path / "unpermuted")
    with torch.no_grad():
        assert not close(ours(preset)(TOKENS), reference(TOKENS).logits)


@pytest.mark.parametrize("tied", [False, True])
def test_an_exported_run_loads_in_transformers_with_the_same_logits(tmp_path, tied):
    directory, reference = hf_model("llama", tmp_path, tied=tied)
    preset, _ = import_model(directory, tmp_path / "imported")
    config = load_config(str(preset))
    model = ours(preset)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(
        __import__("mta_lab.config", fromlist=["resolved_yaml"]).resolved_yaml(config)
    )
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
        run / "checkpoints" / "last.ckpt",
    )
    out = export_run(run, tmp_path / "exported")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    with torch.no_grad():
        assert close(loaded(TOKENS).logits, reference(TOKENS).logits)


def test_mta_runs_are_not_exported_for_hugging_face(tmp_path, capsys):
    directory, _ = hf_model("llama", tmp_path)
    preset, _ = import_model(directory, tmp_path / "imported")
    config = load_config(str(preset), IDENTITY_MTA)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(resolved_yaml(config))
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    capsys.readouterr()  # transformers' own progress bar while saving
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "it has MTA stages" in err and "--format safetensors" in err
    assert not (tmp_path / "hf").exists()


def break_dir(directory, what: str) -> None:
    config = json.loads((directory / "config.json").read_text())
    if what == "no config":
        (directory / "config.json").unlink()
    elif what == "no weights":
        (directory / "model.safetensors").unlink()
    elif what == "no tokenizer":
        (directory / "tokenizer.json").unlink()
    elif what == "small vocabulary":
        config["vocab_size"] = 200  # the tokenizer has 290 ids
        config["architectures"] = ["LlamaForCausalLM"]
    elif what == "qwen":
        config["architectures"] = ["Qwen2ForCausalLM"]
    elif what == "rope scaling":
        config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
        config.pop("rope_parameters", None)
    elif what == "bias":
        config["attention_bias"] = True
    if what in ("qwen", "rope scaling", "bias", "small vocabulary"):
        (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("no config", "config.json: not found"),
        ("no weights", "no *.safetensors weights"),
        ("no tokenizer", "tokenizer.json: not found: a model continues on text tokenized its own way"),
        ("small vocabulary", "tok_embeddings.weight is (300, 64), the model's is (200, 64)"),
        ("qwen", "architectures: Qwen2ForCausalLM is not supported (allowed: LlamaForCausalLM"),
        ("rope scaling", "rope_scaling: {'rope_type': 'llama3', 'factor': 8.0} is not supported"),
        ("bias", "attention_bias: True is not supported (mta-lab's attention has no q/k/v/o biases)"),
    ],
)
def test_unsupported_or_broken_directories_are_one_line_and_write_nothing(tmp_path, capsys, what, message):
    directory, _ = hf_model("llama", tmp_path)
    break_dir(directory, what)
    capsys.readouterr()
    assert main(["import", str(directory), "--out", str(tmp_path / "out" / "imported")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_init_from_weights_that_do_not_fit_stops_the_run_before_it_is_recorded(tmp_path, capsys):
    directory, _ = hf_model("llama", tmp_path)
    preset, _ = import_model(directory, tmp_path / "imported")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    capsys.readouterr()
    code = main(
        ["train", str(preset), "model.dim=128", "--tracking-uri", uri, "--runs-dir", str(tmp_path / "runs")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"mta-lab: error: train.init_from: {tmp_path / 'imported.safetensors'}: layers.")
    assert re.search(r"\.weight is \(\d+, 64\), the model's is \(\d+, 128\)", err), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def save_tokenizer(directory) -> tuple[int, int]:
    """A small byte-level BPE saved as the model's tokenizer.json (trained here: nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tokenizer.train_from_iterator(["to be or not to be, that is the question"] * 50, trainer=trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = json.loads((directory / "config.json").read_text())
    config |= {"bos_token_id": tokenizer.token_to_id("<s>"), "eos_token_id": tokenizer.token_to_id("</s>")}
    (directory / "config.json").write_text(json.dumps(config))
    return config["bos_token_id"], config["eos_token_id"]


def test_training_from_an_import_starts_where_the_model_was_with_or_without_mta(tmp_path, capsys):
    """The model's own tokenizer tokenizes the data; step 0 is evaluated; MTA at identity on top
    gives the same validation loss there, and both runs go on to train."""
    directory, _ = hf_model("llama", tmp_path)
    bos, eos = (
        json.loads((directory / "config.json").read_text())[key] for key in ("bos_token_id", "eos_token_id")
    )
    preset, _ = import_model(directory, tmp_path / "imported")
    tokenizer = load_config(str(preset)).data.tokenizer
    assert (tokenizer.kind.value, tokenizer.bos_id, tokenizer.eos_id) == ("pretrained", bos, eos)
    assert (tmp_path / "imported.tokenizer.json").is_file()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    quick = ["train.steps=3", "train.batch_size=2", "data.seq_len=32", "eval.batches=1", "eval.every=null",
             "--tracking-uri", uri, "--runs-dir", str(tmp_path / "runs")]  # fmt: skip
    assert main(["train", str(preset), *quick]) == 0
    assert main(["train", str(preset), *IDENTITY_MTA, *quick]) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    at_start = [{m.step: m.value for m in client.get_metric_history(r.info.run_id, "val/loss")} for r in runs]
    assert len(at_start) == 2 and all(set(history) == {0, 3} for history in at_start)
    assert at_start[0][0] == pytest.approx(at_start[1][0], rel=1e-6)  # float32 training: same start
    assert all(history[3] < history[0] for history in at_start)  # and both learn from there


def test_a_pretrained_tokenizer_counts_each_tokens_own_bytes(tmp_path):
    """Bits per byte need the bytes behind each id: their sum over an encoding is the text's UTF-8
    length, for a byte-level BPE and for a SentencePiece-style one (which adds the leading space)."""
    from tokenizers import SentencePieceBPETokenizer

    from mta_lab.data.tokenizers import PretrainedTokenizer

    text = "naïve café: to be or not to be"
    directory, _ = hf_model("llama", tmp_path)
    byte_level = PretrainedTokenizer(directory / "tokenizer.json", 0, 1)
    assert int(byte_level.token_bytes[byte_level.encode(text)].sum()) == len(text.encode())

    piece = SentencePieceBPETokenizer()
    piece.train_from_iterator(
        [text] * 20, vocab_size=120, special_tokens=["<s>", "</s>"], show_progress=False
    )
    piece.save(str(tmp_path / "piece.json"))
    spm = PretrainedTokenizer(tmp_path / "piece.json", 0, 1)
    assert (
        int(spm.token_bytes[spm.encode(text)].sum()) == len(text.encode()) + 1
    )  # "\u2581" before the first word
    assert spm.token_bytes[0] == spm.token_bytes[1] == 0  # specials
