"""Cached features: what is stored is what the output layer sees, training on it equals ordinary training, and the
folder is reused, refused or cleaned up as promised."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.ipc
import pytest
import torch
from conftest import randomize_heads
from datasets import Dataset, Features, Value
from datasets import Sequence as FeatureList
from peft import PeftModel, get_peft_model
from test_context import taps_and_final_hidden
from test_scored_positions import tiny_chat_llama
from tokenizers import normalizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback

from peft_backattn import BackAttnConfig
from peft_backattn.workbench import features as features_module
from peft_backattn.workbench.data import PaddingCollator, tokenize_examples
from peft_backattn.workbench.features import (
    FEATURES_FILE,
    FINGERPRINT_FILE,
    ExampleRows,
    cache_features,
    head_layer,
    open_features,
)
from peft_backattn.workbench.scored_positions import (
    only_trained_positions,
    scored_positions_loss,
    trained_positions,
    trained_targets,
)
from peft_backattn.workbench.synthetic import generate_examples
from peft_backattn.workbench.training import TrainingOptions, train_head

MAX_LENGTH = 128
HEADS = {
    "softmax residual": dict(r=8, init_weights=False),
    "raw residual": dict(r=8, logit_weighting="raw", init_weights=False),
    "raw replace": dict(r=8, logit_weighting="raw", combine="replace"),
    "mixture of 2": dict(r=8, num_heads=2, init_weights=False),
}


def head_model(seed: int = 0, **config):
    """A tiny chat Llama (no dropout) with a head whose weights are clearly non-trivial; the same for a seed."""
    base, tokenizer = tiny_chat_llama()
    torch.manual_seed(seed)
    model = get_peft_model(base, BackAttnConfig(**(config or HEADS["softmax residual"])))
    randomize_heads(model, seed=seed, std=0.3)
    return model, tokenizer


def head_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if ".backattn_heads." in k}


def tokenized(tokenizer, count: int = 8, seed: int = 0):
    return tokenize_examples(generate_examples(count, split="train", seed=seed), tokenizer, MAX_LENGTH)[0]


def options(tmp_path: Path, **changes) -> TrainingOptions:
    settings = dict(
        output_dir=str(tmp_path / "head"), feature_cache=str(tmp_path / "features"), batch_size=4,
        learning_rate=1e-2, logging_steps=1, save_steps=1000, max_length=MAX_LENGTH, progress_bar=False,
    )  # fmt: skip
    return TrainingOptions(**{**settings, **changes})


def test_the_cache_holds_exactly_its_columns_and_files(tmp_path):
    model, tokenizer = head_model()
    softmax = cache_features(model, tokenizer, tokenized(tokenizer), tmp_path / "softmax", max_length=MAX_LENGTH)
    assert softmax.rows.column_names == ["hidden", "target", "weighted"]
    assert {p.name for p in (tmp_path / "softmax").iterdir()} == {FEATURES_FILE, FINGERPRINT_FILE}
    fingerprint = json.loads((tmp_path / "softmax" / FINGERPRINT_FILE).read_text())
    assert set(fingerprint) == {"source", "contents"}
    assert set(fingerprint["source"]) == {"format", "base", "tokenizer", "max_length", "data"}
    assert set(fingerprint["source"]["base"]) == {"model_type", "name_or_path", "dtypes", "config", "weights"}
    assert set(fingerprint["source"]["tokenizer"]) == {"class", "size", "state", "chat_template", "special_tokens"}
    assert set(fingerprint["source"]["data"]) == {"examples", "tokens"}
    assert set(fingerprint["contents"]) == {
        "positions", "hidden_size", "hidden_dtype", "stored_dtype", "weighted", "checksum"
    }  # fmt: skip
    row = softmax.rows[0]
    assert row["hidden"].shape == (32,) and row["hidden"].dtype == torch.float32
    assert row["target"].dtype == torch.int64 and row["weighted"].shape == (32,)

    raw, tokenizer = head_model(**HEADS["raw residual"])
    raw_cache = cache_features(raw, tokenizer, tokenized(tokenizer), tmp_path / "raw", max_length=MAX_LENGTH)
    assert raw_cache.rows.column_names == ["hidden", "target"]  # a raw head's w N is cheap: nothing to cache


def test_stored_rows_are_the_output_layer_input_at_the_trained_positions(tmp_path):
    model, tokenizer = head_model()
    dataset = tokenized(tokenizer, count=6)
    # Computed 4 examples at a time; checked against one forward of all 6, padded to the longest.
    cached = cache_features(model, tokenizer, dataset, tmp_path / "features", max_length=MAX_LENGTH, batch_size=4)

    reference, _ = head_model()  # an identical, un-cached model, run as training runs it (with its head)
    reference.train()
    batch = PaddingCollator.from_tokenizer(tokenizer)([dataset[i] for i in range(len(dataset))])
    seen = []
    layer, name = head_layer(reference)
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    mask = trained_positions(batch["labels"])
    expected = seen[0][mask]  # (n, d_in)

    assert cached.positions == int(mask.sum()) == expected.shape[0]
    rows = cached.rows[:]
    torch.testing.assert_close(rows["hidden"], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows["target"], trained_targets(batch["labels"]))
    head = layer.backattn_heads[name]
    with torch.no_grad():
        weighted = head.weighted_embedding(expected, layer.base_layer(expected), layer.frozen_tensors(head.config))
    torch.testing.assert_close(rows["weighted"], weighted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_loss_and_gradients_from_cached_rows_equal_the_ordinary_step(kind, tmp_path):
    """At fixed weights, over the same positions: the head-only loss and gradients are those of the base + head."""
    model, tokenizer = head_model(**HEADS[kind])
    dataset = tokenized(tokenizer)
    cached = cache_features(model, tokenizer, dataset, tmp_path / "features", max_length=MAX_LENGTH)
    model.train()
    layer, name = head_layer(model)
    trainable = [p for p in model.parameters() if p.requires_grad]

    batch = PaddingCollator.from_tokenizer(tokenizer)([dataset[i] for i in range(len(dataset))])
    with only_trained_positions(layer, batch["labels"]):
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    ordinary = scored_positions_loss(outputs, batch["labels"])
    ordinary_grads = torch.autograd.grad(ordinary, trainable)

    rows = cached.collator(layer.backattn_heads[name].config)([cached.rows[i] for i in range(cached.positions)])
    assert ("cached_weighted" in rows) == (kind in ("softmax residual", "mixture of 2"))
    labels = rows.pop("labels")
    from_cache = scored_positions_loss(model(**rows), labels)  # the PeftModel's forward: the output layer alone
    cached_grads = torch.autograd.grad(from_cache, trainable)

    torch.testing.assert_close(from_cache, ordinary, rtol=1e-5, atol=1e-6)
    for got, expected in zip(cached_grads, ordinary_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("batch_size", "accumulated"), [(8, 1), (4, 2)])
def test_one_cached_training_step_equals_one_ordinary_step(batch_size, accumulated, tmp_path):
    """train_head, one full-batch step each way from the same weights and seed: the same loss and updated head. The
    cached step is one batch, or two accumulated ones (the Trainer counts the targets of both: 464, an even number)."""
    examples = generate_examples(8, split="train")
    ordinary, tokenizer = head_model()
    cached, _ = head_model()
    step = dict(max_steps=1, save_final=False)  # 8 examples: one step covers every position
    ordinary_step = options(tmp_path / "a", feature_cache=None, **step, batch_size=8)
    cached_step = options(tmp_path / "b", **step, batch_size=batch_size, gradient_accumulation_steps=accumulated)
    plain = train_head(ordinary, tokenizer, examples, ordinary_step)
    report = train_head(cached, tokenizer, examples, cached_step)
    assert report.positions_per_step * accumulated == cached_positions(tmp_path / "b" / "features")  # all in a step
    assert report.losses[0] == pytest.approx(plain.losses[0], rel=1e-6)
    expected, got = head_weights(ordinary), head_weights(cached)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)


def test_the_model_forward_on_cached_features_runs_the_output_layer_alone(tmp_path):
    """`peft_model(cached_hidden=...)`: the logits of the full forward at those positions (the base layer's while the
    head is disabled), with or without the stored softmax weights; one-line refusals of what it cannot take."""
    model, tokenizer = head_model()
    dataset = tokenized(tokenizer, count=4)
    cached = cache_features(model, tokenizer, dataset, tmp_path / "features", max_length=MAX_LENGTH)
    layer, name = head_layer(model)
    rows = cached.collator(layer.backattn_heads[name].config)([cached.rows[i] for i in range(cached.positions)])
    hidden, weighted = rows["cached_hidden"], rows["cached_weighted"]
    batch = PaddingCollator.from_tokenizer(tokenizer)([dataset[i] for i in range(len(dataset))])
    sequences = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    trained = trained_positions(batch["labels"])
    model.eval()
    with torch.no_grad():
        full = model(**sequences).logits[trained]  # (n, V)
        alone = model(cached_hidden=hidden, cached_weighted=weighted).logits
        computing_weights = model(cached_hidden=hidden).logits
        with model.disable_adapter():
            base = model(**sequences).logits[trained]
            base_alone = model(cached_hidden=hidden, cached_weighted=weighted).logits
    assert alone.shape == (cached.positions, len(tokenizer))
    torch.testing.assert_close(alone, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(computing_weights, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base_alone, base, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, full)  # the head changes the logits: the two checks differ

    with pytest.raises(ValueError) as refused:
        model(cached_hidden=hidden, input_ids=batch["input_ids"])
    assert str(refused.value) == "cached_hidden runs the output layer alone; it takes no input_ids."
    with pytest.raises(ValueError, match=r"^cached_weighted are the softmax weights of cached_hidden's rows; pass"):
        model(**sequences, cached_weighted=weighted)


def cached_positions(directory: Path) -> int:
    return open_features(directory).positions


def test_a_cache_is_reused_for_the_same_inputs_and_refused_for_others(tmp_path, capsys):
    model, tokenizer = head_model()
    folder = tmp_path / "features"
    dataset = tokenized(tokenizer)
    cache_features(model, tokenizer, dataset, folder, max_length=MAX_LENGTH)
    written = (folder / FEATURES_FILE).stat().st_mtime_ns
    again = cache_features(model, tokenizer, dataset, folder, max_length=MAX_LENGTH)
    assert not again.computed and (folder / FEATURES_FILE).stat().st_mtime_ns == written
    assert f"Feature cache: reusing {folder}" in capsys.readouterr().out

    other_base, _ = head_model()
    with torch.no_grad():
        other_base.get_base_model().model.norm.weight.add_(0.01)
    Case = namedtuple("Case", "model dataset max_length phrase")
    cases = [
        Case(other_base, dataset, MAX_LENGTH, "another base model"),
        Case(model, tokenized(tokenizer, seed=1), MAX_LENGTH, "other training data"),
        Case(model, dataset, 96, "--max-length 128, not 96"),
    ]
    for case in cases:
        with pytest.raises(ValueError) as refused:
            cache_features(case.model, tokenizer, case.dataset, folder, max_length=case.max_length)
        message = str(refused.value)
        assert "\n" not in message and case.phrase in message and "choose another folder" in message
    assert (folder / FEATURES_FILE).stat().st_mtime_ns == written  # refused without touching the cache


def same_weights_under(changes: dict, seed: int = 0):
    """The head model of `seed` rebuilt from a changed copy of its base's config, with the very same weights."""
    model, tokenizer = head_model(seed)
    config = model.get_base_model().config.to_dict()
    for key, value in changes.items():
        if key == "rope_theta":
            config["rope_parameters"] = {**config["rope_parameters"], "rope_theta": value}
        else:
            config[key] = value
    base = LlamaForCausalLM(LlamaConfig.from_dict(config))
    base.load_state_dict(tiny_chat_llama()[0].state_dict())
    other = get_peft_model(base, BackAttnConfig(**HEADS["softmax residual"]))
    other.load_state_dict(model.state_dict())
    return other, tokenizer


@pytest.mark.parametrize(
    "changes, keys",
    [
        ({"rope_theta": 500000.0, "rms_norm_eps": 1e-5}, "rms_norm_eps, rope_parameters.rope_theta"),
        ({"rope_theta": 500000.0}, "rope_parameters.rope_theta"),
        ({"rms_norm_eps": 1e-5}, "rms_norm_eps"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
    ids=["rope-theta-and-eps", "rope-theta", "rms-norm-eps", "activation"],
)
def test_the_same_weights_under_another_config_are_refused(tmp_path, changes, keys):
    """Issue 18 item 5: the weights alone do not make the hidden states; the config does too."""
    model, tokenizer = head_model()
    dataset = tokenized(tokenizer)
    folder = tmp_path / "features"
    cached = cache_features(model, tokenizer, dataset, folder, max_length=MAX_LENGTH)
    other, _ = same_weights_under(changes)
    assert features_module._base_weights_digest(other) == features_module._base_weights_digest(model)
    fresh = cache_features(other, tokenizer, dataset, tmp_path / "fresh", max_length=MAX_LENGTH)
    moved = (fresh.rows[:]["hidden"] - cached.rows[:]["hidden"]).norm(dim=-1).max()
    assert moved > 1e-3  # what reusing the cache would have trained on: another base's hidden states
    written = (folder / FEATURES_FILE).stat().st_mtime_ns
    with pytest.raises(ValueError) as refused:
        cache_features(other, tokenizer, dataset, folder, max_length=MAX_LENGTH)
    assert str(refused.value) == (
        f"--feature-cache {folder} holds features of another base model config ({keys}); choose another folder "
        "(or delete this one)."
    )
    assert (folder / FEATURES_FILE).stat().st_mtime_ns == written


def test_a_copied_or_reloaded_base_reuses_the_cache(tmp_path, capsys):
    """What saving and loading a base changes in its config (its name, `architectures`, `dtype`) is not the model."""
    model, tokenizer = head_model()
    dataset = tokenized(tokenizer)
    cache_features(model, tokenizer, dataset, tmp_path / "features", max_length=MAX_LENGTH)
    model.get_base_model().save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = get_peft_model(base, BackAttnConfig(**HEADS["softmax residual"]))
    reloaded.get_base_model().config.use_cache = False  # a runtime switch, not the model
    again = cache_features(
        reloaded, AutoTokenizer.from_pretrained(tmp_path / "base"), dataset, tmp_path / "features",
        max_length=MAX_LENGTH,
    )  # fmt: skip
    assert not again.computed and "Feature cache: reusing" in capsys.readouterr().out


def test_a_base_in_another_dtype_is_refused(tmp_path):
    model, tokenizer = head_model()
    dataset = tokenized(tokenizer, count=4)
    cache_features(model, tokenizer, dataset, tmp_path / "features", max_length=MAX_LENGTH)
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"holds features of a float32 base \(this one is bfloat16\); choose"):
        cache_features(model, tokenizer, dataset, tmp_path / "features", max_length=MAX_LENGTH)


def other_normalizer(tokenizer) -> None:
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()  # the same vocabulary, other tokens for "Tom"


def other_chat_template(tokenizer) -> None:
    tokenizer.chat_template = tokenizer.chat_template.replace("<|assistant|>", "<|assistant|>\n")


def other_special_tokens(tokenizer) -> None:
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>"]})  # <|assistant|> no longer special


@pytest.mark.parametrize(
    "change, keys",
    [
        (other_normalizer, "state"),
        (other_chat_template, "chat_template"),
        (other_special_tokens, "special_tokens.all"),
    ],
    ids=["normalizer", "chat-template", "special-tokens"],
)
def test_another_tokenizer_with_the_same_vocabulary_is_refused(tmp_path, change, keys):
    """The data's tokens are checked too; the tokenizer is compared whole: its files, chat template, special tokens."""
    model, tokenizer = head_model()
    dataset = tokenized(tokenizer, count=4)
    cache_features(model, tokenizer, dataset, tmp_path / "features", max_length=MAX_LENGTH)
    vocabulary = tokenizer.get_vocab()
    change(tokenizer)
    assert tokenizer.get_vocab() == vocabulary
    with pytest.raises(ValueError, match=rf"holds features of another tokenizer \({keys}\); choose another folder"):
        cache_features(model, tokenizer, dataset, tmp_path / "features", max_length=MAX_LENGTH)


def test_another_attention_mask_is_other_data(tmp_path):
    """The pass reads the attention mask as well as the tokens, so it is part of the data's fingerprint."""
    model, tokenizer = head_model()
    dataset = tokenized(tokenizer, count=4)
    cache_features(model, tokenizer, dataset, tmp_path / "features", max_length=MAX_LENGTH)
    masked = dataset.map(lambda row: {"attention_mask": [0] + row["attention_mask"][1:]})
    with pytest.raises(ValueError, match="holds features of other training data; choose another folder"):
        cache_features(model, tokenizer, masked, tmp_path / "features", max_length=MAX_LENGTH)


def flip_bytes(path: Path, count: int = 4000) -> None:
    """The lowest bit of `count` bytes flipped, from the first row's hidden state on: the same size, the same Arrow
    layout (every record batch still reads), other values."""
    data = bytearray(path.read_bytes())
    first_row = open_features(path.parent, verify=False).rows[0]["hidden"].numpy().tobytes()
    start = data.index(first_row)
    data[start : start + count] = bytes(byte ^ 1 for byte in data[start : start + count])
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_the_cache_are_refused_before_training(tmp_path):
    """Issue 18 item 6: same size, other bytes: the checksum recorded at writing time no longer matches."""
    model, tokenizer = head_model()
    examples = generate_examples(8)
    train_head(model, tokenizer, examples, options(tmp_path, max_steps=1, output_dir=str(tmp_path / "first")))
    cache = tmp_path / "features" / FEATURES_FILE
    rows, size = open_features(cache.parent, verify=False).rows[:], cache.stat().st_size
    flip_bytes(cache)
    damaged = open_features(cache.parent, verify=False).rows[:]  # read as it is, it is a valid cache of other rows
    assert cache.stat().st_size == size and not torch.equal(damaged["hidden"], rows["hidden"])
    again, _ = head_model()
    before = head_weights(again)
    with pytest.raises(ValueError) as refused:
        train_head(again, tokenizer, examples, options(tmp_path, max_steps=1))
    assert str(refused.value) == (
        f"--feature-cache {tmp_path / 'features'} is damaged ({FEATURES_FILE} does not match the sha256 recorded in "
        f"{FINGERPRINT_FILE}); delete it or choose another folder."
    )
    assert not (tmp_path / "head").exists()  # nothing trained, nothing written
    for key, value in head_weights(again).items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="does not match the sha256"):
        open_features(tmp_path / "features")  # opening it directly checks it too


def test_the_recorded_checksum_is_the_files_sha256(tmp_path, capsys):
    """So that `sha256sum features.arrow` checks a cache by hand; a reuse says what its check cost."""
    model, tokenizer = head_model()
    folder = tmp_path / "features"
    cache_features(model, tokenizer, tokenized(tokenizer), folder, max_length=MAX_LENGTH)
    recorded = json.loads((folder / FINGERPRINT_FILE).read_text())["contents"]["checksum"]
    data = (folder / FEATURES_FILE).read_bytes()
    assert recorded == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    capsys.readouterr()
    cache_features(model, tokenizer, tokenized(tokenizer), folder, max_length=MAX_LENGTH)
    assert "checked against its sha256 in " in capsys.readouterr().out


def test_a_raw_head_reuses_a_softmax_cache_and_a_softmax_head_a_raw_one(tmp_path, capsys):
    """The stored softmax weights are an extra: ignored by a raw head; without them a softmax head computes its own."""
    model, tokenizer = head_model(**HEADS["raw residual"])
    report = train_head(model, tokenizer, generate_examples(8), options(tmp_path, max_steps=1))
    assert report.steps == 1
    softmax, _ = head_model(**HEADS["softmax residual"])
    train_head(
        softmax, tokenizer, generate_examples(8), options(tmp_path, max_steps=1, output_dir=str(tmp_path / "b"))
    )
    out = capsys.readouterr().out
    assert "Feature cache: reusing" in out and "the cache holds no softmax weights" in out


def test_many_cheap_epochs_lower_the_loss_and_save_a_head_that_reloads(tmp_path):
    model, tokenizer = head_model(**HEADS["softmax residual"])
    report = train_head(model, tokenizer, generate_examples(16, split="train"), options(tmp_path, epochs=4))
    assert report.steps == 16  # 4 steps of 4 examples' worth per epoch
    assert report.losses[-1] < report.losses[0]
    assert report.feature_seconds is not None

    reloaded = PeftModel.from_pretrained(tiny_chat_llama()[0], tmp_path / "head").eval()
    model.eval()
    ids = torch.tensor([tokenizer("Tom has 3 boxes of 12 pens.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_size_is_printed_before_anything_is_written(tmp_path, capsys, monkeypatch):
    model, tokenizer = head_model()

    def write_nothing(*args, **kwargs):
        assert "Feature cache: " in capsys.readouterr().out  # the size line came first
        raise KeyboardInterrupt

    monkeypatch.setattr(features_module, "_write_features", write_nothing)
    with pytest.raises(KeyboardInterrupt):
        cache_features(model, tokenizer, tokenized(tokenizer), tmp_path / "new" / "features", max_length=MAX_LENGTH)
    assert not (tmp_path / "new").exists()  # an interrupted pass leaves nothing behind


def test_a_full_disk_is_refused_in_one_line_after_the_size_is_printed(tmp_path, capsys, monkeypatch):
    model, tokenizer = head_model()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(features_module.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(ValueError) as refused:
        cache_features(model, tokenizer, tokenized(tokenizer), tmp_path / "features", max_length=MAX_LENGTH)
    message = str(refused.value)
    assert "\n" not in message and "the disk has 1.0 kB free" in message
    size_line = capsys.readouterr().out
    assert "trained positions of 8 examples" in size_line and "(1.0 kB free)" in size_line
    assert not (tmp_path / "features").exists()


def test_a_file_as_the_feature_folder_is_refused_and_nothing_is_left(tmp_path):
    model, tokenizer = head_model()
    a_file = tmp_path / "features"
    a_file.write_text("not a folder")
    with pytest.raises(ValueError) as refused:
        train_head(model, tokenizer, generate_examples(4), options(tmp_path, max_steps=1))
    assert str(refused.value) == f"--feature-cache {a_file} is a file; pass a folder for the cached features."
    assert a_file.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"]  # no output folder either


def test_a_folder_of_other_files_or_the_output_folder_is_refused(tmp_path):
    model, tokenizer = head_model()
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that are no feature cache \(notes.txt\)"):
        train_head(model, tokenizer, generate_examples(4), options(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match="is the --output folder"):
        train_head(
            model,
            tokenizer,
            generate_examples(4),
            options(tmp_path, max_steps=1, feature_cache=str(tmp_path / "head")),
        )


def test_a_killed_pass_is_recomputed(tmp_path):
    model, tokenizer = head_model()
    folder = tmp_path / "features"
    folder.mkdir()
    (folder / FEATURES_FILE).write_bytes(b"cut short")  # no fingerprint.json: the pass never finished
    (folder / ".writing-0123456789abcdef.arrow").write_bytes(b"")
    cached = cache_features(model, tokenizer, tokenized(tokenizer), folder, max_length=MAX_LENGTH)
    assert cached.computed and {p.name for p in folder.iterdir()} == {FEATURES_FILE, FINGERPRINT_FILE}


def test_resuming_a_cached_run_continues_it(tmp_path, capsys):
    examples = generate_examples(16, split="train")
    straight, tokenizer = head_model()
    train_head(straight, tokenizer, examples, options(tmp_path / "straight", max_steps=6, save_steps=2))
    first, _ = head_model()
    train_head(first, tokenizer, examples, options(tmp_path / "resumed", max_steps=4, save_steps=2))
    resumed, _ = head_model()
    report = train_head(
        resumed, tokenizer, examples, options(tmp_path / "resumed", max_steps=6, save_steps=2, resume=True)
    )
    assert report.steps == 6 and "Feature cache: reusing" in capsys.readouterr().out
    expected, got = head_weights(straight), head_weights(resumed)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)

    ordinary, _ = head_model()
    with pytest.raises(ValueError, match="was trained on cached features; resume with --feature-cache"):
        train_head(ordinary, tokenizer, examples, options(tmp_path / "resumed", feature_cache=None, resume=True))


def test_an_ordinary_run_is_not_resumed_on_cached_features(tmp_path):
    model, tokenizer = head_model()
    examples = generate_examples(8)
    train_head(model, tokenizer, examples, options(tmp_path, feature_cache=None, max_steps=2, save_steps=1))
    again, _ = head_model()
    with pytest.raises(ValueError, match="was trained without --feature-cache; resume without it"):
        train_head(again, tokenizer, examples, options(tmp_path, max_steps=4, resume=True))
    assert not (tmp_path / "features").exists()


def test_the_feature_pass_counts_toward_the_time_budget(tmp_path):
    model, tokenizer = head_model()
    report = train_head(model, tokenizer, generate_examples(8), options(tmp_path, epochs=50, time_budget_seconds=1e-3))
    assert report.steps == 1  # the budget was spent before training began: the first step ends the run
    assert os.path.isfile(tmp_path / "head" / "adapter_model.safetensors")


def test_a_bf16_base_is_stored_widened_and_read_back_exactly(tmp_path):
    """Arrow has no bf16: the rows are stored as float32 (exact) and collated back to bf16, bit for bit."""
    model, tokenizer = head_model()
    model.to(torch.bfloat16)
    dataset = tokenized(tokenizer, count=4)
    cached = cache_features(model, tokenizer, dataset, tmp_path / "features", max_length=MAX_LENGTH, batch_size=4)
    contents = cached.fingerprint["contents"]
    assert (contents["hidden_dtype"], contents["stored_dtype"]) == ("bfloat16", "float32")
    assert contents["weighted"]["stored_dtype"] == "float32"

    layer, name = head_layer(model)
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    batch = PaddingCollator.from_tokenizer(tokenizer)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    rows = cached.collator(layer.backattn_heads[name].config)([cached.rows[i] for i in range(cached.positions)])
    assert rows["cached_hidden"].dtype == torch.bfloat16
    assert torch.equal(rows["cached_hidden"], seen[0][trained_positions(batch["labels"])])


def test_a_damaged_cache_is_one_line(tmp_path):
    model, tokenizer = head_model()
    folder = tmp_path / "features"
    cache_features(model, tokenizer, tokenized(tokenizer), folder, max_length=MAX_LENGTH)
    (folder / FEATURES_FILE).write_bytes((folder / FEATURES_FILE).read_bytes()[:100])
    with pytest.raises(ValueError, match=r"features is damaged \(.*\); delete it or choose another folder\.$"):
        cache_features(model, tokenizer, tokenized(tokenizer), folder, max_length=MAX_LENGTH)


def test_user_callbacks_see_every_step_and_can_stop_the_run(tmp_path):
    """`train_head(callbacks=...)` passes HF TrainerCallbacks through to the Trainer, as `Trainer(callbacks=)` does."""

    class StopAtTwo(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)
            control.should_training_stop = state.global_step == 2
            return control

    for feature_cache in (None, "features"):
        model, tokenizer = head_model()
        watcher = StopAtTwo()
        folder = tmp_path / str(feature_cache)
        cache = str(folder / feature_cache) if feature_cache else None
        report = train_head(
            model, tokenizer, generate_examples(8), options(folder, max_steps=5, feature_cache=cache), [watcher]
        )
        assert watcher.steps == [1, 2] and report.steps == 2


# -- contextual heads: one row per example, with the tapped layers' outputs ---------------------------------------

CONTEXT = dict(r=8, init_weights=False, context=True, context_dim=16, context_heads=2)
CONTEXT_HEADS = {
    "softmax, attention": CONTEXT,
    "raw, window of 5": CONTEXT | dict(logit_weighting="raw", context_window=5),
    "taps only": CONTEXT | dict(context_attention=False),
}


def context_model(seed: int = 0, **changes):
    """`head_model` with a contextual head (every weight non-trivial, `W_S` included: the context shows)."""
    return head_model(seed, **(CONTEXT | changes))


def recorded_forward(model, batch):
    """The tapped layers' outputs (B, T, L, d_t) and the output layer's input (B, T, d_in) of one forward."""
    layer, name = head_layer(model)
    tapped = layer.backattn_heads[name].config.context_layers
    return taps_and_final_hidden(model, batch["input_ids"], batch["attention_mask"], tapped)


def test_a_contextual_cache_holds_each_examples_taps_up_to_its_last_trained_position(tmp_path, capsys):
    model, tokenizer = context_model()
    dataset = tokenized(tokenizer, count=6)
    # Computed 4 examples at a time; checked against one forward of all 6, padded to the longest.
    cached = cache_features(model, tokenizer, dataset, tmp_path / "features", max_length=MAX_LENGTH, batch_size=4)
    batch = PaddingCollator.from_tokenizer(tokenizer)([dataset[i] for i in range(len(dataset))])
    taps, hidden = recorded_forward(model, batch)
    trained = trained_positions(batch["labels"])
    spans = [int(row.nonzero().max()) + 1 for row in trained]  # up to each example's last trained position

    assert cached.rows.column_names == ["hidden", "target", "weighted", "taps", "trained", "attention_mask"]
    contents = cached.fingerprint["contents"]
    assert contents["context"] == {
        "layers": [0, 1],
        "width": 32,
        "dtype": "bfloat16",
        "stored_dtype": "int16",
        "examples": 6,
        "positions": sum(spans),
    }  # fmt: skip  (an fp32 base: the context path reads its taps in bf16, and they are stored so)
    assert len(cached.rows) == 6 and cached.positions == contents["positions"] == int(trained.sum())
    for i, row in enumerate(cached.rows):
        span, count = spans[i], int(trained[i].sum())
        stored = features_module._stored_back(row["taps"], torch.bfloat16).reshape(span, 2, 32)
        assert torch.equal(stored, taps[i, :span].to(torch.bfloat16))  # bf16 rounding of what the base computed
        torch.testing.assert_close(torch.tensor(row["hidden"]).reshape(count, 32), hidden[i][trained[i]])
        assert row["trained"].tolist() == trained[i, :span].tolist() and row["attention_mask"].all()
        assert row["target"].tolist() == trained_targets(batch["labels"][i : i + 1]).tolist()
        assert row["weighted"].shape == (count * 32,)
    printed = capsys.readouterr().out
    assert f"and 2 tapped layers x 32 values (bfloat16, as its 16-bit patterns) at {sum(spans):,} positions" in printed
    size = features_module._estimated_bytes(contents)
    assert abs(size - contents["checksum"]["bytes"]) < 0.03 * size  # the printed size is the file's, near enough


def test_bf16_taps_are_stored_as_their_16_bit_patterns_and_read_back_exactly(tmp_path):
    """Arrow has no bf16: a contextual cache stores its raw bits as int16 and views them back, bit for bit."""
    model, tokenizer = context_model()
    model.to(torch.bfloat16)
    dataset = tokenized(tokenizer, count=4)
    cached = cache_features(model, tokenizer, dataset, tmp_path / "features", max_length=MAX_LENGTH, batch_size=4)
    contents = cached.fingerprint["contents"]
    assert (contents["hidden_dtype"], contents["stored_dtype"]) == ("bfloat16", "int16")
    assert (contents["context"]["dtype"], contents["context"]["stored_dtype"]) == ("bfloat16", "int16")
    assert cached.rows[0]["taps"].dtype == np.int16

    batch = PaddingCollator.from_tokenizer(tokenizer)([dataset[i] for i in range(len(dataset))])  # the pass's batch
    taps, hidden = recorded_forward(model, batch)
    layer, name = head_layer(model)
    rows = cached.collator(layer.backattn_heads[name].config)([cached.rows[i] for i in range(len(cached.rows))])
    assert rows["cached_taps"].dtype == rows["cached_hidden"].dtype == torch.bfloat16
    real = rows["cached_attention_mask"].bool()
    assert torch.equal(rows["cached_taps"][real], taps[:, : real.shape[1]][real])
    assert torch.equal(rows["cached_hidden"], hidden[trained_positions(batch["labels"])])

    # Every one of the 65,536 bf16 bit patterns (NaNs, infinities, subnormals) through the file and back.
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    schema = Features({"taps": FeatureList(Value("int16"))}).arrow_schema
    table = features_module._example_table(
        [{"taps": features_module._as_stored(patterns.view(torch.bfloat16))}], schema
    )
    with pyarrow.OSFile(str(tmp_path / "patterns.arrow"), "wb") as sink, pyarrow.ipc.new_stream(sink, schema) as out:
        out.write_table(table)
    stored = ExampleRows(Dataset.from_file(str(tmp_path / "patterns.arrow")))[0]["taps"]
    assert torch.equal(features_module._stored_back(stored, torch.bfloat16).view(torch.int16), patterns)


def left_padded(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch of cached examples with its padding moved to the front of each row."""
    rows = dict(rows)
    shifts = [int(n) for n in rows["cached_attention_mask"].shape[1] - rows["cached_attention_mask"].sum(dim=1)]
    for key in ("cached_taps", "cached_attention_mask", "cached_kept"):
        rows[key] = torch.stack([row.roll(shift, dims=0) for row, shift in zip(rows[key], shifts, strict=True)])
    return rows


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("kind", sorted(CONTEXT_HEADS))
def test_contextual_loss_and_gradients_from_the_cache_equal_the_live_step(kind, padding, tmp_path):
    """At fixed weights, over the same batch as the data collator pads it: the cached forward (context vectors from
    the stored taps, padded either side) gives the live loss and gradients of every head weight."""
    model, tokenizer = context_model(**CONTEXT_HEADS[kind])
    dataset = tokenized(tokenizer)
    cached = cache_features(model, tokenizer, dataset, tmp_path / "features", max_length=MAX_LENGTH, batch_size=3)
    model.train()
    layer, name = head_layer(model)
    trainable = dict((k, p) for k, p in model.named_parameters() if p.requires_grad)
    assert any(".context." in k for k in trainable)

    batch = PaddingCollator.from_tokenizer(tokenizer)([dataset[i] for i in range(len(dataset))])
    with only_trained_positions(layer, batch["labels"]):
        live = scored_positions_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch["labels"]
        )
    live_grads = torch.autograd.grad(live, list(trainable.values()))

    rows = cached.collator(layer.backattn_heads[name].config)([cached.rows[i] for i in range(len(cached.rows))])
    if padding == "left":
        rows = left_padded(rows)
        assert not rows["cached_attention_mask"][:, 0].all()  # some row does start with padding
    labels = rows.pop("labels")
    from_cache = scored_positions_loss(model(**rows), labels)
    cached_grads = torch.autograd.grad(from_cache, list(trainable.values()))

    torch.testing.assert_close(from_cache, live, rtol=1e-5, atol=1e-6)
    for key, got, expected in zip(trainable, cached_grads, live_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=key)


def test_a_cached_run_of_a_contextual_head_takes_the_live_runs_steps(tmp_path, capsys):
    """train_head end to end, two steps of 4 examples from the same weights and seed: the same batches of whole
    examples, the same losses and the same head."""
    examples = generate_examples(8, split="train")
    live, tokenizer = context_model()
    cached, _ = context_model()
    live_report = train_head(live, tokenizer, examples, options(tmp_path / "a", feature_cache=None, max_steps=2))
    report = train_head(cached, tokenizer, examples, options(tmp_path / "b", max_steps=2))
    assert "with their tapped layers [0, 1]" in capsys.readouterr().out
    assert report.steps == 2 and report.feature_seconds is not None
    assert report.losses == pytest.approx(live_report.losses, rel=1e-5)
    assert report.positions_per_step == round(4 * cached_positions(tmp_path / "b" / "features") / 8)
    expected, got = head_weights(live), head_weights(cached)
    assert any(".context." in key for key in expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)
    reloaded = PeftModel.from_pretrained(tiny_chat_llama()[0], tmp_path / "b" / "head").eval()
    cached.eval()
    ids = torch.tensor([tokenizer("Tom has 3 boxes of 12 pens.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, cached(input_ids=ids).logits)


def test_a_cache_of_other_tapped_layers_or_none_is_refused(tmp_path):
    """The stored taps must be the head's: other context_layers, a plain head on a contextual cache and a
    contextual head on a plain one are each refused in one line, and the cache is left as it was."""
    tokenizer = context_model()[1]
    dataset = tokenized(tokenizer)
    contextual, plain = tmp_path / "contextual", tmp_path / "plain"
    cache_features(context_model(context_layers=[1])[0], tokenizer, dataset, contextual, max_length=MAX_LENGTH)
    cache_features(head_model()[0], tokenizer, dataset, plain, max_length=MAX_LENGTH)
    written = {folder: (folder / FEATURES_FILE).stat().st_mtime_ns for folder in (contextual, plain)}
    again = cache_features(
        context_model(context_layers=[-1])[0], tokenizer, dataset, contextual, max_length=MAX_LENGTH
    )
    assert not again.computed  # -1 is layer 1 of 2: the same taps

    cases = [
        (context_model(context_layers=[0])[0], contextual, "of tapped layers [1], but this head reads layers [0]"),
        (head_model()[0], contextual, "of a contextual head (tapped layers [1]), but this head has no context"),
        (context_model()[0], plain, "without tapped layers (for a head without context), but this head reads layers"),
    ]
    for model, folder, phrase in cases:
        with pytest.raises(ValueError) as refused:
            cache_features(model, tokenizer, dataset, folder, max_length=MAX_LENGTH)
        message = str(refused.value)
        assert (
            "\n" not in message
            and phrase in message
            and message.endswith("choose another folder (or delete this one).")
        )
        layer, name = head_layer(model)
        with pytest.raises(ValueError, match=re.escape(phrase)):
            open_features(folder).collator(layer.backattn_heads[name].config)
    assert {folder: (folder / FEATURES_FILE).stat().st_mtime_ns for folder in (contextual, plain)} == written


def test_the_cached_forward_of_a_contextual_head_refuses_what_it_cannot_use(tmp_path):
    model, tokenizer = context_model()
    cached = cache_features(model, tokenizer, tokenized(tokenizer, count=2), tmp_path / "f", max_length=MAX_LENGTH)
    layer, name = head_layer(model)
    rows = cached.collator(layer.backattn_heads[name].config)([cached.rows[i] for i in range(len(cached.rows))])
    rows.pop("labels")
    hidden = rows["cached_hidden"]
    cases = [
        (dict(cached_hidden=hidden), "Head 'default' is contextual: cached_hidden needs its sequences' tapped layers"),
        (
            {k: v for k, v in rows.items() if k not in ("cached_hidden", "cached_weighted")},
            "is part of a contextual head's cached inputs; pass it with cached_hidden",
        ),
        (
            rows | dict(cached_hidden=hidden[1:], cached_weighted=rows["cached_weighted"][1:]),
            f"cached_kept marks {hidden.shape[0]} positions but cached_hidden holds {hidden.shape[0] - 1} rows",
        ),
        (rows | dict(cached_taps=rows["cached_taps"][:, :, :1]), "cached_taps has shape"),
        (rows | dict(cached_kept=rows["cached_kept"][:, 1:]), "cached_kept has shape"),
    ]
    for inputs, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            model(**inputs)
    plain, _ = head_model()
    with pytest.raises(ValueError, match="is a contextual head's input, but head 'default' has no context"):
        plain(**rows)
