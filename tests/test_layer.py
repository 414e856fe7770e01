"""The head's fast paths against the literal five-step reference (peft_backattn.reference)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import build, randomize_heads
from peft import get_peft_model
from torch import nn

from peft_backattn import BackAttnConfig, BackAttnLayer, reference_logits
from peft_backattn.head import BackAttnHead

MODES = list(itertools.product(("raw", "softmax"), ("replace", "residual"), (1, 3), (None, "gelu")))


def mode_id(mode) -> str:
    weighting, combine, heads, activation = mode
    return f"{weighting}-{combine}-h{heads}-{activation or 'linear'}"


def attach(arch: str, seed: int = 0, **config_kwargs) -> tuple[nn.Module, BackAttnLayer]:
    config_kwargs.setdefault("r", 8)
    peft_model = get_peft_model(build(arch), BackAttnConfig(**config_kwargs))
    randomize_heads(peft_model, seed=seed)
    layer = next(m for m in peft_model.modules() if isinstance(m, BackAttnLayer))
    return peft_model, layer


def reference_for(layer: BackAttnLayer, hidden: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    return reference_logits(hidden, layer.base_layer, layer.embedding_weight, layer.backattn_heads[adapter])


def hidden_states(layer: BackAttnLayer, shape=(2, 5), seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, layer.in_features, generator=generator)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_every_mode_matches_the_reference(arch, mode):
    weighting, combine, heads, activation = mode
    peft_model, layer = attach(
        arch, logit_weighting=weighting, combine=combine, num_heads=heads, query_activation=activation
    )
    hidden = hidden_states(layer)
    expected = reference_for(layer, hidden)
    with torch.no_grad():  # evaluation: the collapsed path where the head is linear
        evaluated = layer(hidden)
    trained = layer(hidden)  # grad enabled, head trainable: the step-by-step path
    assert evaluated.shape == (2, 5, layer.out_features)
    torch.testing.assert_close(evaluated.double(), expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(trained.double(), expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_gradients_match_the_reference(mode):
    weighting, combine, heads, activation = mode
    _, layer = attach(
        "gpt2",
        logit_weighting=weighting,
        combine=combine,
        num_heads=heads,
        query_activation=activation,
        chunk_size=4,  # several chunks, and for mixtures the recomputed (checkpointed) path
    )
    head = layer.backattn_heads["default"]
    hidden = hidden_states(layer, shape=(2, 5))
    probe = torch.randn(2, 5, layer.out_features, generator=torch.Generator().manual_seed(5))

    (layer(hidden) * probe).sum().backward()
    fast = {name: p.grad.clone() for name, p in head.named_parameters()}
    head.zero_grad()
    (reference_for(layer, hidden) * probe.double()).sum().backward()
    for name, param in head.named_parameters():
        torch.testing.assert_close(fast[name].double(), param.grad.double(), atol=2e-4, rtol=2e-3, msg=name)


@pytest.mark.parametrize("mode", [("raw", "residual", 1, None), ("softmax", "replace", 3, "tanh")], ids=mode_id)
def test_chunking_does_not_change_the_result(mode):
    weighting, combine, heads, activation = mode
    kwargs = dict(logit_weighting=weighting, combine=combine, num_heads=heads, query_activation=activation)
    _, whole = attach("llama", chunk_size=1000, **kwargs)
    _, chunked = attach("llama", chunk_size=3, **kwargs)
    hidden = hidden_states(whole, shape=(3, 7))
    torch.testing.assert_close(chunked(hidden), whole(hidden), atol=1e-5, rtol=1e-5)


def test_untrained_residual_head_reproduces_the_base_logits_exactly(arch):
    peft_model = get_peft_model(build(arch), BackAttnConfig(r=8))
    layer = next(m for m in peft_model.modules() if isinstance(m, BackAttnLayer))
    hidden = hidden_states(layer)
    base = layer.base_layer(hidden)
    with torch.no_grad():
        assert torch.equal(layer(hidden), base)
    assert torch.equal(layer(hidden), base)


def test_untrained_residual_mixture_reproduces_the_base_logits():
    peft_model = get_peft_model(build("gpt2"), BackAttnConfig(r=8, num_heads=4, logit_weighting="raw"))
    layer = next(m for m in peft_model.modules() if isinstance(m, BackAttnLayer))
    hidden = hidden_states(layer)
    torch.testing.assert_close(layer(hidden), layer.base_layer(hidden), atol=1e-5, rtol=1e-5)


def test_raw_replace_head_skips_the_base_output_product():
    _, layer = attach("gpt2", logit_weighting="raw", combine="replace")
    calls = []
    layer.base_layer.register_forward_hook(lambda *args: calls.append(1))
    layer(hidden_states(layer))
    assert calls == []


def test_output_layer_bias_enters_the_raw_head():
    model = build("llama")
    old = model.lm_head
    model.lm_head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(old.weight)
        model.lm_head.bias.normal_(std=2.0)
    peft_model = get_peft_model(model, BackAttnConfig(r=8, logit_weighting="raw", combine="replace"))
    randomize_heads(peft_model)
    layer = peft_model.base_model.model.lm_head
    hidden = hidden_states(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(hidden).double(), reference_for(layer, hidden), atol=2e-4, rtol=1e-4)


def test_cached_collapse_is_rebuilt_after_an_optimizer_step():
    _, layer = attach("gpt2", logit_weighting="raw", combine="residual")
    hidden = hidden_states(layer)
    with torch.no_grad():
        before = layer(hidden)  # builds the cache
    optimizer = torch.optim.SGD(layer.backattn_heads.parameters(), lr=0.5)
    layer(hidden).pow(2).mean().backward()
    optimizer.step()
    with torch.no_grad():
        after = layer(hidden)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after.double(), reference_for(layer, hidden), atol=2e-4, rtol=1e-4)


def test_cached_collapse_is_rebuilt_after_loading_weights():
    _, layer = attach("gpt2", logit_weighting="raw", combine="residual", seed=0)
    _, other = attach("gpt2", logit_weighting="raw", combine="residual", seed=1)
    hidden = hidden_states(layer)
    with torch.no_grad():
        layer(hidden)
        layer.backattn_heads.load_state_dict(other.backattn_heads.state_dict())
        torch.testing.assert_close(layer(hidden), other(hidden))


def test_frozen_tensors_follow_a_change_of_the_base_embeddings():
    _, layer = attach("llama", logit_weighting="raw", combine="replace")
    hidden = hidden_states(layer)
    with torch.no_grad():
        layer(hidden)
        layer.embedding_weight.mul_(1.7).add_(0.1)  # in place, as a user fine-tuning the base would
        torch.testing.assert_close(layer(hidden).double(), reference_for(layer, hidden), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("std", [0.02, 0.1])
def test_init_std_sets_the_spread_of_the_random_matrices(std):
    head = BackAttnHead(BackAttnConfig(r=64, num_heads=2, init_std=std), embedding_dim=256)
    for matrix in (head.value_proj, head.key_proj, head.gate):
        assert abs(matrix.std().item() / std - 1) < 0.1
    assert torch.count_nonzero(head.query_proj) == 0  # residual: W_Q still starts at zero
    replace = BackAttnHead(BackAttnConfig(r=64, combine="replace", init_std=std), embedding_dim=256)
    assert abs(replace.query_proj.std().item() / std - 1) < 0.1
