"""Spec checklist 2: with random kernels and head mixing, future tokens never change past outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import every_stage_mta, randomize_

from mta_lab.config import (
    KernelInit,
    KeyPadding,
    ModelConfig,
    QKConvConfig,
)
from mta_lab.model import Transformer


def mta_model(padding: KeyPadding, key_kernel: int) -> Transformer:
    conv = QKConvConfig(query_kernel=3, key_kernel=key_kernel, key_padding=padding, init=KernelInit.normal)
    config = ModelConfig(
        vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, mta=every_stage_mta(conv)
    )
    torch.manual_seed(0)
    model = Transformer(config).eval()
    randomize_(model, seed=1, scale=0.3)  # random kernels and head mixing, far from identity
    return model


@pytest.mark.parametrize(
    ("padding", "key_kernel"), [(KeyPadding.both, 5), (KeyPadding.left, 4), (KeyPadding.right, 4)]
)
@pytest.mark.parametrize("cut", [1, 7, 15])
def test_future_tokens_leave_past_logits_bit_identical(padding, key_kernel, cut):
    model = mta_model(padding, key_kernel)
    generator = torch.Generator().manual_seed(cut)
    tokens = torch.randint(50, (2, 20), generator=generator)
    perturbed = tokens.clone()
    perturbed[:, cut:] = (
        tokens[:, cut:] + torch.randint(1, 50, tokens[:, cut:].shape, generator=generator)
    ) % 50
    with torch.no_grad():
        logits, logits_perturbed = model(tokens), model(perturbed)
    assert torch.equal(logits[:, :cut], logits_perturbed[:, :cut])
    # The perturbation does reach the positions it should: the check above is not vacuous.
    assert not torch.allclose(logits[:, cut:], logits_perturbed[:, cut:])
