"""Training only where the loss is: the same loss and gradients as the full forward, for a fraction of the rows."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build, build_tokenizer, randomize_heads
from peft import LoraConfig, get_peft_model
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from peft_backattn import BackAttnConfig
from peft_backattn.cli import build_parser
from peft_backattn.model_card import card_details
from peft_backattn.validation import given_options
from peft_backattn.workbench.data import IGNORE_INDEX, PaddingCollator, tokenize_examples
from peft_backattn.workbench.features import FeatureCollator
from peft_backattn.workbench.scored_positions import (
    ScoredPositionsTrainer,
    kl_to_base_sum,
    only_trained_positions,
    scored_positions_loss,
    trained_positions,
    trained_targets,
)
from peft_backattn.workbench.synthetic import generate_examples
from peft_backattn.workbench.training import TrainingOptions, train_head

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


# ---- the KL term toward the frozen base (kl_to_base) -------------------------------------------------------------

KL_HEADS = {
    "softmax residual head": lambda: BackAttnConfig(r=8, init_weights=False),
    "raw replace head": lambda: BackAttnConfig(r=8, logit_weighting="raw", combine="replace"),
    "mixture of 2 heads": lambda: BackAttnConfig(r=8, num_heads=2, init_weights=False),
}


def scoring_trainer(model, tmp_path, kl_to_base: float = 0.0) -> ScoredPositionsTrainer:
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
        remove_unused_columns=False,
    )  # fmt: skip
    return ScoredPositionsTrainer(model=model, args=args, kl_to_base=kl_to_base)


def head_on_chat_llama(config: BackAttnConfig, randomize: bool = True):
    base, tokenizer = tiny_chat_llama()
    model = get_peft_model(base, config)
    if randomize:
        randomize_heads(model, std=0.3)
    model.train()
    return model, tokenizer


def naive_loss_with_kl(model, batch, kl_to_base: float) -> torch.Tensor:
    """Two full forwards, the base's (head disabled) and the model's, and CE + λ KL(p_base || p_model) by hand."""
    mask = trained_positions(batch["labels"])
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask]
    outputs = model(**batch)  # the model's own causal-LM loss: the mean cross-entropy of the trained positions
    log_p_model = torch.log_softmax(outputs.logits[mask].float(), dim=-1)
    log_p_base = torch.log_softmax(base_logits.float(), dim=-1)
    kl = (log_p_base.exp() * (log_p_base - log_p_model)).sum()
    return outputs.loss + kl_to_base * kl / mask.sum()


@pytest.mark.parametrize("head", sorted(KL_HEADS))
def test_the_kl_term_equals_the_naive_reference_in_value_and_gradients(head, tmp_path):
    model, tokenizer = head_on_chat_llama(KL_HEADS[head]())
    batch = real_batch(tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    expected = naive_loss_with_kl(model, batch, kl_to_base=0.7)
    expected_grads = torch.autograd.grad(expected, trainable)

    loss = scoring_trainer(model, tmp_path, kl_to_base=0.7).compute_loss(model, dict(batch))
    grads = torch.autograd.grad(loss, trainable)

    assert loss > naive_loss_with_kl(model, batch, kl_to_base=0.0) + 1e-3  # the term is there, and not negligible
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def count_calls(module: torch.nn.Module, calls: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda *_: calls.append(1))


def test_without_the_kl_term_the_loss_is_exactly_the_old_one_and_nothing_extra_runs(tmp_path):
    model, tokenizer = head_on_chat_llama(KL_HEADS["softmax residual head"]())
    batch = real_batch(tokenizer)
    trainer = scoring_trainer(model, tmp_path)
    assert trainer.compute_loss_func is scored_positions_loss
    layer = model.get_output_embeddings()
    with only_trained_positions(layer, batch["labels"]):
        old = scored_positions_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch["labels"]
        )

    calls = {0.0: [], 0.5: []}
    for weight, seen in calls.items():
        handle = count_calls(layer.get_base_layer(), seen)
        loss = scoring_trainer(model, tmp_path, kl_to_base=weight).compute_loss(model, dict(batch))
        handle.remove()
        if weight == 0.0:
            assert torch.equal(loss, old)
    # a residual head reads the base logits once; the KL term costs one more vocabulary product, not a base forward
    assert (len(calls[0.0]), len(calls[0.5])) == (1, 2)
    assert not layer._forward_hooks and not layer._forward_pre_hooks  # every hook was removed after the step


def tiny_soft_capped_gemma2() -> tuple[Gemma2ForCausalLM, object]:
    """A base that rescales its logits after the output layer: Gemma 2's soft-capping, strong enough to matter."""
    tokenizer = build_tokenizer(chat=True)
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512, final_logit_softcapping=0.2,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return Gemma2ForCausalLM(config), tokenizer


@pytest.mark.parametrize("build_base", [tiny_chat_llama, tiny_soft_capped_gemma2], ids=["llama", "soft-capped gemma2"])
def test_an_untrained_residual_head_is_the_base_so_its_kl_is_zero(build_base, tmp_path):
    """Also where the model rescales the output layer's logits: the term compares the output layer's, both sides."""
    base, tokenizer = build_base()
    model = get_peft_model(base, BackAttnConfig(r=8))  # W_Q starts at zero: the head's logits are the base's
    model.train()
    batch = real_batch(tokenizer)
    plain = scoring_trainer(model, tmp_path).compute_loss(model, dict(batch))
    with_kl = scoring_trainer(model, tmp_path, kl_to_base=10.0).compute_loss(model, dict(batch))
    torch.testing.assert_close(with_kl, plain, rtol=0, atol=1e-6)
    logits = torch.randn(5, 11)
    assert kl_to_base_sum(logits, logits + 3.0).abs() < 1e-5  # a softmax does not see a shift


@pytest.mark.parametrize("weighted", [False, True], ids=["hidden rows", "hidden rows and softmax weights"])
def test_the_kl_term_on_cached_features_equals_the_token_batch(weighted, tmp_path):
    """Cached rows reach the head without the output layer's hooks (with `cached_weighted`, not even its forward):
    the base side comes from `cached_hidden` itself."""
    model, tokenizer = head_on_chat_llama(KL_HEADS["softmax residual head"]())
    batch = real_batch(tokenizer)
    layer, name = model.get_output_embeddings(), "default"
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainer = scoring_trainer(model, tmp_path, kl_to_base=0.7)
    ordinary = trainer.compute_loss(model, dict(batch))
    ordinary_grads = torch.autograd.grad(ordinary, trainable)

    kept = []
    with torch.no_grad(), only_trained_positions(layer, batch["labels"], collect=kept.append):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    (hidden,) = kept
    targets = trained_targets(batch["labels"])
    with torch.no_grad():
        weights = layer.weighted_embedding(name, hidden)
    rows = [{"hidden": hidden[i], "target": targets[i], "weighted": weights[i]} for i in range(len(targets))]
    cached = FeatureCollator(hidden.dtype, use_weighted=weighted)(rows)
    from_cache = trainer.compute_loss(model, cached)
    cached_grads = torch.autograd.grad(from_cache, trainable)

    torch.testing.assert_close(from_cache, ordinary, rtol=1e-5, atol=1e-6)
    for got, want in zip(cached_grads, ordinary_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_the_kl_term_needs_a_backattn_head(tmp_path):
    base, tokenizer = tiny_chat_llama()
    lora = get_peft_model(base, METHODS["lora"]())
    with pytest.raises(ValueError) as error:
        scoring_trainer(lora, tmp_path / "trainer", kl_to_base=0.5)
    message = str(error.value)
    assert message.startswith("--kl-to-base (kl_to_base) keeps a backattn head near its base, but this model's output")
    assert "Linear, not a backattn head" in message and "\n" not in message
    scoring_trainer(lora, tmp_path / "trainer")  # without the term, LoRA trains through the same trainer

    options = TrainingOptions(output_dir=str(tmp_path / "head"), max_steps=1, kl_to_base=0.5, progress_bar=False)
    with pytest.raises(ValueError, match=r"^--kl-to-base \(kl_to_base\) keeps a backattn head"):
        train_head(lora, tokenizer, generate_examples(4, split="train"), options)
    assert not (tmp_path / "head").exists()  # refused before anything was written


@pytest.mark.parametrize("weight", [-1.0, math.nan, math.inf, True])
def test_a_kl_weight_that_is_no_finite_number_at_least_0_is_refused(weight, tmp_path):
    model, _ = head_on_chat_llama(BackAttnConfig(r=8), randomize=False)
    expected = f"--kl-to-base (kl_to_base) must be a finite number >= 0 (0: off), got {weight!r}."
    with pytest.raises(ValueError) as from_options:
        TrainingOptions(output_dir=str(tmp_path / "head"), kl_to_base=weight)
    with pytest.raises(ValueError) as from_trainer:
        scoring_trainer(model, tmp_path, kl_to_base=weight)
    assert str(from_options.value) == str(from_trainer.value) == expected


def test_the_command_line_passes_kl_to_base_to_the_training_options():
    args = build_parser().parse_args(["train", "--data", "synthetic", "--output", "head", "--kl-to-base", "0.25"])
    assert TrainingOptions(**given_options(TrainingOptions, args)).kl_to_base == 0.25
    args = build_parser().parse_args(["train", "--data", "synthetic", "--output", "head"])
    assert TrainingOptions(**given_options(TrainingOptions, args)).kl_to_base == 0.0


def held_out_kl(model, tokenizer) -> float:
    """Mean KL(p_base || p_model) per trained position of held-out problems (the test split)."""
    dataset, _ = tokenize_examples(generate_examples(8, split="test"), tokenizer, max_length=128)
    batch = PaddingCollator.from_tokenizer(tokenizer)([dataset[i] for i in range(len(dataset))])
    mask = trained_positions(batch["labels"])
    model.eval()
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        head = model(**inputs).logits[mask]
        with model.disable_adapter():
            base = model(**inputs).logits[mask]
    return float(kl_to_base_sum(head, base) / mask.sum())


def train_with_kl(weight: float, tmp_path):
    base, tokenizer = tiny_chat_llama()
    torch.manual_seed(0)
    model = get_peft_model(base, BackAttnConfig(r=8))
    options = TrainingOptions(
        output_dir=str(tmp_path / f"kl-{weight}"), max_steps=6, batch_size=4, learning_rate=3e-2, max_length=128,
        kl_to_base=weight, progress_bar=False, save_final=False, save_steps=1000, logging_steps=1,
    )  # fmt: skip
    report = train_head(model, tokenizer, generate_examples(24, split="train"), options)
    return model, tokenizer, report


def test_training_with_the_kl_term_stays_nearer_the_base_on_held_out_problems(tmp_path, capsys):
    """train_head, 6 steps at the same lr and seed: with weight 10 the head moves a tenth as far from the base (it
    measured 0.0014 against 0.045 nats per position), and its model card says it was trained so."""
    free, tokenizer, _ = train_with_kl(0.0, tmp_path)
    held, _, report = train_with_kl(10.0, tmp_path)
    assert report.steps == 6
    moved, kept = held_out_kl(free, tokenizer), held_out_kl(held, tokenizer)
    assert moved > 1e-2  # the steps moved the head away from the base
    assert kept < 0.1 * moved
    assert card_details(held, "default")["training"]["KL-to-base weight"] == 10.0
    assert "KL-to-base weight" not in card_details(free, "default")["training"]
