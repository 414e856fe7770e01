"""TRL's SFTTrainer trains a backattn head (TRL 1.10-1.14, loss_type='nll'), and newer TRL is refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_lm
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_backattn import BackAttnConfig
from peft_backattn.workbench import trl_recipe
from peft_backattn.workbench.trl_recipe import check_loss_type, check_trl, sft_config, sft_trainer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
VERSION = trl_recipe.installed_trl_version()
WORKS = VERSION is not None and trl_recipe.FIRST_WORKING <= trl_recipe.Version(VERSION) < trl_recipe.FIRST_REFUSING
needs_working_trl = pytest.mark.skipif(
    not WORKS, reason=f"needs TRL {trl_recipe.TRL_RANGE}, the optional extra peft-backattn[trl]; installed: {VERSION}"
)


def test_newer_trl_is_refused_in_one_line_naming_the_working_range(monkeypatch):
    monkeypatch.setattr(trl_recipe, "installed_trl_version", lambda: "1.15.0")
    with pytest.raises(RuntimeError) as refused:
        sft_config("unused")
    message = str(refused.value)
    assert "\n" not in message and "TRL 1.15.0 refuses PEFT adapters on lm_head" in message
    assert ">=1.10,<1.15" in message
    with pytest.raises(RuntimeError, match="older than the tested range"):
        check_trl("1.9.2")
    with pytest.raises(ImportError, match=r"pip install \"peft-backattn\[trl\]\""):
        monkeypatch.setattr(trl_recipe, "installed_trl_version", lambda: None)
        check_trl()


def test_chunked_loss_is_refused():
    with pytest.raises(ValueError, match="use loss_type='nll'"):
        check_loss_type("chunked_nll")


@needs_working_trl
def test_sft_trainer_trains_only_the_head_and_the_reload_is_exact(tmp_path):
    model_dir = save_tiny_lm(tmp_path / "model", chat=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [
        {"prompt": f"Question: What is {a} + {b}?\nAnswer:", "completion": f" {a} + {b} = {a + b}\n#### {a + b}"}
        for a, b in [(3, 4), (12, 5), (7, 8), (20, 22), (9, 9), (1, 30)]
    ]
    output = tmp_path / "sft"
    args = sft_config(
        str(output), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-2, save_steps=2, logging_steps=1,
        bf16=False, use_cpu=True, max_length=64, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    original = {name: p.detach().clone() for name, p in base.named_parameters()}
    trainer = sft_trainer(base, args, Dataset.from_list(rows), tokenizer, BackAttnConfig(r=8))
    assert isinstance(trainer.model, PeftModel)
    trainer.train()
    trainer.save_model(str(output))

    for folder in (output, output / "checkpoint-2"):
        keys = set(load_file(folder / "adapter_model.safetensors"))
        assert keys and all(".backattn_heads." in key for key in keys), keys
    model = trainer.model.eval()
    for name, param in model.get_base_model().named_parameters():
        if ".backattn_heads." not in name:  # the base is frozen and unchanged
            assert torch.equal(param, original[name.replace(".base_layer", "")]), name
    ids = tokenizer(rows[0]["prompt"] + rows[0]["completion"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        with model.disable_adapter():
            assert not torch.allclose(trained, model(input_ids=ids).logits)  # the head learned something
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), output).eval()
        assert torch.equal(reloaded(input_ids=ids).logits, trained)


@needs_working_trl
def test_the_example_script_trains_a_head_with_trl(tmp_path):
    model_dir = save_tiny_lm(tmp_path / "model", chat=False)
    output = tmp_path / "trl_head"
    command = [
        sys.executable, str(EXAMPLES / "trl_sft_head.py"), "--model", str(model_dir), "--problems", "16", "--steps",
        "2", "--batch-size", "4", "--r", "8", "--max-length", "128", "--output", str(output),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Trained 2 steps" in result.stdout and "head tensors only: True" in result.stdout, result.stdout
    assert "TRL" in (output / "README.md").read_text()  # TRL writes its own card after PEFT's save
