"""`save_pretrained` of a backattn head writes a model card that says what the head is, on which base, trained how."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import build, save_tiny_lm
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_backattn import BackAttnConfig
from peft_backattn._base_names import EMBEDDED_DEFAULT_HUB_ID, PublishedBase, published_base
from peft_backattn.cli import main
from peft_backattn.model_card import CARD_MARK, record_card_details
from peft_backattn.workbench.base_models import EMBEDDED_DEFAULT, load_base_model
from peft_backattn.workbench.data import describe_source
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
    assert "base_model" not in header  # a local folder is no hub id (the hub refuses one as base_model)
    assert {"backattn", "peft"} <= set(header["tags"]) and not any("base_model" in tag for tag in header["tags"])
    assert "Model Card for Model ID" not in body and "[More Information Needed]" not in body
    assert CARD_MARK in body and "# backattn head `default` for model\n" in body
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


# ---- No local path in what is published (issue 18, item 8) ---------------------------------------------------------
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/[\w.-]+/")  # '/tmp/...', '/root/...'; not 'org/name' nor 'https://'


def published_files(head: Path) -> dict[str, str]:
    """README.md and adapter_config.json of a head folder and of each of its checkpoints."""
    return {
        str(path.relative_to(head)): path.read_text()
        for folder in (head, *sorted(head.glob("checkpoint-*")))
        for path in (folder / "README.md", folder / "adapter_config.json")
    }


def assert_no_local_path(files: dict[str, str], *folders: Path) -> None:
    for name, text in files.items():
        for folder in (*folders, Path.home()):
            assert str(folder) not in text, f"{name} names {folder}:\n{text}"
        assert not ABSOLUTE_PATH.search(text), f"{name} holds an absolute path: {ABSOLUTE_PATH.search(text)[0]}"


def test_a_head_trained_on_a_local_folder_publishes_no_local_path(tmp_path):
    model_dir = save_tiny_lm(tmp_path / "work" / "my-base", chat=False)
    data = tmp_path / "work" / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(8)))
    head = tmp_path / "work" / "head"
    code = main([
        "train", "--model", str(model_dir), "--data", str(data), "--steps", "2", "--save-steps", "2",
        "--batch-size", "4", "--r", "8", "--no-progress", "--output", str(head),
    ])  # fmt: skip
    assert code == 0
    files = published_files(head)
    checkpoint = ["checkpoint-2/README.md", "checkpoint-2/adapter_config.json"]
    assert set(files) == {"README.md", "adapter_config.json", *checkpoint}
    assert_no_local_path(files, tmp_path)
    header, body = read_card(head)
    assert "base_model" not in header and not any(tag.startswith("base_model") for tag in header["tags"])
    assert "# backattn head `default` for my-base\n" in body
    assert "- **Where the base came from:** a local folder, not a hub id: load it from where you keep it" in body
    assert (
        '# "my-base" was a local folder: give its path\nbase = AutoModelForCausalLM.from_pretrained("my-base")' in body
    )
    assert "### Training Data\n\n`train.jsonl` (a local file), all rows; fields: detected" in body
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "my-base"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), head)  # still loads


def test_a_head_on_the_embedded_default_names_its_hub_id(tmp_path, monkeypatch):
    """Found where the embedded default is looked for (the cache folder), as a converted model is reused."""
    monkeypatch.setenv("PEFT_BACKATTN_CACHE", str(tmp_path / "cache"))
    save_tiny_lm(tmp_path / "cache" / EMBEDDED_DEFAULT)
    base, _ = load_base_model(EMBEDDED_DEFAULT)
    assert base.name_or_path == str(tmp_path / "cache" / EMBEDDED_DEFAULT)  # what PEFT records by itself
    get_peft_model(base, BackAttnConfig(r=8)).save_pretrained(tmp_path / "head")
    files = published_files(tmp_path / "head")
    assert_no_local_path(files, tmp_path)
    header, body = read_card(tmp_path / "head")
    assert header["base_model"] == EMBEDDED_DEFAULT_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert f"base_model:adapter:{EMBEDDED_DEFAULT_HUB_ID}" in header["tags"]
    assert f"# backattn head `default` for {EMBEDDED_DEFAULT_HUB_ID}" in body
    assert f'AutoModelForCausalLM.from_pretrained("{EMBEDDED_DEFAULT_HUB_ID}")' in body
    assert f"embedded default (`--model {EMBEDDED_DEFAULT}`), this model's Q4_1 GGUF copy" in body
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == EMBEDDED_DEFAULT_HUB_ID


def folder(tmp_path: Path, relative: str, config: dict | None = None) -> str:
    path = tmp_path / relative
    path.mkdir(parents=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return str(path)


LOCAL = "a local folder, not a hub id: load it from where you keep it"
COPY = "loaded from a local copy of it"


HUB_CACHE = "hub/models--org--tiny-lm/snapshots/0123abc"


@pytest.mark.parametrize(
    "name, expected",
    [
        (lambda tmp: "gpt2", PublishedBase("gpt2", True)),
        (lambda tmp: EMBEDDED_DEFAULT_HUB_ID, PublishedBase(EMBEDDED_DEFAULT_HUB_ID, True)),
        (lambda tmp: EMBEDDED_DEFAULT, PublishedBase(EMBEDDED_DEFAULT_HUB_ID, True, "...")),
        (lambda tmp: folder(tmp, HUB_CACHE), PublishedBase("org/tiny-lm", True, COPY)),
        (lambda tmp: folder(tmp, "saved", {"_name_or_path": "org/base"}), PublishedBase("org/base", True, COPY)),
        (lambda tmp: folder(tmp, "saved", {"_name_or_path": "/data/base"}), PublishedBase("saved", False, LOCAL)),
        (lambda tmp: folder(tmp, "plain"), PublishedBase("plain", False, LOCAL)),
        (lambda tmp: folder(tmp, "plain") + "/.", PublishedBase("plain", False, LOCAL)),
        (lambda tmp: "/gone/from/this/machine/my-model", PublishedBase("my-model", False, LOCAL)),
        (lambda tmp: "../models/my-model", PublishedBase("my-model", False, LOCAL)),
        (lambda tmp: "", PublishedBase(None, False)),
        (lambda tmp: None, PublishedBase(None, False)),
    ],
    ids=["hub-legacy", "hub", "embedded-name", "hub-cache", "config-hub-id", "config-path", "plain", "dot", "gone",
         "relative", "empty", "none"],
)  # fmt: skip
def test_published_base_keeps_hub_ids_and_names_local_folders_by_name(tmp_path, monkeypatch, name, expected):
    monkeypatch.setenv("PEFT_BACKATTN_CACHE", str(tmp_path / "cache"))
    result = published_base(name(tmp_path))
    assert (result.name, result.hub_id) == (expected.name, expected.hub_id)
    assert result.note == expected.note or expected.note == "..."


def test_the_training_data_line_names_a_local_file_by_its_name_only(tmp_path):
    data = tmp_path / "deep" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    line = describe_source(str(data), limit=100, streaming=True)
    assert line == "`train.jsonl` (a local file), the first 100 rows, streamed; fields: detected"
    assert (
        describe_source("openai/gsm8k", subset="main")
        == "`openai/gsm8k` (configuration main, split train), all rows; fields: detected"
    )
