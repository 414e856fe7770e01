"""The contextual head (config.context): its math against the literal reference, reading the layers on every
architecture, its decoding cache through every generation mode, mixed batches, and what it refuses."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build, randomize_heads
from peft import PeftModel, get_peft_model
from transformers.cache_utils import DynamicCache

from peft_backattn import BackAttnConfig
from peft_backattn.context import default_context_layers
from peft_backattn.reference import reference_context, reference_logits
from peft_backattn.taps import find_decoder_layers

SMALL = {"context": True, "context_dim": 16, "context_heads": 2, "r": 8}


def contextual(arch: str = "llama", seed: int = 0, name: str = "default", **fields) -> PeftModel:
    model = get_peft_model(build(arch), BackAttnConfig(**(SMALL | fields)), adapter_name=name).eval()
    randomize_heads(model, seed=seed)
    return model


def output_layer(model: PeftModel):
    return model.base_model.model.get_output_embeddings()


def taps_and_final_hidden(model: PeftModel, ids: torch.Tensor, mask: torch.Tensor | None, layers: list[int]):
    """The tapped layers' outputs (B, T, L, d) and the output layer's input, recorded by the test's own hooks."""
    stack = find_decoder_layers(model.base_model.model)
    seen: dict[int, torch.Tensor] = {}
    handles = [
        stack[i].register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
        for i in layers
    ]
    final = []
    handles.append(output_layer(model).register_forward_pre_hook(lambda m, a: final.append(a[0])))
    with torch.no_grad(), model.disable_adapter():
        model(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    return torch.stack([seen[i] for i in layers], dim=2), final[0]


def reference_for(model: PeftModel, ids: torch.Tensor, mask: torch.Tensor | None, name: str = "default"):
    layer = output_layer(model)
    head = layer.backattn_heads[name]
    taps, hidden = taps_and_final_hidden(model, ids, mask, head.config.context_layers)
    context = reference_context(taps, mask, head)
    embedding = model.base_model.model.get_input_embeddings().weight
    return reference_logits(hidden, layer.get_base_layer(), embedding, head, context=context)


def left_padded(ids: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = ids.clone()
    mask = torch.ones_like(ids)
    for row, count in enumerate(pads):
        ids[row, :count] = 1
        mask[row, :count] = 0
    return ids, mask


# -- the math ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"context_window": 3},
        {"context_attention": False},
        {"context_layers": [-1]},
        {"num_heads": 2},
        {"logit_weighting": "raw", "query_activation": "gelu"},
        {"combine": "replace"},
    ],
    ids=["default", "window", "taps-only", "last-layer", "mixture", "raw-gelu", "replace"],
)
def test_logits_equal_the_reference(arch, input_ids, fields):
    model = contextual(arch, **fields)
    ids, mask = left_padded(input_ids, [0, 3, 5])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    expected = reference_for(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(logits[real].double(), expected[real], rtol=1e-4, atol=1e-4)


def test_gradients_equal_the_reference(input_ids):
    model = contextual("gpt2", context_window=4)
    ids, mask = left_padded(input_ids, [0, 2, 4])
    head = output_layer(model).backattn_heads["default"]
    weights = torch.randn(ids.shape[0], ids.shape[1], VOCAB, generator=torch.Generator().manual_seed(3))
    real = mask.bool()

    (model(input_ids=ids, attention_mask=mask).logits[real] * weights[real]).sum().backward()  # eval: no dropout
    fast = {name: p.grad.clone() for name, p in head.named_parameters()}
    head.zero_grad()
    (reference_for(model, ids, mask)[real] * weights[real].double()).sum().backward()
    assert set(fast) >= {"context_to_query", "context.tap_proj", "context.qkv_proj", "context.out_proj"}
    for name, p in head.named_parameters():
        assert fast[name].abs().sum() > 0, name
        scale = p.grad.abs().max().item()  # float32 sums over the vocabulary: compare relative to the largest
        torch.testing.assert_close(fast[name], p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_an_untrained_contextual_head_returns_the_base(arch, input_ids):
    base = build(arch)
    with torch.no_grad():
        expected = base(input_ids=input_ids).logits
    model = get_peft_model(build(arch), BackAttnConfig(**SMALL)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=0, atol=0)


def test_no_gradient_reaches_the_base(input_ids):
    model = contextual("llama").train()
    model(input_ids=input_ids).logits.sum().backward()
    frozen = [n for n, p in model.named_parameters() if ".backattn_heads." not in n]
    assert frozen and all(dict(model.named_parameters())[n].grad is None for n in frozen)
    assert all(p.grad is not None for n, p in model.named_parameters() if ".backattn_heads." in n)


# -- reading the layers ------------------------------------------------------------------------------------------


def test_default_layers_are_a_third_two_thirds_and_the_last():
    assert default_context_layers(30) == [9, 19, 29]
    assert default_context_layers(12) == [3, 7, 11]
    assert default_context_layers(2) == [0, 1]
    config = contextual("llama", context_layers=[-1, 0]).peft_config["default"]
    assert (config.context_layers, config.base_num_layers, config.base_context_width) == ([1, 0], 2, 32)


def test_hooks_exist_only_while_a_contextual_head_does(input_ids):
    model = get_peft_model(build("llama"), BackAttnConfig(r=8))
    inner = model.base_model.model
    stack = find_decoder_layers(inner)

    def hooks() -> int:
        modules = [inner, *stack]
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)

    assert hooks() == 0
    model.add_adapter("ctx", BackAttnConfig(**SMALL))
    assert hooks() == 6  # the model's start and end, a pre-hook and a hook per tapped layer (2)
    with torch.no_grad():
        model(input_ids=input_ids)
    assert model.base_model._layer_taps().current_record() is None  # nothing kept after the forward
    model.delete_adapter("ctx")
    assert hooks() == 0


def test_a_model_without_findable_layers_is_refused_naming_context_layers():
    model = build("llama")
    model.config.num_hidden_layers = 5  # no ModuleList of 5 layers
    with pytest.raises(ValueError, match=r"^BackAttnConfig.context_layers: found no stack of decoder layers"):
        get_peft_model(model, BackAttnConfig(**SMALL))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"context_layers": [2]}, r"names layer 2, but the model has 2 decoder layers"),
        ({"context_layers": [1, -1]}, r"names one layer twice \(\[1, 1\]\)"),
    ],
)
def test_bad_layers_are_refused_before_any_change(fields, message):
    model = build("gpt2")
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, BackAttnConfig(**(SMALL | fields)))
    assert not any("backattn" in type(m).__name__.lower() for m in model.modules())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"context": False, "context_layers": [1]}, "context_layers=[1] is set, but context=False"),
        ({"context_dim": 12, "context_heads": 4}, "must split into context_heads=4 heads of an even width"),
        ({"context_layers": []}, "context_layers must be a non-empty list of distinct layer indices"),
        ({"context_window": 0}, "context_window must be a positive integer or None"),
    ],
)
def test_bad_context_fields_are_one_line_errors(fields, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as caught:
        BackAttnConfig(**(SMALL | fields))
    assert "\n" not in str(caught.value)


# -- decoding with the head's own cache --------------------------------------------------------------------------


@pytest.mark.parametrize("arch_name", ["gpt2", "llama", "opt", "neox"])
def test_step_by_step_decoding_with_the_cache_equals_the_full_forward(arch_name, input_ids):
    model = contextual(arch_name, context_window=5)
    ids, mask = left_padded(input_ids, [0, 2, 4])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        cache = DynamicCache(config=model.base_model.model.config)
        steps = []
        for t in range(ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache)
            steps.append(out.logits[:, -1])
    real = mask.bool()
    torch.testing.assert_close(torch.stack(steps, dim=1)[real], full[real], rtol=1e-4, atol=1e-5)
    assert len(cache.layers) == len(find_decoder_layers(model.base_model.model)) + 1  # one slot for the head


def test_a_cache_without_the_heads_keys_is_refused(input_ids):
    model = contextual("llama")
    with torch.no_grad(), model.disable_adapter():
        first = model(input_ids=input_ids[:, :4], use_cache=True).past_key_values
    with torch.no_grad(), pytest.raises(ValueError, match="holds its keys for 0 of the 4 earlier positions"):
        model(input_ids=input_ids[:, 4:5], cache=first)


def greedy_without_cache(model: PeftModel, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """The naive decoding loop: the whole sequence through the model at every step, no cache anywhere."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def test_greedy_generate_equals_the_naive_loop(arch, input_ids):
    model = contextual(arch)
    prompt = input_ids[:1, :5]
    out = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=1)
    assert torch.equal(out, greedy_without_cache(model, prompt, 8))


def test_left_padded_batches_equal_each_row_alone(input_ids):
    model = contextual("llama", context_window=4)
    ids, mask = left_padded(input_ids, [0, 2, 4])
    kwargs = {"max_new_tokens": 7, "min_new_tokens": 7, "do_sample": False, "pad_token_id": 1}
    batch = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    for row, pads in enumerate([0, 2, 4]):
        alone = model.generate(input_ids=ids[row : row + 1, pads:], **kwargs)
        assert torch.equal(batch[row, pads:], alone[0]), row


def test_beam_search_and_returned_sequences_follow_the_cache(input_ids):
    model = contextual("gpt2")
    prompt = input_ids[:2, :5]
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "num_beams": 3, "num_return_sequences": 2, "pad_token_id": 1}
    with_cache = model.generate(input_ids=prompt, **kwargs)
    without = model.generate(input_ids=prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


def test_sampling_with_the_cache_equals_sampling_without(input_ids):
    model = contextual("neox")
    prompt = input_ids[:2, :4]
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": True, "num_return_sequences": 2}
    torch.manual_seed(5)
    with_cache = model.generate(input_ids=prompt, pad_token_id=1, **kwargs)
    torch.manual_seed(5)
    without = model.generate(input_ids=prompt, pad_token_id=1, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


def test_mixed_batches_equal_each_head_alone(input_ids):
    model = contextual("llama", name="ctx")
    model.add_adapter("ctx_window", BackAttnConfig(**(SMALL | {"context_window": 3, "context_layers": [0]})))
    model.add_adapter("taps_only", BackAttnConfig(**(SMALL | {"context_attention": False})))
    model.add_adapter("plain", BackAttnConfig(r=8))
    randomize_heads(model, seed=1)
    names = ["ctx", "plain", "ctx_window", "__base__", "taps_only", "ctx"]
    prompts = torch.cat([input_ids, input_ids.flip(1)])[:, :6]
    ids, mask = left_padded(prompts, [0, 1, 2, 3, 0, 2])
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 1}
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kwargs)
    for row, name in enumerate(names):
        pads = int((mask[row] == 0).sum())
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(input_ids=ids[row : row + 1, pads:], **kwargs)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=ids[row : row + 1, pads:], **kwargs)
        assert torch.equal(mixed[row, pads:], alone[0]), (row, name)
    # and the same batch with beams keeps every row to its head
    beams = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, num_beams=2, **kwargs)
    model.set_adapter("ctx")
    alone = model.generate(input_ids=ids[:1], num_beams=2, **kwargs)
    assert torch.equal(beams[0], alone[0])


def test_merging_a_contextual_head_is_refused():
    model = contextual("gpt2", logit_weighting="raw")
    with pytest.raises(ValueError, match=r"cannot be merged: it is not linear \(context=True") as caught:
        model.merge_and_unload()
    assert "\n" not in str(caught.value)
    assert output_layer(model).merged_adapters == []


# -- saving and loading ------------------------------------------------------------------------------------------


def test_saved_keys_are_the_head_and_its_context_path(tmp_path, input_ids):
    model = contextual("opt")
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    stem = "base_model.model.lm_head.backattn_heads."
    context = ["tap_proj", "attention_norm", "qkv_proj", "out_proj", "mlp_norm", "mlp_in", "mlp_out", "final_norm"]
    own = ["norm_scale", "value_proj", "key_proj", "query_proj", "context_to_query"]
    assert keys == {stem + k for k in own} | {stem + "context." + k for k in context}
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        loaded = PeftModel.from_pretrained(build("opt"), tmp_path).eval()
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, expected, rtol=0, atol=0)


def test_loading_onto_a_base_of_other_depth_is_refused(tmp_path):
    contextual("llama").save_pretrained(tmp_path)
    deeper = build("llama")
    deeper.model.layers.append(type(deeper.model.layers[0])(deeper.config, 2))
    deeper.config.num_hidden_layers = 3
    with pytest.raises(ValueError, match="reads 2 decoder layers of width 32, but this model has 3 of width 32"):
        PeftModel.from_pretrained(deeper, tmp_path)


# -- training ----------------------------------------------------------------------------------------------------


def test_training_on_scored_positions_equals_the_full_loss(input_ids):
    """The Trainer's scored-positions path (output layer on the trained rows only) picks each row's context vector
    by the same mask: its loss and gradients equal the model's own causal-LM loss over every position."""
    from peft_backattn.workbench.scored_positions import only_trained_positions, scored_positions_loss

    model = contextual("llama", context_window=4)
    ids, mask = left_padded(input_ids, [0, 2, 4])
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt of 5 tokens is not trained
    head = output_layer(model).backattn_heads["default"]
    with only_trained_positions(output_layer(model), labels):
        scored = scored_positions_loss(model(input_ids=ids, attention_mask=mask), labels)
    scored.backward()
    fast = {name: p.grad.clone() for name, p in head.named_parameters()}
    head.zero_grad()
    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    full.backward()
    torch.testing.assert_close(scored, full)
    for name, p in head.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_contextual_head_on_a_four_bit_base(tmp_path, input_ids):
    """The hooks read a quantised base's layers as any other: the logits equal the reference, decoding with the cache
    equals the naive loop, and the head trains."""
    pytest.importorskip("bitsandbytes")
    from test_training import four_bit_base

    base, _ = four_bit_base(tmp_path / "base", packed=False)
    model = get_peft_model(base, BackAttnConfig(**SMALL)).eval()
    randomize_heads(model)
    ids, mask = left_padded(input_ids, [0, 2, 4])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real].double(), reference_for(model, ids, mask)[real], rtol=1e-4, atol=1e-4)
    prompt = input_ids[:1, :4]
    out = model.generate(input_ids=prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=1)
    assert torch.equal(out, greedy_without_cache(model, prompt, 5))
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    assert output_layer(model).backattn_heads["default"].context_to_query.grad.abs().sum() > 0
