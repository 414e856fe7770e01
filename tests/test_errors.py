"""Bad input gets a clear one-line error and changes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, build, randomize_heads
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from peft_backattn import BackAttnConfig, BackAttnLayer


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("r", 0, "BackAttnConfig.r must be a positive integer, got 0"),
        ("r", 2.5, "BackAttnConfig.r must be a positive integer, got 2.5"),
        ("num_heads", -1, "BackAttnConfig.num_heads must be a positive integer"),
        ("chunk_size", 0, "BackAttnConfig.chunk_size must be a positive integer"),
        ("logit_weighting", "logits", "BackAttnConfig.logit_weighting must be one of 'raw', 'softmax', got 'logits'"),
        ("combine", "add", "BackAttnConfig.combine must be one of 'replace', 'residual', got 'add'"),
        ("query_activation", "swish", "BackAttnConfig.query_activation must be one of 'gelu', 'silu'"),
        ("scaling", -1.0, "BackAttnConfig.scaling must be a finite positive number or None"),
        ("rms_norm_eps", 0, "BackAttnConfig.rms_norm_eps must be a finite positive number"),
        ("init_weights", "yes", "BackAttnConfig.init_weights must be True or False"),
        ("init_std", 0.0, "BackAttnConfig.init_std must be a finite positive number, got 0.0"),
        ("init_std", float("nan"), "BackAttnConfig.init_std must be a finite positive number, got nan"),
        ("target_modules", ["lm_head"], "BackAttnConfig.target_modules must stay None"),
    ],
)
def test_invalid_config_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        BackAttnConfig(**{field: value})
    assert "\n" not in str(error.value)


def test_model_without_output_embeddings():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def get_output_embeddings(self):
            return None

    with pytest.raises(ValueError, match="Encoder has no output embeddings .*head_module="):
        get_peft_model(Encoder(), BackAttnConfig(r=2))


def test_unknown_head_module():
    with pytest.raises(ValueError, match="head_module='decoder' is not a module of GPT2LMHeadModel"):
        get_peft_model(build("gpt2"), BackAttnConfig(r=2, head_module="decoder"))


def save_head(tmp_path, arch="gpt2", name="math", **config):
    base_dir = tmp_path / f"base-{arch}"
    if not base_dir.exists():
        build(arch).save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), BackAttnConfig(r=4, **config))
    randomize_heads(model)
    model.save_pretrained(tmp_path / name)
    return base_dir, tmp_path / name


def snapshot(model) -> dict:
    return {"heads": sorted(model.peft_config), "state": {k: v.clone() for k, v in model.state_dict().items()}}


def assert_unchanged(model, before) -> None:
    assert sorted(model.peft_config) == before["heads"]
    after = model.state_dict()
    assert after.keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after[key], value), key


def test_head_from_another_base_names_both_shapes(tmp_path):
    _, head_dir = save_head(tmp_path, arch="gpt2")
    other = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB + 8, n_embd=48, n_layer=1, n_head=2, n_positions=32))
    message = (
        r"built for a base .*with vocabulary 97, hidden size 32 and embedding size 32, but this model has "
        r"vocabulary 105, hidden size 48 and embedding size 48"
    )
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(other, head_dir)
    assert not any(isinstance(m, BackAttnLayer) for m in other.modules())

    wrapped = get_peft_model(other, BackAttnConfig(r=4), adapter_name="own")
    before = snapshot(wrapped)
    with pytest.raises(ValueError, match=message):
        wrapped.load_adapter(head_dir, adapter_name="math")
    assert_unchanged(wrapped, before)


def corrupt_truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_header(path):
    data = bytearray(path.read_bytes())
    data[10:20] = b"\x00" * 10
    path.write_bytes(bytes(data))


def corrupt_values(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key][0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})


def drop_a_tensor(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    del tensors[sorted(tensors)[0]]
    save_file(tensors, path, metadata={"format": "pt"})


def reshape_a_tensor(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("query_proj"))
    tensors[key] = torch.zeros(1, 3, 3)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "damage, message",
    [
        (corrupt_truncate, "is truncated or corrupted"),
        (corrupt_header, "is truncated or corrupted"),
        (corrupt_values, "holds NaN or infinite values"),
        (drop_a_tensor, "does not hold the head its config describes"),
        (reshape_a_tensor, r"query_proj has shape \(1, 3, 3\), but the config describes \(1, 4, 4\)"),
    ],
)
def test_damaged_head_file_is_refused_without_changing_the_model(tmp_path, damage, message):
    base_dir, good_dir = save_head(tmp_path, name="good")
    _, bad_dir = save_head(tmp_path, name="bad")
    damage(bad_dir / "adapter_model.safetensors")

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), good_dir, adapter_name="math")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message) as error:
        model.load_adapter(bad_dir, adapter_name="code")
    assert "\n" not in str(error.value)
    assert_unchanged(model, before)

    fresh = AutoModelForCausalLM.from_pretrained(base_dir)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(fresh, bad_dir)
    assert not any(isinstance(m, BackAttnLayer) for m in fresh.modules())


def test_pickle_heads_are_refused(tmp_path):
    base_dir, head_dir = save_head(tmp_path)
    (head_dir / "adapter_model.safetensors").rename(head_dir / "adapter_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), head_dir)


def test_config_describing_another_head_is_refused(tmp_path):
    base_dir, head_dir = save_head(tmp_path)
    config_path = head_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = 6
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"value_proj has shape \(1, 32, 4\), but the config describes \(1, 32, 6\)"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), head_dir)


def test_unknown_names_in_adapter_names_list_the_known_heads(input_ids):
    model = get_peft_model(build("gpt2"), BackAttnConfig(r=4), adapter_name="math").eval()
    with pytest.raises(ValueError, match=r"Unknown head\(s\) \['cooking'\] in adapter_names; known heads: \['math'\]"):
        model(input_ids=input_ids, adapter_names=["math", "cooking", "math"])
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 3 samples"):
        model(input_ids=input_ids, adapter_names=["math", "math"])
    model.train()
    with pytest.raises(ValueError, match=r"call model.eval\(\) first"):
        model(input_ids=input_ids, adapter_names=["math"] * 3)


def test_unknown_names_in_set_and_delete_list_the_known_heads(input_ids):
    # PeftModel.set_adapter/delete_adapter check first with PEFT's own message; the tuner's methods (called by
    # PEFT helpers and by users holding model.base_model) used to accept an unknown name silently.
    model = get_peft_model(build("gpt2"), BackAttnConfig(r=4), adapter_name="math").eval()
    with pytest.raises(ValueError, match=r"Unknown head 'cooking'; known heads: \['math'\]"):
        model.base_model.set_adapter("cooking")
    with pytest.raises(ValueError, match=r"Unknown head 'cooking'; known heads: \['math'\]"):
        model.base_model.delete_adapter("cooking")
    # nothing changed: the head is still active and still computes
    assert model.active_adapters == ["math"]
    assert list(model.peft_config) == ["math"]
    model(input_ids=input_ids)


def test_two_active_heads_are_refused(input_ids):
    model = get_peft_model(build("gpt2"), BackAttnConfig(r=4), adapter_name="math")
    model.add_adapter("code", BackAttnConfig(r=4))
    model.base_model.set_adapter(["math", "code"])
    with pytest.raises(ValueError, match=r"runs one head at a time, but \['math', 'code'\] are active"):
        model(input_ids=input_ids)
