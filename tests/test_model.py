"""The head as a PEFT method: attach, train flags, save, load, swap, delete, disable, merge, generate."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import VOCAB, build, randomize_heads
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_backattn import BackAttnConfig, BackAttnLayer

HEAD_PARAMS = ("norm_scale", "value_proj", "key_proj", "query_proj")


def head_layer(model) -> BackAttnLayer:
    layers = [m for m in model.modules() if isinstance(m, BackAttnLayer)]
    assert len(layers) == 1
    return layers[0]


def logits(model, input_ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def trained_head(arch: str, seed: int, tmp_path, **config_kwargs):
    """A saved head with non-trivial weights, and the folder of the base it was trained on."""
    base_dir = tmp_path / "base"
    if not base_dir.exists():
        build(arch).save_pretrained(base_dir)
    config_kwargs.setdefault("r", 8)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), BackAttnConfig(**config_kwargs))
    randomize_heads(model, seed=seed)
    head_dir = tmp_path / f"head{seed}"
    model.save_pretrained(head_dir)
    return base_dir, head_dir, model


def test_get_peft_model_trains_only_the_head(arch):
    model = get_peft_model(build(arch), BackAttnConfig(r=8, num_heads=2))
    layer = head_layer(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    prefix = f"base_model.model.{model.peft_config['default'].head_module}.backattn_heads.default."
    assert trainable == {prefix + name for name in (*HEAD_PARAMS, "gate")}
    d_e = layer.embedding_weight.shape[1]
    expected_count = d_e + 2 * (2 * d_e * 8) + 2 * 8 * 8 + 2 * 8
    trainable_count, _ = model.get_nb_trainable_parameters()
    assert trainable_count == expected_count


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_tied_embeddings_stay_tied(arch):
    model = get_peft_model(build(arch), BackAttnConfig(r=8))
    base = model.get_base_model()
    assert head_layer(model).get_base_layer().weight is base.get_input_embeddings().weight


def test_save_writes_exactly_the_head_tensors(arch, tmp_path):
    _, head_dir, model = trained_head(arch, 0, tmp_path, num_heads=2)
    saved = load_file(head_dir / "adapter_model.safetensors")
    module = model.peft_config["default"].head_module
    assert set(saved) == {f"base_model.model.{module}.backattn_heads.{p}" for p in (*HEAD_PARAMS, "gate")}
    base_keys = set(model.get_base_model().state_dict())
    assert not any(key.removeprefix("base_model.model.") in base_keys for key in saved)
    assert sorted(p.name for p in head_dir.iterdir() if p.suffix != ".md") == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_from_pretrained_in_a_fresh_process(tmp_path, input_ids):
    base_dir, head_dir, model = trained_head("llama", 0, tmp_path, logit_weighting="softmax")
    torch.save({"input_ids": input_ids, "logits": logits(model, input_ids)}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        import peft_backattn  # registers the method
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
        model = PeftModel.from_pretrained(base, {str(head_dir)!r}).eval()
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            got = model(input_ids=expected["input_ids"]).logits
        torch.testing.assert_close(got, expected["logits"])
        print("same logits")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "same logits" in result.stdout


def test_swapped_heads_equal_each_head_alone(tmp_path, input_ids):
    base_dir, math_dir, _ = trained_head("gpt2", 1, tmp_path, logit_weighting="raw")
    _, code_dir, _ = trained_head("gpt2", 2, tmp_path, num_heads=3, query_activation="silu")
    alone = {
        name: logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), path), input_ids)
        for name, path in (("math", math_dir), ("code", code_dir))
    }
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, math_dir, adapter_name="math")
    model.load_adapter(code_dir, adapter_name="code")
    for name in ("code", "math", "code"):
        model.set_adapter(name)
        torch.testing.assert_close(logits(model, input_ids), alone[name])
    assert not torch.allclose(alone["math"], alone["code"])
    for key, value in model.get_base_model().state_dict().items():
        if ".backattn_heads." not in key:
            assert torch.equal(value, base_state[key.replace("lm_head.base_layer.", "lm_head.")])


def test_delete_adapter_removes_only_that_head(tmp_path, input_ids):
    base_dir, first_dir, _ = trained_head("neox", 1, tmp_path)
    _, second_dir, _ = trained_head("neox", 2, tmp_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), first_dir, adapter_name="math")
    model.load_adapter(second_dir, adapter_name="code")
    model.set_adapter("code")
    before = logits(model, input_ids)
    model.delete_adapter("math")
    assert set(model.peft_config) == {"code"}
    assert set(head_layer(model).backattn_heads) == {"code"}
    torch.testing.assert_close(logits(model, input_ids), before)
    with pytest.raises(ValueError, match="Adapter math not found"):
        model.set_adapter("math")


def test_disable_adapter_gives_exactly_the_base_logits(arch, input_ids):
    expected = logits(build(arch), input_ids)
    model = get_peft_model(build(arch), BackAttnConfig(r=8, init_weights=False))
    assert not torch.allclose(logits(model, input_ids), expected)
    with model.disable_adapter():
        assert torch.equal(logits(model, input_ids), expected)
    assert not torch.allclose(logits(model, input_ids), expected)


def test_transformers_load_adapter(tmp_path, input_ids):
    base_dir, head_dir, model = trained_head("llama", 3, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(base_dir)
    base_logits = logits(plain, input_ids)
    plain.load_adapter(str(head_dir))
    assert isinstance(plain.lm_head, BackAttnLayer)
    assert not torch.allclose(logits(plain, input_ids), base_logits)
    torch.testing.assert_close(logits(plain, input_ids), logits(model, input_ids))


GENERATION_MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, temperature=0.9, top_k=20),
    "beam": dict(do_sample=False, num_beams=3),
}


@pytest.mark.parametrize("mode", sorted(GENERATION_MODES))
def test_generate_with_a_head_equals_generate_with_its_merged_model(mode, tmp_path, input_ids):
    _, _, model = trained_head("gpt2", 4, tmp_path, logit_weighting="raw")
    model.eval()
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, pad_token_id=1, **GENERATION_MODES[mode])
    torch.manual_seed(0)
    with torch.no_grad():
        with_head = model.generate(input_ids=input_ids, **kwargs)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BackAttnLayer) for m in merged.modules())
    torch.manual_seed(0)
    with torch.no_grad():
        plain = merged.generate(input_ids=input_ids, **kwargs)
    assert torch.equal(with_head, plain)


def test_greedy_generation_with_a_nonlinear_head_follows_its_logits(input_ids):
    model = get_peft_model(build("llama"), BackAttnConfig(r=8, num_heads=2, query_activation="gelu"))
    randomize_heads(model)
    model.eval()
    with torch.no_grad():
        generated = model.generate(input_ids=input_ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    sequence = input_ids
    for _ in range(5):  # no KV cache: the full sequence through forward() each step
        next_token = logits(model, sequence)[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bases(dtype, input_ids):
    reference = get_peft_model(build("llama"), BackAttnConfig(r=8, init_weights=False))
    model = get_peft_model(build("llama").to(dtype), BackAttnConfig(r=8, init_weights=False))
    model.load_state_dict(reference.state_dict())  # same head weights, the base in half precision
    head = head_layer(model).backattn_heads["default"]
    assert all(p.dtype == torch.float32 for p in head.parameters())  # PEFT's autocast of adapter weights
    out = logits(model, input_ids)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), logits(reference, input_ids), atol=0.15, rtol=0.05)
    generated = model.generate(input_ids=input_ids, max_new_tokens=3, do_sample=False)
    assert generated.shape == (3, input_ids.shape[1] + 3)


def test_mixed_head_batch_equals_each_head_alone(tmp_path):
    base_dir, first_dir, _ = trained_head("gpt2", 5, tmp_path, logit_weighting="raw")
    _, second_dir, _ = trained_head("gpt2", 6, tmp_path, num_heads=2)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), first_dir, adapter_name="math")
    model.load_adapter(second_dir, adapter_name="code")
    model.eval()
    input_ids = torch.randint(2, VOCAB, (4, 7), generator=torch.Generator().manual_seed(9))
    names = ["code", "__base__", "math", "code"]
    mixed = logits(model, input_ids, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = logits(model, input_ids[i : i + 1])
        else:
            model.set_adapter(name)
            alone = logits(model, input_ids[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone)

    for extra in ({}, {"num_beams": 2}):
        kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=1, **extra)
        with torch.no_grad():
            generated = model.generate(input_ids=input_ids, adapter_names=names, **kwargs)
        for i, name in enumerate(names):
            with torch.no_grad():
                if name == "__base__":
                    with model.disable_adapter():
                        alone = model.generate(input_ids=input_ids[i : i + 1], **kwargs)
                else:
                    model.set_adapter(name)
                    alone = model.generate(input_ids=input_ids[i : i + 1], **kwargs)
            assert torch.equal(generated[i : i + 1], alone), (extra, name)


def test_merge_and_unload_folds_a_linear_head_into_an_untied_output_matrix(input_ids):
    model = get_peft_model(build("gpt2"), BackAttnConfig(r=8, logit_weighting="raw", combine="replace"))
    randomize_heads(model)
    expected = logits(model, input_ids)
    embeddings = model.get_base_model().get_input_embeddings().weight.detach().clone()
    merged = model.merge_and_unload()
    assert type(merged.lm_head) is torch.nn.Linear
    assert merged.lm_head.weight is not merged.get_input_embeddings().weight
    assert merged.config.tie_word_embeddings is False
    assert torch.equal(merged.get_input_embeddings().weight, embeddings)
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=1e-4, rtol=1e-4)


def test_merge_adapter_and_unmerge_restore_the_tied_weight(input_ids):
    model = get_peft_model(build("opt"), BackAttnConfig(r=8, logit_weighting="raw"))
    randomize_heads(model)
    model.eval()
    expected = logits(model, input_ids)
    tied = model.get_base_model().get_input_embeddings().weight
    model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    assert head_layer(model).get_base_layer().weight is tied
    torch.testing.assert_close(logits(model, input_ids), expected)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(logit_weighting="softmax"), "logit_weighting='softmax'"),
        (dict(logit_weighting="raw", num_heads=2), "num_heads=2"),
        (dict(logit_weighting="raw", query_activation="tanh"), "query_activation='tanh'"),
    ],
)
def test_merge_of_a_nonlinear_head_is_refused_and_changes_nothing(kwargs, reason, input_ids):
    model = get_peft_model(build("gpt2"), BackAttnConfig(r=8, **kwargs))
    randomize_heads(model)
    before = logits(model, input_ids)
    with pytest.raises(ValueError, match=f"cannot be merged: it is not linear \\({reason}"):
        model.merge_and_unload()
    assert isinstance(model.get_base_model().lm_head, BackAttnLayer)
    assert torch.equal(logits(model, input_ids), before)


def test_registration_is_idempotent():
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    from peft_backattn import BackAttnModel
    from peft_backattn._registration import register

    register()
    register()
    assert [member for member in PeftType if member.value == "BACKATTN"] == [PeftType.BACKATTN]
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.BACKATTN] is BackAttnModel


def test_print_trainable_parameters_counts_only_the_head(capsys):
    model = get_peft_model(build("gpt2"), BackAttnConfig(r=8))
    model.print_trainable_parameters()
    head = sum(p.numel() for p in head_layer(model).backattn_heads.parameters())
    assert f"trainable params: {head:,}" in capsys.readouterr().out


def test_switching_heads_keeps_their_cached_maps(input_ids):
    model = get_peft_model(build("gpt2"), BackAttnConfig(r=8, logit_weighting="raw"), adapter_name="math")
    model.add_adapter("code", BackAttnConfig(r=8, logit_weighting="raw"))
    randomize_heads(model)
    model.eval()
    layer = head_layer(model)
    outputs = {}
    for name in ("math", "code"):
        model.set_adapter(name)
        outputs[name] = logits(model, input_ids)
    maps = {name: layer._collapsed_cache[name][1] for name in ("math", "code")}
    model.set_adapter("math")
    assert torch.equal(logits(model, input_ids), outputs["math"])
    assert layer._collapsed_cache["math"][1] is maps["math"]  # reused, not rebuilt
    model.delete_adapter("code")
    assert "code" not in layer._collapsed_cache
