"""The head inside Hugging Face's Trainer, and on a 4-bit (bitsandbytes nf4) base."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from peft_backattn import BackAttnConfig, BackAttnLayer, reference_logits


def token_dataset(rows: int = 16, length: int = 12) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (rows, length), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def head_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if ".backattn_heads." in k}


def run_trainer(output_dir, max_steps: int, resume: bool = False):
    torch.manual_seed(0)
    model = get_peft_model(build("gpt2"), BackAttnConfig(r=8, logit_weighting="softmax"))
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset())
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def test_trainer_trains_the_head_and_checkpoints_only_head_tensors(tmp_path):
    trainer, model = run_trainer(tmp_path / "run", max_steps=4)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    for step in (2, 4):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        assert not (checkpoint / "model.safetensors").exists()
        saved = load_file(checkpoint / "adapter_model.safetensors")
        assert set(saved) == {
            f"base_model.model.lm_head.backattn_heads.{name}"
            for name in ("norm_scale", "value_proj", "key_proj", "query_proj")
        }


def test_resuming_from_a_checkpoint_continues_the_same_run(tmp_path):
    _, straight = run_trainer(tmp_path / "straight", max_steps=6)
    run_trainer(tmp_path / "resumed", max_steps=4)
    trainer, resumed = run_trainer(tmp_path / "resumed", max_steps=6, resume=True)
    assert trainer.state.global_step == 6
    expected, got = head_weights(straight), head_weights(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)


def four_bit_base(directory, packed: bool):
    """A tiny Llama in nf4, every quantised layer at least 64 wide: bitsandbytes' CPU repack for AVX512-BF16 needs
    input sizes that are multiples of its quantisation block (64) and output sizes that are multiples of 32."""
    from bitsandbytes.nn import Linear4bit
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization, device_map="cpu")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers, "the base was not quantised"
    for layer in layers:
        # bitsandbytes chooses per layer, from has_avx512bf16(), whether to repack the weights for that CPU path
        # on the first forward without gradient; forcing it on needs the instruction set, forcing it off does not.
        layer.support_avx512bf16_for_cpu = packed
    return model, layers


@pytest.mark.parametrize("packed", [False, True], ids=["plain-4bit", "avx512bf16-packed"])
def test_head_on_a_four_bit_base(packed, tmp_path):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    if packed and not bitsandbytes.functional.has_avx512bf16():
        pytest.skip("this CPU lacks AVX512-BF16, so bitsandbytes has no packed 4-bit path here")
    base, quantized = four_bit_base(tmp_path / "base", packed)
    model = get_peft_model(base, BackAttnConfig(r=8, logit_weighting="raw", init_weights=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".backattn_heads." in n for n in trainable)

    batch = token_dataset(rows=2, length=10)[:]
    input_ids, labels = torch.tensor(batch["input_ids"]), torch.tensor(batch["labels"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # The path asked for is the one taken (the base is in eval mode and its inputs need no gradient).
    assert all(getattr(m.weight.quant_state, "packing_format_for_cpu", False) == packed for m in quantized)

    layer = next(m for m in model.modules() if isinstance(m, BackAttnLayer))
    hidden = torch.randn(2, 3, layer.in_features)
    with torch.no_grad():
        expected = reference_logits(hidden, layer.base_layer, layer.embedding_weight, layer.backattn_heads["default"])
        torch.testing.assert_close(layer(hidden).double(), expected, atol=2e-4, rtol=1e-4)

    model.save_pretrained(tmp_path / "head")
    saved = load_file(tmp_path / "head" / "adapter_model.safetensors")
    assert all(".backattn_heads." in key for key in saved)
