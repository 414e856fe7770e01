"""Tied input/output embeddings (GPT-2, OPT, a tied Llama like the embedded SmolLM2): transformers' `tie_weights()`
works while a head is attached (lm-eval calls it), the tie survives, and unload/merge leave the tie transformers
expects."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build, randomize_heads
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from peft_backattn import BackAttnConfig, BackAttnLayer


def tied_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=0,
        eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def tied_base(arch: str, seed: int = 0) -> nn.Module:
    if arch == "llama":
        torch.manual_seed(seed)
        return tied_llama().eval()
    return build(arch, seed=seed)


TIED = ["gpt2", "llama", "opt"]


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def assert_tied(model) -> None:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    output = base.get_output_embeddings()
    if isinstance(output, BackAttnLayer):
        output = output.get_base_layer()
    assert output.weight is base.get_input_embeddings().weight


def tie_mapping(model) -> dict:
    return dict(model.get_expanded_tied_weights_keys(all_submodels=True))


@pytest.mark.parametrize("arch", TIED)
def test_tie_weights_works_while_a_head_is_attached(arch, input_ids):
    base = tied_base(arch)
    assert tie_mapping(base)  # the architecture does tie its output layer
    model = get_peft_model(base, BackAttnConfig(r=4, init_weights=False)).eval()
    before = logits(model, input_ids)
    model.tie_weights()
    model.base_model.model.tie_weights()
    model.get_base_model().tie_weights(recompute_mapping=False)
    assert_tied(model)
    assert torch.equal(logits(model, input_ids), before)


@pytest.mark.parametrize("arch", TIED)
def test_unload_gives_the_original_tie_back(arch, input_ids):
    expected = logits(tied_base(arch), input_ids)
    base = tied_base(arch)
    original = (tie_mapping(base), dict(base.all_tied_weights_keys), "_tied_weights_keys" in vars(base))
    model = get_peft_model(base, BackAttnConfig(r=4, init_weights=False))
    unloaded = model.unload()
    assert type(unloaded.get_output_embeddings()) is nn.Linear
    assert (tie_mapping(unloaded), dict(unloaded.all_tied_weights_keys), "_tied_weights_keys" in vars(unloaded)) == (
        original
    )
    unloaded.tie_weights()
    unloaded.tie_weights(recompute_mapping=False)
    assert_tied(unloaded)
    assert torch.equal(logits(unloaded, input_ids), expected)


@pytest.mark.parametrize("arch", TIED)
def test_merge_and_unload_unties_on_purpose(arch, input_ids, tmp_path):
    model = get_peft_model(tied_base(arch), BackAttnConfig(r=4, logit_weighting="raw"))
    randomize_heads(model)
    model.eval()
    expected = logits(model, input_ids)
    with pytest.warns(UserWarning, match="no longer tied after merging"):
        merged = model.merge_and_unload()
    assert merged.config.tie_word_embeddings is False
    assert tie_mapping(merged) == {} and "lm_head.weight" not in merged.all_tied_weights_keys
    merged.tie_weights()
    merged.tie_weights(recompute_mapping=False)
    assert merged.get_output_embeddings().weight is not merged.get_input_embeddings().weight
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=1e-4, rtol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(logits(reloaded, input_ids), logits(merged, input_ids))


@pytest.mark.parametrize("arch", TIED)
def test_tie_weights_while_merged_keeps_the_merge(arch, input_ids):
    model = get_peft_model(tied_base(arch), BackAttnConfig(r=4, logit_weighting="raw"))
    randomize_heads(model)
    model.eval()
    expected = logits(model, input_ids)
    model.merge_adapter()
    merged = logits(model, input_ids)
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    model.get_base_model().tie_weights()
    model.get_base_model().tie_weights(recompute_mapping=False)
    assert torch.equal(logits(model, input_ids), merged)
    model.unmerge_adapter()
    model.get_base_model().tie_weights()
    assert_tied(model)
    assert torch.equal(logits(model, input_ids), expected)
    unloaded = model.unload()
    unloaded.tie_weights(recompute_mapping=False)
    assert_tied(unloaded)


@pytest.mark.parametrize("arch", TIED)
def test_head_round_trip_on_a_tied_base_gives_exact_logits(arch, input_ids, tmp_path):
    tied_base(arch).save_pretrained(tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), BackAttnConfig(r=4, num_heads=2))
    randomize_heads(model)
    model.eval()
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path / "head")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "head").eval()
    assert_tied(reloaded)
    assert torch.equal(logits(reloaded, input_ids), expected)
    reloaded.tie_weights()  # what lm-eval does after loading the adapter
    assert_tied(reloaded)
    assert torch.equal(logits(reloaded, input_ids), expected)


def test_transformers_load_adapter_keeps_tie_weights_working(input_ids, tmp_path):
    tied_base("llama").save_pretrained(tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), BackAttnConfig(r=4))
    randomize_heads(model)
    model.save_pretrained(tmp_path / "head")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    plain.load_adapter(str(tmp_path / "head"))
    expected = logits(plain, input_ids)
    plain.tie_weights()
    assert_tied(plain)
    assert torch.equal(logits(plain, input_ids), expected)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_resizing_the_vocabulary_under_a_head_is_refused(arch, input_ids):
    model = get_peft_model(tied_base(arch), BackAttnConfig(r=4, init_weights=False)).eval()
    before = logits(model, input_ids)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    message = (
        rf"^resize_token_embeddings would change the vocabulary of {VOCAB} tokens that head\(s\) \['default'\] "
        r"score; resize the base model before attaching or loading a head\.$"
    )
    for kwargs in (dict(new_num_tokens=VOCAB + 8), dict(new_num_tokens=VOCAB, pad_to_multiple_of=64)):
        with pytest.raises(ValueError, match=message):
            model.resize_token_embeddings(**kwargs)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    # A call that keeps the size changes nothing and re-ties as transformers does.
    assert model.resize_token_embeddings().weight.shape[0] == VOCAB
    assert model.resize_token_embeddings(VOCAB).weight.shape[0] == VOCAB
    assert isinstance(model.get_base_model().get_output_embeddings(), BackAttnLayer)
    assert_tied(model)
    assert torch.equal(logits(model, input_ids), before)
