"""The head's caches are never stale: each way the tensors they were built from can change, and each context they can
be built in (inference mode, autocast, offload hooks), against the literal reference or a freshly built model."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import VOCAB, build, randomize_heads
from peft import get_peft_model
from torch import nn

from peft_backattn import BackAttnConfig, BackAttnLayer, reference_logits

# Every mode the caches serve: raw heads cache C (and, linear, the collapsed map), softmax heads only N.
MODES = list(itertools.product(("raw", "softmax"), ("replace", "residual"), (1, 2)))


def mode_id(mode) -> str:
    weighting, combine, heads = mode
    return f"{weighting}-{combine}-h{heads}"


def attach(arch: str = "gpt2", mode=("raw", "residual", 1), seed: int = 0) -> tuple[nn.Module, BackAttnLayer]:
    weighting, combine, heads = mode
    config = BackAttnConfig(r=8, logit_weighting=weighting, combine=combine, num_heads=heads)
    model = get_peft_model(build(arch, seed=seed), config)
    randomize_heads(model, seed=seed)
    return model, next(m for m in model.modules() if isinstance(m, BackAttnLayer))


def hidden_states(layer: BackAttnLayer, positions: int = 5) -> torch.Tensor:
    return torch.randn(2, positions, layer.in_features, generator=torch.Generator().manual_seed(3))


def assert_matches_reference(layer: BackAttnLayer, hidden: torch.Tensor, got: torch.Tensor) -> None:
    head = layer.backattn_heads["default"]
    expected = reference_logits(hidden, layer.base_layer, layer.embedding_weight, head)
    torch.testing.assert_close(got.double(), expected.detach(), atol=2e-4, rtol=1e-4)


def evaluated(layer: BackAttnLayer, hidden: torch.Tensor) -> torch.Tensor:
    """An evaluation forward: no gradient, so a linear head takes its cached collapsed map."""
    with torch.no_grad():
        return layer(hidden)


def head_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


# -- 5. no positions -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_zero_positions_give_zero_positions(mode, grad):
    _, layer = attach(mode=mode)
    hidden = torch.randn(2, 0, layer.in_features)
    with torch.set_grad_enabled(grad):
        out = layer(hidden)
    assert out.shape == (2, 0, VOCAB) == layer.base_layer(hidden).shape
    assert out.dtype == hidden.dtype
    if grad:
        out.sum().backward()  # a batch with nothing to score still trains (with zero gradients)
