"""Training only where the loss is: the same loss and gradients as the full forward, for a fraction of the rows."""

from __future__ import annotations

import pytest
import torch
from conftest import build, build_tokenizer, randomize_heads
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from peft_backattn import BackAttnConfig
from peft_backattn.workbench.data import IGNORE_INDEX, PaddingCollator, tokenize_examples
from peft_backattn.workbench.scored_positions import (
    ScoredPositionsTrainer,
    only_trained_positions,
    scored_positions_loss,
    trained_positions,
)
from peft_backattn.workbench.synthetic import generate_examples

METHODS = {
    "softmax residual head": lambda: BackAttnConfig(r=8, init_weights=False),
    "raw residual head": lambda: BackAttnConfig(r=8, logit_weighting="raw", init_weights=False),
    "raw replace head": lambda: BackAttnConfig(r=8, logit_weighting="raw", combine="replace"),
    "mixture of 2 heads": lambda: BackAttnConfig(r=8, num_heads=2, init_weights=False),
    "lora": lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
}


def tiny_chat_llama(seed: int = 0) -> tuple[LlamaForCausalLM, object]:
    tokenizer = build_tokenizer(chat=True)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config), tokenizer


def real_batch(tokenizer, rows: int = 4) -> dict[str, torch.Tensor]:
    """Prompts masked, padding at the end: the batches the Trainer builds from math problems."""
    dataset, _ = tokenize_examples(generate_examples(rows, split="train"), tokenizer, max_length=128)
    return PaddingCollator.from_tokenizer(tokenizer)([dataset[i] for i in range(rows)])


def test_trained_positions_are_those_before_a_labelled_token():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX], [IGNORE_INDEX, 7, 8, 9, 10]])
    assert trained_positions(labels).tolist() == [
        [False, True, True, False, False],
        [True, True, True, True, False],
    ]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_loss_and_gradients_equal_the_full_forward(method):
    base, tokenizer = tiny_chat_llama()
    model = get_peft_model(base, METHODS[method]())
    if method != "lora":
        randomize_heads(model, std=0.3)
    model.train()
    batch = real_batch(tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]

    full = model(**batch).loss
    full_grads = torch.autograd.grad(full, trainable)
    with only_trained_positions(model.get_output_embeddings(), batch["labels"]):
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    n = int(trained_positions(batch["labels"]).sum())
    assert outputs.logits.shape == (n, len(tokenizer))  # only the trained rows reached the output layer
    assert n < batch["input_ids"].numel()  # prompts and padding were left out
    scored = scored_positions_loss(outputs, batch["labels"])
    scored_grads = torch.autograd.grad(scored, trainable)

    torch.testing.assert_close(scored, full, rtol=1e-5, atol=1e-6)
    for got, expected in zip(scored_grads, full_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_full_logits_are_shifted_and_masked_like_the_model_loss():
    base, tokenizer = tiny_chat_llama()
    batch = real_batch(tokenizer)
    outputs = base(**batch)
    torch.testing.assert_close(scored_positions_loss(outputs, batch["labels"]), outputs.loss, rtol=1e-5, atol=1e-6)
    count = int(trained_positions(batch["labels"]).sum())
    torch.testing.assert_close(
        scored_positions_loss(outputs, batch["labels"], num_items_in_batch=2 * count), outputs.loss / 2
    )


def test_hidden_states_of_another_shape_are_refused():
    model = get_peft_model(build("gpt2"), BackAttnConfig(r=4))
    labels = torch.zeros(2, 5, dtype=torch.long)
    with only_trained_positions(model.get_output_embeddings(), labels), pytest.raises(ValueError, match="of shape"):
        model(input_ids=torch.ones(2, 7, dtype=torch.long))


def test_collected_rows_are_the_trained_hidden_states_and_the_output_layer_gets_none():
    """The feature pass's use: the trained rows go to `collect`, and no vocabulary product is computed."""
    base, tokenizer = tiny_chat_llama()
    model = get_peft_model(base, BackAttnConfig(r=8))
    batch = real_batch(tokenizer)
    layer = model.get_output_embeddings()
    seen, collected = [], []
    with torch.no_grad(), only_trained_positions(layer, batch["labels"], collect=collected.append):
        handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))  # what the layer gets
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    handle.remove()
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    (rows,) = collected
    torch.testing.assert_close(rows, full.hidden_states[-1][trained_positions(batch["labels"])])
    assert seen[0].shape == (0, rows.shape[1]) and logits.shape == (0, len(tokenizer))


def test_the_hook_is_removed_after_use():
    model = get_peft_model(build("gpt2"), BackAttnConfig(r=4))
    layer = model.get_output_embeddings()
    with only_trained_positions(layer, torch.zeros(1, 3, dtype=torch.long)):
        assert len(layer._forward_pre_hooks) == 1
    assert len(layer._forward_pre_hooks) == 0


def train_two_steps(trainer_class, tmp_path) -> dict[str, torch.Tensor]:
    base, tokenizer = tiny_chat_llama()
    torch.manual_seed(1)
    model = get_peft_model(base, BackAttnConfig(r=8))
    dataset, _ = tokenize_examples(generate_examples(8, split="train"), tokenizer, max_length=128)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True, save_strategy="no", lr_scheduler_type="constant",
        gradient_accumulation_steps=2, remove_unused_columns=False,
    )  # fmt: skip
    collator = PaddingCollator.from_tokenizer(tokenizer)
    trainer_class(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_the_trainer_takes_the_same_steps_as_with_the_full_forward(tmp_path):
    """Two optimiser steps of two accumulated batches each: num_items_in_batch scaling included."""
    full = train_two_steps(Trainer, tmp_path / "full")
    scored = train_two_steps(ScoredPositionsTrainer, tmp_path / "scored")
    assert full.keys() == scored.keys()
    query = next(name for name in full if name.endswith("query_proj"))
    assert full[query].abs().sum() > 0  # W_Q starts at zero: the steps were taken
    for name in full:
        torch.testing.assert_close(scored[name], full[name], rtol=1e-4, atol=1e-6)
