"""Heads served through vLLM: the processor's math against the head's own, the load checks against
`PeftModel.load_adapter`'s, and vLLM's greedy and seeded output against transformers with each head alone.

The bank (the math, no vLLM) is tested in every environment; the tests that run vLLM skip where it is not installed
(CI runs them in a second environment with the `vllm` extra, see .ci/run).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import randomize_heads, save_tiny_lm
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from peft_backattn import BackAttnConfig, BackAttnLayer, reference_logits
from peft_backattn._loading import CONFIG_FIELDS
from peft_backattn.vllm.bank import (
    HEAD_KEY,
    HEADS_ENV,
    HeadBank,
    check_request,
    engine_kwargs,
    meta_model,
    normalized_embeddings,
    read_head,
)

VLLM_MISSING = importlib.util.find_spec("vllm") is None
needs_vllm = pytest.mark.skipif(VLLM_MISSING, reason="vLLM is not installed (pip install 'peft-backattn[vllm]')")

HEADS = {
    "soft": BackAttnConfig(r=8, init_weights=False),
    "soft2": BackAttnConfig(r=4, init_weights=False),
    "replace": BackAttnConfig(r=8, combine="replace", init_weights=False),
    "raw": BackAttnConfig(r=8, logit_weighting="raw", init_weights=False),
    "gelu": BackAttnConfig(r=8, query_activation="gelu", init_weights=False),
    "mix": BackAttnConfig(r=4, num_heads=2, init_weights=False),
    "eps": BackAttnConfig(r=8, rms_norm_eps=1e-2, init_weights=False),
}


def save_heads(base_dir: Path, configs: dict[str, BackAttnConfig], out: Path, std: float = 0.5) -> dict[str, Path]:
    """One folder per head, written by save_pretrained, every weight random (so that each head changes the output)."""
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    folders = {}
    for seed, (name, config) in enumerate(configs.items()):
        model = get_peft_model(copy.deepcopy(base), config)
        randomize_heads(model, seed=seed, std=std)
        folders[name] = out / name
        model.save_pretrained(folders[name])
    return folders


def reference_model(base_dir: Path, folders: dict[str, Path]) -> PeftModel:
    names = list(folders)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folders[names[0]], names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama in a folder (vocabulary of the in-process tokenizer), and every kind of head saved for it."""
    work = tmp_path_factory.mktemp("vllm")
    base_dir = save_tiny_lm(work / "base", hidden=64)
    return base_dir, save_heads(base_dir, HEADS, work)


def bank_for(base_dir: Path, folders: dict[str, Path]) -> HeadBank:
    bank = HeadBank(base_dir, AutoConfig.from_pretrained(base_dir), torch.float32)
    for name, folder in folders.items():
        bank.load(name, folder)
    return bank


# -- the math: the bank against the layer and the reference -------------------------------------------------


def logits_through(model: PeftModel, bank: HeadBank, names: list[str], seed: int = 0, length: int = 6):
    """The last position's logits of a batch, one head per row: through the PEFT layer (from the hidden states),
    and through the bank (from the base's logits alone)."""
    input_ids = torch.randint(3, 600, (len(names), length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(input_ids, adapter_names=names).logits[:, -1]
        with model.disable_adapter():
            logits = model(input_ids).logits[:, -1].contiguous()
    row_heads = {row: name for row, name in enumerate(names) if name != "__base__"}
    return bank.apply(logits, bank.plan(row_heads, len(names))), expected


def test_each_row_equals_its_head_in_transformers(tiny):
    """Rows of many heads of every kind in one batch, against the PEFT layer's mixed batch on the hidden states."""
    base_dir, folders = tiny
    names = ["soft", "__base__", "raw", "soft2", "mix", "replace", "soft", "gelu", "eps", "__base__", "soft2"]
    logits, expected = logits_through(reference_model(base_dir, folders), bank_for(base_dir, folders), names)
    for row, name in enumerate(names):
        torch.testing.assert_close(logits[row], expected[row], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(logits[1], expected[1]) and torch.equal(logits[9], expected[9])  # the base's rows


def test_softmax_heads_of_one_kind_compute_what_the_shared_forward_computes(tiny):
    """The same operations as `BackAttnLayer._shared_forward`, bit for bit, where they run on the same rows (one
    position per sample, so that the layer's products have the bank's rows; rows ordered by head, as the bank
    orders them)."""
    base_dir, folders = tiny
    heads = {name: folders[name] for name in ("soft", "soft2", "gelu")}
    model, bank = reference_model(base_dir, heads), bank_for(base_dir, heads)
    logits, expected = logits_through(model, bank, ["soft", "soft", "soft2", "gelu", "gelu"], seed=3, length=1)
    assert torch.equal(logits, expected)


def test_each_kind_of_head_equals_the_reference_steps(tiny):
    """Against the five steps written literally (float64), as functions of the logits: the identity as output layer."""
    base_dir, folders = tiny
    bank = bank_for(base_dir, folders)
    z = torch.randn(len(folders), bank.vocab_size, generator=torch.Generator().manual_seed(1)) * 3
    logits = z.clone()
    bank.apply(logits, bank.plan(dict(enumerate(folders)), len(folders)))
    for row, name in enumerate(folders):
        head = bank.heads[name]
        expected = reference_logits(z[row : row + 1], torch.nn.Identity(), bank.embedding, head)[0]
        torch.testing.assert_close(logits[row].double(), expected, rtol=1e-4, atol=1e-4, msg=name)


def test_rows_without_a_head_and_rows_past_the_batch_are_left_alone(tiny):
    base_dir, folders = tiny
    bank = bank_for(base_dir, {"soft": folders["soft"]})
    z = torch.randn(3, bank.vocab_size, generator=torch.Generator().manual_seed(2))
    logits = z.clone()
    plan = bank.plan({1: "soft", 3: "soft", 4: "gone"}, batch_size=3)  # rows 3 and 4 have left the batch
    bank.apply(logits, plan)
    assert torch.equal(logits[0], z[0]) and torch.equal(logits[2], z[2])
    assert not torch.equal(logits[1], z[1])
    assert plan.unknown_rows == []


def test_the_normalised_embeddings_are_the_layers_own(tiny):
    """The bank builds N itself (it has no layer); it must be exactly the N the PEFT layer's caches build."""
    base_dir, folders = tiny
    model = reference_model(base_dir, {"eps": folders["eps"]})
    layer = next(m for m in model.modules() if isinstance(m, BackAttnLayer))
    config = model.peft_config["eps"]
    embedding = model.get_input_embeddings().weight.detach()
    assert torch.equal(normalized_embeddings(embedding, config.rms_norm_eps), layer.frozen_tensors(config).normalized)


def test_unloading_frees_a_heads_normalised_embeddings_when_no_head_uses_them(tiny):
    base_dir, folders = tiny
    bank = bank_for(base_dir, {"soft": folders["soft"], "eps": folders["eps"]})
    assert len(bank._frozen) == 2
    bank.unload("eps")
    assert list(bank.heads) == ["soft"] and len(bank._frozen) == 1


# -- loading: the checks of PeftModel.load_adapter ----------------------------------------------------------------


def damaged(folder: Path, out: Path, change) -> Path:
    """A copy of a head folder with one change applied to (config, tensors)."""
    out.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    change(config, tensors)
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def first_key(tensors: dict, part: str) -> str:
    return next(key for key in tensors if key.endswith(part))


BAD_HEADS = {
    "nan weights": lambda c, t: t[first_key(t, "key_proj")].fill_(float("nan")),
    "a missing tensor": lambda c, t: t.pop(first_key(t, "query_proj")),
    "a wrong shape": lambda c, t: t.update({first_key(t, "norm_scale"): torch.ones(3)}),
    "another base's vocabulary": lambda c, t: c.update(base_vocab_size=1000),
    "an unknown peft_type": lambda c, t: c.update(peft_type="FROBNICATE"),
    "a bad config value": lambda c, t: c.update(r=0),
}


@pytest.mark.parametrize("case", list(BAD_HEADS))
def test_a_bad_head_is_refused_with_the_message_load_adapter_gives(tiny, tmp_path, case):
    base_dir, folders = tiny
    bad = damaged(folders["soft"], tmp_path / "bad", BAD_HEADS[case])
    model = reference_model(base_dir, {"soft2": folders["soft2"]})
    with pytest.raises(ValueError) as peft_error:
        model.load_adapter(bad, adapter_name="bad")
    bank = bank_for(base_dir, {"soft2": folders["soft2"]})
    with pytest.raises(ValueError) as ours:
        bank.load("bad", bad)
    assert str(ours.value) == str(peft_error.value)
    assert len(str(ours.value).splitlines()) == 1
    assert list(bank.heads) == ["soft2"]


def test_folders_that_hold_no_head_are_refused_in_one_line(tiny, tmp_path):
    base_dir, _ = tiny
    bank = bank_for(base_dir, {})
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    (tmp_path / "empty").mkdir()
    cases = {
        tmp_path / "missing": "No head folder at",
        tmp_path / "empty": "(no adapter_config.json)",
        tmp_path / "lora": "holds a LORA adapter, not a backattn head",
    }
    for folder, message in cases.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
            bank.load("x", folder)
        assert len(str(error.value).splitlines()) == 1
    assert bank.heads == {}


def test_a_taken_name_is_refused(tiny):
    base_dir, folders = tiny
    bank = bank_for(base_dir, {"soft": folders["soft"]})
    with pytest.raises(ValueError, match="has already been loaded"):
        bank.load("soft", folders["soft2"])
    with pytest.raises(ValueError, match="non-empty name"):
        bank.load(" soft ", folders["soft2"])


def test_a_head_that_reads_more_than_the_logits_is_refused(tiny, monkeypatch):
    """No such head exists today: a math field added to the loader's list but unknown to the processor stands for
    one (a contextual head), and must be refused at load rather than computed from the logits alone."""
    base_dir, folders = tiny
    monkeypatch.setattr("peft_backattn.vllm.bank.CONFIG_FIELDS", (*CONFIG_FIELDS, "context_window"))
    bank = bank_for(base_dir, {})
    with pytest.raises(ValueError, match="has context_window=None, which the vLLM processor does not implement"):
        bank.load("soft", folders["soft"])
    assert bank.heads == {}


def test_engine_kwargs_checks_every_head_before_any_engine_starts(tiny, tmp_path, monkeypatch):
    base_dir, folders = tiny
    monkeypatch.delenv(HEADS_ENV, raising=False)
    with pytest.raises(ValueError, match="No head folder"):
        engine_kwargs(base_dir, {"soft": folders["soft"], "gone": tmp_path / "gone"})
    assert HEADS_ENV not in os.environ
    kwargs = engine_kwargs(base_dir, {"soft": folders["soft"]})
    assert kwargs["logits_processors"] == ["peft_backattn.vllm.processor:BackAttnLogitsProcessor"]
    assert json.loads(os.environ[HEADS_ENV]) == {"soft": str(folders["soft"])}


# -- requests -----------------------------------------------------------------------------------------------


def params(**settings) -> SimpleNamespace:
    defaults = dict(extra_args=None, logprobs=None, prompt_logprobs=None, logit_bias=None, allowed_token_ids=None,
                    bad_words=None, min_tokens=0, structured_outputs=None)  # fmt: skip
    return SimpleNamespace(**{**defaults, **settings})


def test_requests_name_a_loaded_head_and_nothing_vllm_applies_before_it(monkeypatch):
    monkeypatch.setenv(HEADS_ENV, json.dumps({"math": "/heads/math"}))
    assert check_request(params()) is None
    assert check_request(params(extra_args={"other": 1})) is None
    assert check_request(params(extra_args={HEAD_KEY: "math"})) == "math"
    with pytest.raises(ValueError, match=r"No backattn head 'maths' is loaded; loaded heads: \['math'\]"):
        check_request(params(extra_args={HEAD_KEY: "maths"}))
    with pytest.raises(ValueError, match="a string"):
        check_request(params(extra_args={HEAD_KEY: 3}))
    settings = {"logprobs": 2, "prompt_logprobs": 1, "logit_bias": {5: 1.0}, "min_tokens": 3,
                "allowed_token_ids": [4], "bad_words": ["x"], "structured_outputs": object()}  # fmt: skip
    for setting, value in settings.items():
        with pytest.raises(ValueError, match=f"^{setting} cannot be used with backattn head 'math'"):
            check_request(params(extra_args={HEAD_KEY: "math"}, **{setting: value}))
        assert check_request(params(**{setting: value})) is None  # the base alone: vLLM's business


def test_meta_model_holds_no_weights(tiny):
    base_dir, _ = tiny
    skeleton = meta_model(AutoConfig.from_pretrained(base_dir))
    assert all(p.is_meta for p in skeleton.parameters())


def test_read_head_gives_the_saved_weights(tiny):
    base_dir, folders = tiny
    config = AutoConfig.from_pretrained(base_dir)
    head = read_head(folders["mix"], config, meta_model(config))
    model = reference_model(base_dir, {"mix": folders["mix"]})
    layer = next(m for m in model.modules() if isinstance(m, BackAttnLayer))
    theirs = dict(layer.backattn_heads["mix"].named_parameters())
    assert set(theirs) == {name for name, _ in head.named_parameters()}
    for name, ours in head.named_parameters():
        assert torch.equal(ours, theirs[name]), name
        assert not ours.requires_grad
