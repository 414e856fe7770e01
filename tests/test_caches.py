"""The head's caches are never stale: each way the tensors they were built from can change, and each context they can
be built in (inference mode, autocast, offload hooks), against the literal reference or a freshly built model."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import VOCAB, build, randomize_heads
from peft import get_peft_model
from torch import nn

import peft_backattn.caches as caches_module
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


# -- 1. inference mode -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_training_after_a_forward_in_inference_mode(mode, input_ids):
    model, _ = attach(mode=mode)
    with torch.inference_mode():
        model(input_ids=input_ids)  # builds every cache as it would in evaluation
    model.train()
    torch.manual_seed(0)  # the same dropout masks in both models
    model(input_ids=input_ids, labels=input_ids).loss.backward()

    fresh, _ = attach(mode=mode)
    fresh.train()
    torch.manual_seed(0)
    fresh(input_ids=input_ids, labels=input_ids).loss.backward()
    expected = head_grads(fresh)
    got = head_grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


# -- 2. autocast -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_a_forward_under_autocast_leaves_full_precision_caches(mode):
    _, layer = attach("llama", mode=mode)
    hidden = hidden_states(layer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(hidden)
    assert_matches_reference(layer, hidden, evaluated(layer, hidden))  # fp32, to fp32 accuracy
    assert_matches_reference(layer, hidden, layer(hidden))  # and training
    # The autocast forward itself is right to bf16 accuracy.
    expected = reference_logits(hidden, layer.base_layer, layer.embedding_weight, layer.backattn_heads["default"])
    torch.testing.assert_close(low.double(), expected, atol=0.1, rtol=0.05)


# -- 3. weights that change without bumping _version -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_a_data_write_to_a_head_weight_is_seen(mode):
    model, layer = attach(mode=mode)
    model.eval()
    hidden = hidden_states(layer)
    before = evaluated(layer, hidden)
    layer.backattn_heads["default"].query_proj.data.mul_(3)  # no version bump
    after = evaluated(layer, hidden)
    assert not torch.allclose(before, after)
    assert_matches_reference(layer, hidden, after)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_a_fused_optimizer_step_in_eval_mode_is_seen(mode):
    model, layer = attach(mode=mode)
    model.eval()
    hidden = hidden_states(layer)
    before = evaluated(layer, hidden)
    head = layer.backattn_heads["default"]
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.1, fused=True)  # fused steps do not bump _version
    layer(hidden).pow(2).mean().backward()
    optimizer.step()
    after = evaluated(layer, hidden)
    assert not torch.allclose(before, after)
    assert_matches_reference(layer, hidden, after)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # tied: the output matrix changes too; untied: only E
@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_new_token_rows_written_through_data_are_seen(mode, arch, training):
    model, layer = attach(arch, mode=mode)
    model.train(training)
    hidden = hidden_states(layer)
    evaluated(layer, hidden)
    layer(hidden)
    embedding = model.get_base_model().get_input_embeddings()
    embedding.weight.data[-5:] = embedding.weight.data[:-5].mean(dim=0) * 4  # the usual new-token initialisation
    assert_matches_reference(layer, hidden, evaluated(layer, hidden))
    assert_matches_reference(layer, hidden, layer(hidden))


def test_a_data_write_to_an_untied_output_matrix_is_seen():
    model, layer = attach("llama", mode=("raw", "replace", 1))  # C = W_out^T N / |V| depends on the output matrix
    model.eval()
    hidden = hidden_states(layer)
    before = evaluated(layer, hidden)
    layer.get_base_layer().weight.data.mul_(2)
    after = evaluated(layer, hidden)
    assert not torch.allclose(before, after)
    assert_matches_reference(layer, hidden, after)


def test_a_round_trip_through_half_precision_is_seen():
    model, layer = attach("gpt2", mode=("raw", "residual", 1))
    hidden = hidden_states(layer)
    evaluated(layer, hidden)
    model.to(torch.bfloat16).to(torch.float32)  # the weights come back rounded
    assert_matches_reference(layer, hidden, evaluated(layer, hidden))


def test_clear_caches_frees_the_cached_tensors():
    model, layer = attach(mode=("raw", "residual", 1))
    model.eval()
    hidden = hidden_states(layer)
    before = evaluated(layer, hidden)
    assert layer._frozen_cache and layer._collapsed_cache
    model.clear_caches()  # through the PeftModel; BackAttnLayer.clear_caches() for one layer
    assert not layer._frozen_cache and not layer._collapsed_cache and not layer._base_copies
    torch.testing.assert_close(evaluated(layer, hidden), before, atol=0, rtol=0)


def test_generate_checks_the_weights_once_and_sees_changes_between_calls(input_ids, monkeypatch):
    model, layer = attach("llama", mode=("raw", "residual", 1))
    model.eval()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=1)
    model.generate(input_ids=input_ids, **kwargs)
    comparisons = []
    real = caches_module._same_contents
    monkeypatch.setattr(caches_module, "_same_contents", lambda *args: comparisons.append(1) or real(*args))
    with torch.no_grad():
        model(input_ids=input_ids)
    per_forward = len(comparisons)
    comparisons.clear()
    model.generate(input_ids=input_ids, **kwargs)
    assert per_forward > 0 and len(comparisons) == per_forward  # six forwards, one check

    layer.backattn_heads["default"].query_proj.data.mul_(3)
    layer.embedding_weight.data[-5:] = 0.5
    fresh, _ = attach("llama", mode=("raw", "residual", 1))
    fresh.eval()
    fresh_layer = next(m for m in fresh.modules() if isinstance(m, BackAttnLayer))
    fresh_layer.load_state_dict(layer.state_dict())
    fresh.get_base_model().get_input_embeddings().weight.data.copy_(layer.embedding_weight)
    torch.testing.assert_close(
        model.generate(input_ids=input_ids, output_logits=True, return_dict_in_generate=True, **kwargs).logits,
        fresh.generate(input_ids=input_ids, output_logits=True, return_dict_in_generate=True, **kwargs).logits,
    )


# -- 4. accelerate's offload -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("offload_first", [False, True], ids=["attach-offload", "offload-attach"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_cpu_offload_gives_the_same_logits(mode, arch, offload_first, input_ids):
    from accelerate import cpu_offload

    reference, _ = attach(arch, mode=mode)
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits

    weighting, combine, heads = mode
    config = BackAttnConfig(r=8, logit_weighting=weighting, combine=combine, num_heads=heads)
    model = build(arch)
    if offload_first:
        cpu_offload(model, execution_device=torch.device("cpu"))
    model = get_peft_model(model, config)
    randomize_heads(model)
    if not offload_first:
        cpu_offload(model, execution_device=torch.device("cpu"))
    layer = next(m for m in model.modules() if isinstance(m, BackAttnLayer))
    assert layer.embedding_weight.device.type == "meta"  # what the head reads between forwards
    for _ in range(2):  # building the caches, then using them
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=input_ids).logits, expected)
    assert layer.embedding_weight.device.type == "meta"  # and put back


@pytest.mark.parametrize("weighting", ["raw", "softmax"])
def test_embeddings_offloaded_to_disk_by_a_device_map(weighting, tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    reference, _ = attach("llama", mode=(weighting, "residual", 1))
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits
    build("llama").save_pretrained(tmp_path / "base")
    device_map = {"model.embed_tokens": "disk", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu"}
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map={**device_map, "lm_head": "cpu"}, offload_folder=tmp_path / "offload"
    )
    assert base.get_input_embeddings().weight.device.type == "meta"
    model = get_peft_model(base, BackAttnConfig(r=8, logit_weighting=weighting))
    randomize_heads(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected)


def test_meta_embeddings_without_a_hook_are_refused():
    model, layer = attach(mode=("softmax", "residual", 1))
    model.get_base_model().get_input_embeddings().to("meta")
    with pytest.raises(RuntimeError, match=r"^The input embeddings are on the meta device and no accelerate hook"):
        layer(hidden_states(layer))


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
