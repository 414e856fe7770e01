"""Tiny causal LMs built from configs in-process (no hub access), shared by the tests."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
hf_logging.set_verbosity_error()
torch.set_num_threads(2)

VOCAB = 97
# The shared math data beside the checkout. CI runs the suite a second time with PEFT_BACKATTN_HIDE_SHARED=1, as a
# newcomer's clone has no ../shared: tests that need it must skip, and no other test may compute anything else.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if os.environ.get("PEFT_BACKATTN_HIDE_SHARED"):
    SHARED_DATA = Path(__file__).resolve().parent / "no-shared-data (hidden by PEFT_BACKATTN_HIDE_SHARED)"


def tiny_gpt2() -> GPT2LMHeadModel:
    """GPT-2 with tied input and output embeddings."""
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return GPT2LMHeadModel(config)


def tiny_llama() -> LlamaForCausalLM:
    """Llama with untied embeddings."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return LlamaForCausalLM(config)


def tiny_opt() -> OPTForCausalLM:
    """OPT whose embeddings (16 wide) are narrower than its hidden states (32), tied to the output layer."""
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        word_embed_proj_dim=16,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return OPTForCausalLM(config)


def tiny_neox() -> GPTNeoXForCausalLM:
    """GPT-NeoX, untied."""
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return GPTNeoXForCausalLM(config)


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "opt": tiny_opt, "neox": tiny_neox}


def build(arch: str = "gpt2", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[arch]().eval()


@pytest.fixture(params=sorted(BUILDERS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(2, VOCAB, (3, 9), generator=generator)


def randomize_heads(model: torch.nn.Module, seed: int = 0, std: float = 0.5) -> None:
    """Give every head weight a clearly non-trivial value, so that heads differ from each other and the base."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".backattn_heads." in name:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
                param.add_(noise.to(param.dtype))


def requires_shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared math data ({SHARED_DATA}) is absent")
    return SHARED_DATA


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|user|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@functools.cache
def _trained_tokenizer_json() -> str:
    """A small byte-level BPE trained on the package's synthetic math problems.

    Always the same text, whether or not ../shared exists: a tokenizer trained on other text gives other lengths,
    and tests that count truncated rows would then pass here and fail on a newcomer's clone.
    """
    from peft_backattn.workbench.synthetic import generate_examples

    lines = [text for ex in generate_examples(300) for text in (ex.problem, ex.solution)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(lines + ["Question:", "Answer:"], trainer)
    # Like Llama's tokenizer: special tokens mean a BOS in front.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return tokenizer.to_str()


def build_tokenizer(chat: bool = False, pad: bool = True) -> PreTrainedTokenizerFast:
    """A real fast tokenizer built in-process; `chat` gives it a chat template, `pad` a pad token."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if pad else None,
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_lm(directory: Path, chat: bool = True, hidden: int = 32, seed: int = 0, positions: int = 512) -> Path:
    """A tiny Llama whose vocabulary is the in-process tokenizer's, saved with it: a `--model` folder that takes
    `positions` tokens."""
    tokenizer = build_tokenizer(chat=chat)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm") / "model")
