"""`save_pretrained` of a backattn head writes a model card that says what the head is, on which base, trained how."""

from __future__ import annotations

import re

import yaml
from conftest import build, save_tiny_lm
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_backattn import BackAttnConfig
from peft_backattn.model_card import CARD_MARK, record_card_details
from peft_backattn.workbench.problems import MathExample
from peft_backattn.workbench.saving import save_head
from peft_backattn.workbench.training import TrainingOptions, train_head


def read_card(folder) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def test_a_saved_head_has_a_card_with_the_base_its_config_and_size(tmp_path):
    model_dir = save_tiny_lm(tmp_path / "model")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), BackAttnConfig(r=8, num_heads=2))
    model.save_pretrained(tmp_path / "head")
    header, body = read_card(tmp_path / "head")
    assert header["library_name"] == "peft" and header["pipeline_tag"] == "text-generation"
    assert header["base_model"] == str(model_dir)
    assert {"backattn", "peft", f"base_model:adapter:{model_dir}"} <= set(header["tags"])
    assert "Model Card for Model ID" not in body and "[More Information Needed]" not in body
    assert CARD_MARK in body and f"# backattn head `default` for {model_dir}" in body
    assert "LlamaForCausalLM; vocabulary 600, hidden size 32, embedding width 32" in body
    assert "| r | 8 |" in body and "| num_heads | 2 |" in body and "| logit_weighting | `softmax` |" in body
    count = sum(p.numel() for n, p in model.named_parameters() if ".backattn_heads." in n)
    assert f"{count:,} parameters ({count * 4 / 1e3:.1f} kB)" in body
    assert 'PeftModel.from_pretrained(base, "HEAD_FOLDER_OR_REPO", adapter_name="default")' in body
    assert "### Training Data\n\nNot recorded." in body and "No metrics recorded." in body
    assert body.count("- PEFT ") == 1  # PEFT's framework line, once
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "head")  # still loads


def test_recorded_training_data_and_metrics_are_on_the_card_and_a_second_save_rewrites_it(tmp_path):
    model = get_peft_model(build("gpt2"), BackAttnConfig(r=8))
    record_card_details(model, training_data="GSM8K train, 7,473 problems", metrics={"exact match": 0.125})
    model.save_pretrained(tmp_path)
    record_card_details(model, metrics={"exact match": 0.25, "perplexity": 2.5})
    model.save_pretrained(tmp_path)
    header, body = read_card(tmp_path)
    assert "GSM8K train, 7,473 problems" in body
    assert "| exact match | 0.25 |" in body and "| perplexity | 2.5 |" in body and "0.125" not in body
    assert body.count(CARD_MARK) == 1 and body.count("## Evaluation") == 1
    assert "base_model" not in header  # a base built in memory has no name to point to
    assert "for a GPT2LMHeadModel base model" in body


def test_a_card_of_the_users_own_is_kept(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n\n# My head\n\nWritten by hand.\n")
    get_peft_model(build("gpt2"), BackAttnConfig(r=8)).save_pretrained(tmp_path)
    header, body = read_card(tmp_path)
    assert "Written by hand." in body and CARD_MARK not in body
    assert header["license"] == "mit" and header["library_name"] == "peft"  # PEFT's own update


def test_other_methods_get_peft_s_card(tmp_path):
    lora = get_peft_model(build("gpt2"), LoraConfig(r=2, target_modules=["c_attn"]))
    lora.save_pretrained(tmp_path)
    assert CARD_MARK not in (tmp_path / "README.md").read_text()


def test_train_head_records_its_run_and_save_head_keeps_the_card_of_a_named_head(tmp_path):
    model_dir = save_tiny_lm(tmp_path / "model", chat=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), BackAttnConfig(r=8), adapter_name="math")
    record_card_details(model, training_data="four sums")
    examples = [MathExample(f"What is {i} + 1?", f"{i} + 1 = {i + 1}\n#### {i + 1}", str(i + 1)) for i in range(8)]
    options = TrainingOptions(
        output_dir=str(tmp_path / "head"), max_steps=2, batch_size=4, logging_steps=1, progress_bar=False
    )
    train_head(model, tokenizer, examples, options)
    _, body = read_card(tmp_path / "head")
    assert "# backattn head `math`" in body and "four sums" in body
    assert "| optimiser steps | 2 |" in body and "| examples per step and process | 4 |" in body
    assert re.search(r"\| training loss, first and last logged \| `\d+\.\d{4} -> \d+\.\d{4}` \|", body), body
    assert not (tmp_path / "head" / "math").exists() and "subfolder=" not in body  # the head is at the top
    assert (tmp_path / "head" / "README.md").resolve().parent == (tmp_path / "head" / ".head").resolve()
    save_head(model, tmp_path / "again", adapter_name="math")
    assert read_card(tmp_path / "again")[1] == body
