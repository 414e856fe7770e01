"""Loading heads: every load (a new name, an existing name, the Trainer's resume) is checked the same way, and a
refused load changes nothing. Also: the user's config object is never written to, and bad config values or a
`head_module` that is not an output layer are refused before anything changes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import VOCAB, build, randomize_heads, save_tiny_lm
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from peft_backattn import BackAttnConfig, BackAttnLayer
from peft_backattn.cli import main as cli_main

WEIGHTS = "adapter_model.safetensors"


def save_head(tmp_path, name: str, arch: str = "gpt2", seed: int = 0, **config):
    """A saved head with non-trivial weights (r=4 unless given), and the folder of the base it was built on."""
    base_dir = tmp_path / f"base-{arch}"
    if not base_dir.exists():
        build(arch).save_pretrained(base_dir)
    config.setdefault("r", 4)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), BackAttnConfig(**config))
    randomize_heads(model, seed=seed)
    model.save_pretrained(tmp_path / name)
    return base_dir, tmp_path / name


def snapshot(model) -> dict:
    return {
        "configs": {name: config.to_dict() for name, config in model.peft_config.items()},
        "modules": [name for name, _ in model.named_modules()],
        "state": {key: value.clone() for key, value in model.state_dict().items()},
        "active": list(model.active_adapters),
    }


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["configs"] == before["configs"]
    assert after["modules"] == before["modules"]
    assert after["active"] == before["active"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert after["state"][key].dtype == value.dtype, key
        assert torch.equal(after["state"][key], value), key


def rewrite_tensors(path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def key_ending(tensors: dict, suffix: str) -> str:
    return next(key for key in tensors if key.endswith(suffix))


# -- damaged or foreign head files: refused on every load path ---------------------------------------------------


def truncate(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def put_nan(folder):
    def change(tensors):
        tensors[key_ending(tensors, "value_proj")].view(-1)[0] = math.nan

    rewrite_tensors(folder / WEIGHTS, change)


def as_pickle(folder):
    torch.save(load_file(folder / WEIGHTS), folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()


def integer_tensor(folder):
    def change(tensors):
        key = key_ending(tensors, "key_proj")
        tensors[key] = tensors[key].round().to(torch.int64)

    rewrite_tensors(folder / WEIGHTS, change)


def bool_tensor(folder):
    def change(tensors):
        key = key_ending(tensors, "norm_scale")
        tensors[key] = tensors[key] > 0

    rewrite_tensors(folder / WEIGHTS, change)


def strip_prefix(folder):
    tensors = load_file(folder / WEIGHTS)
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, folder / WEIGHTS)


BAD_FILES = [
    (truncate, r"adapter_model.safetensors is truncated or corrupted \(.*\); nothing was loaded"),
    (put_nan, r"value_proj holds NaN or infinite values; nothing was loaded"),
    (as_pickle, r"holds adapter_model.bin, but backattn heads load from safetensors only"),
    (integer_tensor, r"lm_head.backattn_heads.key_proj has dtype torch.int64, but head weights are floating point"),
    (bool_tensor, r"lm_head.backattn_heads.norm_scale has dtype torch.bool, but head weights are floating point"),
    (strip_prefix, r"key 'lm_head.backattn_heads.\w+' lacks the 'base_model.model.' prefix"),
]


@pytest.fixture
def math_model(tmp_path):
    """A base with one head, 'math', loaded from disk; and the folder of a second, damageable head."""
    base_dir, good_dir = save_head(tmp_path, "good", seed=1)
    _, other_dir = save_head(tmp_path, "other", seed=2)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), good_dir, adapter_name="math")
    return model, base_dir, other_dir


@pytest.mark.parametrize("damage, message", BAD_FILES, ids=[d.__name__ for d, _ in BAD_FILES])
@pytest.mark.parametrize("name", ["math", "code"], ids=["existing-name", "new-name"])
def test_bad_head_file_is_refused_into_any_name_and_changes_nothing(math_model, damage, message, name):
    model, _, other_dir = math_model
    damage(other_dir)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message) as error:
        model.load_adapter(other_dir, adapter_name=name)
    assert "\n" not in str(error.value)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="Adapter code not found"):
        model.set_adapter("code")


@pytest.mark.parametrize("damage, message", BAD_FILES, ids=[d.__name__ for d, _ in BAD_FILES])
def test_bad_head_file_is_refused_by_from_pretrained(tmp_path, damage, message):
    base_dir, head_dir = save_head(tmp_path, "head")
    damage(head_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    state = {key: value.clone() for key, value in base.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, head_dir)
    assert not any(isinstance(m, BackAttnLayer) for m in base.modules())
    assert not hasattr(base, "peft_config")
    assert all(torch.equal(value, state[key]) for key, value in base.state_dict().items())


OTHER_CONFIGS = [
    (dict(combine="replace"), r"combine='residual'.* holds a head with combine='replace'"),
    (dict(logit_weighting="raw"), r"logit_weighting='softmax'.* holds a head with logit_weighting='raw'"),
    (
        dict(logit_weighting="raw", combine="replace"),
        r"combine='residual', logit_weighting='softmax', but .* holds a head with combine='replace', "
        r"logit_weighting='raw'",
    ),
    (dict(r=6), r"r=4.* holds a head with r=6"),
    (dict(num_heads=2), r"num_heads=1.* holds a head with num_heads=2"),
    (dict(query_activation="gelu"), r"query_activation=None.* holds a head with query_activation='gelu'"),
    (dict(scaling=2.0), r"scaling=None.* holds a head with scaling=2.0"),
    (dict(rms_norm_eps=1e-3), r"rms_norm_eps=1e-06.* holds a head with rms_norm_eps=0.001"),
]


@pytest.mark.parametrize("config, detail", OTHER_CONFIGS, ids=[str(c) for c, _ in OTHER_CONFIGS])
def test_head_with_another_config_is_refused_into_an_existing_name(tmp_path, math_model, config, detail):
    model, _, _ = math_model
    _, other_dir = save_head(tmp_path, "different", seed=3, **config)
    before = snapshot(model)
    message = (
        rf"^Head 'math' has {detail}; weights load only into a head of the same config\. Load them under a new "
        r"adapter_name, or delete_adapter\('math'\) first\.$"
    )
    with pytest.raises(ValueError, match=message):
        model.load_adapter(other_dir, adapter_name="math")
    assert_unchanged(model, before)
    model.load_adapter(other_dir, adapter_name="code")  # under a new name it is a head like any other
    assert model.peft_config["code"].to_dict() | {"inference_mode": False} == BackAttnConfig.from_pretrained(
        other_dir
    ).to_dict() | {"inference_mode": False}


def test_same_config_reloads_into_an_existing_name(math_model, tmp_path):
    model, _, _ = math_model
    _, same_dir = save_head(tmp_path, "same", seed=7)
    model.load_adapter(same_dir, adapter_name="math")
    saved = load_file(same_dir / WEIGHTS)
    for key, value in saved.items():
        name = key.replace(".backattn_heads.", ".backattn_heads.math.")
        assert torch.equal(model.state_dict()[name], value)


def test_a_failure_after_attaching_a_new_head_leaves_no_trace(math_model, monkeypatch):
    model, _, other_dir = math_model
    import peft.peft_model

    def broken(*args, **kwargs):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(peft.peft_model, "set_peft_model_state_dict", broken)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="disk went away"):
        model.load_adapter(other_dir, adapter_name="code")
    assert_unchanged(model, before)


def test_trainer_resume_refuses_a_checkpoint_of_another_head(tmp_path):
    """The Trainer resumes through load_adapter(checkpoint, <active name>): the same check as any load."""
    base_dir, checkpoint = save_head(tmp_path, "checkpoint-2")  # softmax, residual
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), BackAttnConfig(r=4, logit_weighting="raw", combine="replace")
    )
    before = snapshot(model)
    trainer = Trainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    )
    with pytest.raises(ValueError, match=r"Head 'default' has combine='replace', logit_weighting='raw'"):
        trainer._load_from_checkpoint(str(checkpoint))
    assert_unchanged(model, before)


def test_cli_resume_with_other_head_options_exits_with_one_line(tmp_path, capsys):
    model_dir = save_tiny_lm(tmp_path / "model")
    output = tmp_path / "head"
    train = ["train", "--model", model_dir, "--data", "synthetic", "--limit", "8", "--batch-size", "4",
             "--max-length", "64", "--no-progress", "--output", output]  # fmt: skip
    assert cli_main([str(a) for a in [*train, "--steps", "1", "--save-steps", "1"]]) == 0
    capsys.readouterr()
    resume = [*train, "--steps", "2", "--resume", "--logit-weighting", "raw", "--combine", "replace"]
    assert cli_main([str(a) for a in resume]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("peft-backattn: error: ")]
    assert len(errors) == 1
    assert errors[0].startswith("peft-backattn: error: Head 'default' has combine='replace', logit_weighting='raw'")
    assert not (output / "checkpoint-2").exists()


def test_half_precision_files_load_cast_to_the_head_dtype(math_model):
    model, _, other_dir = math_model
    rewrite_tensors(other_dir / WEIGHTS, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    model.load_adapter(other_dir, adapter_name="math")
    for key, value in load_file(other_dir / WEIGHTS).items():
        loaded = model.state_dict()[key.replace(".backattn_heads.", ".backattn_heads.math.")]
        assert loaded.dtype == torch.float32
        assert torch.equal(loaded, value.float())


# -- the prefix: a file PEFT would fail on is refused before the head is attached ---------------------------------


def test_unprefixed_head_leaves_no_untrained_head_behind(math_model):
    model, _, other_dir = math_model
    strip_prefix(other_dir)
    with pytest.raises(ValueError, match="lacks the 'base_model.model.' prefix"):
        model.load_adapter(other_dir, adapter_name="x")
    assert list(model.peft_config) == ["math"]
    with pytest.raises(ValueError, match="Adapter x not found"):
        model.set_adapter("x")


# -- unknown peft_type ---------------------------------------------------------------------------------------------


@pytest.fixture
def foreign_type_head(tmp_path):
    base_dir, head_dir = save_head(tmp_path, "foreign")
    config_path = head_dir / "adapter_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"peft_type": "BACKATTNX"}))
    return base_dir, head_dir


UNKNOWN_TYPE = (
    r"adapter_config.json has peft_type 'BACKATTNX', which is not a PEFT method known here; a backattn head has "
    r"peft_type 'BACKATTN'"
)


def test_unknown_peft_type_is_one_line_on_every_load_path(foreign_type_head, math_model):
    base_dir, head_dir = foreign_type_head
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    calls = {
        "PeftModel.from_pretrained": lambda: PeftModel.from_pretrained(base, head_dir),
        "BackAttnConfig.from_pretrained": lambda: BackAttnConfig.from_pretrained(str(head_dir)),
        "load_adapter, new name": lambda: math_model[0].load_adapter(head_dir, adapter_name="code"),
        "load_adapter, existing name": lambda: math_model[0].load_adapter(head_dir, adapter_name="math"),
    }
    before = snapshot(math_model[0])
    for where, call in calls.items():
        with pytest.raises(ValueError, match=UNKNOWN_TYPE) as error:
            call()
        assert "\n" not in str(error.value), where
        assert isinstance(error.value, KeyError), where  # still what PEFT raised before, for callers that catch it
    assert not any(isinstance(m, BackAttnLayer) for m in base.modules())
    assert_unchanged(math_model[0], before)


def test_unknown_peft_type_through_the_cli(foreign_type_head, tmp_path, capsys):
    _, head_dir = foreign_type_head
    model_dir = save_tiny_lm(tmp_path / "model")
    code = cli_main(["generate", "--model", str(model_dir), "--heads", str(head_dir), "--problem", "1+1?"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("peft-backattn: error: ")]
    assert len(errors) == 1 and "has peft_type 'BACKATTNX', which is not a PEFT method known here" in errors[0]


@pytest.mark.parametrize("peft_type", ["LORA", "BACKATTNX"])
def test_config_with_another_peft_type_is_refused(peft_type):
    with pytest.raises(ValueError, match=rf"^BackAttnConfig.peft_type must be 'BACKATTN', got '{peft_type}'\.$"):
        BackAttnConfig(peft_type=peft_type)


# -- config values and head_module ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("scaling", math.inf, "BackAttnConfig.scaling must be a finite positive number or None, got inf."),
        ("scaling", math.nan, "BackAttnConfig.scaling must be a finite positive number or None, got nan."),
        ("scaling", True, "BackAttnConfig.scaling must be a finite positive number or None, got True."),
        ("rms_norm_eps", math.inf, "BackAttnConfig.rms_norm_eps must be a finite positive number, got inf."),
        ("rms_norm_eps", -math.inf, "BackAttnConfig.rms_norm_eps must be a finite positive number, got -inf."),
        ("rms_norm_eps", "1e-6", "BackAttnConfig.rms_norm_eps must be a finite positive number, got '1e-6'."),
    ],
)
def test_non_finite_config_values_are_refused(field, value, message):
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.") + "$"):
        BackAttnConfig(**{field: value})


def test_non_finite_values_in_a_saved_config_are_refused_before_loading(tmp_path):
    base_dir, head_dir = save_head(tmp_path, "head")
    config_path = head_dir / "adapter_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"scaling": math.inf}))
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with pytest.raises(ValueError, match="BackAttnConfig.scaling must be a finite positive number or None, got inf"):
        PeftModel.from_pretrained(base, head_dir)
    assert not any(isinstance(m, BackAttnLayer) for m in base.modules())


@pytest.mark.parametrize(
    "head_module, kind",
    [("transformer.wte", "Embedding"), ("transformer.h.0.mlp", "GPT2MLP"), ("transformer.ln_f", "LayerNorm")],
)
def test_head_module_that_is_not_an_output_layer_is_refused_at_attach(head_module, kind):
    base = build("gpt2")
    state = {key: value.clone() for key, value in base.state_dict().items()}
    message = (
        rf"^BackAttnConfig.head_module='{head_module}' is a {kind}, not a linear output layer \(nn.Linear from "
        r"hidden states to vocabulary logits\); name the output layer, e.g. 'lm_head', or leave head_module=None\.$"
    )
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, BackAttnConfig(r=4, head_module=head_module))
    assert not any(isinstance(m, BackAttnLayer) for m in base.modules())
    assert all(torch.equal(value, state[key]) for key, value in base.state_dict().items())


# -- the user's config object --------------------------------------------------------------------------------------


def test_one_config_object_attaches_to_bases_of_different_shapes(input_ids):
    config = BackAttnConfig(r=4)
    before = config.to_dict()
    first = get_peft_model(build("gpt2"), config)
    other = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB + 8, n_embd=48, n_layer=1, n_head=2, n_positions=32))
    second = get_peft_model(other, config)
    first.add_adapter("again", config)
    assert config.to_dict() == before
    assert (first.peft_config["default"].base_vocab_size, first.peft_config["default"].base_hidden_size) == (VOCAB, 32)
    assert first.peft_config["again"].base_vocab_size == VOCAB
    assert (second.peft_config["default"].base_vocab_size, second.peft_config["default"].base_hidden_size) == (
        VOCAB + 8,
        48,
    )
    assert first.peft_config["default"] is not config and first.peft_config["default"].head_module == "lm_head"
    second(input_ids=input_ids)
