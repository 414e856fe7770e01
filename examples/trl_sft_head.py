"""Train a backattn head with TRL's SFTTrainer: prompt-completion data, loss on the completion only.

Needs TRL 1.10 to 1.14 (`pip install "peft-backattn[trl]"`): TRL 1.15 and later refuse PEFT adapters on the output
layer, and this script stops with one line saying so. The loss is `loss_type="nll"`, which runs the model's own
forward (head included); TRL's default `chunked_nll` reads `lm_head.weight` directly and would skip the head.

    python examples/trl_sft_head.py                                   # embedded SmolLM2-135M-Instruct, synthetic
    python examples/trl_sft_head.py --data ../shared/data/gsm8k/train.jsonl --steps 200 --output runs/trl_head
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datasets import Dataset
from safetensors.torch import load_file
from transformers import set_seed

from peft_backattn import BackAttnConfig
from peft_backattn.workbench.base_models import EMBEDDED_DEFAULT, load_base_model
from peft_backattn.workbench.data import load_problems
from peft_backattn.workbench.trl_recipe import check_trl, installed_trl_version, sft_config, sft_trainer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_DEFAULT, help="base model: a folder, a hub name or the default")
    parser.add_argument("--data", default="synthetic", help="'synthetic', a .jsonl/.json/.parquet file or a hub name")
    parser.add_argument("--problems", type=int, default=1000, help="training problems to load")
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example")
    parser.add_argument("--r", type=int, default=64, help="latent size of the head")
    parser.add_argument("--output", default="runs/trl_head", help="folder for the head and its checkpoints")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the training run")
    args = parser.parse_args()
    try:
        check_trl()  # one line when TRL is missing or refuses output-layer adapters
    except (ImportError, RuntimeError) as error:
        print(f"trl_sft_head.py: error: {error}", file=sys.stderr)
        return 2

    base, tokenizer = load_base_model(args.model)
    problems = load_problems(args.data, limit=args.problems, seed=args.seed)
    # Prompt-completion rows: TRL masks the prompt and trains on the completion (and the eos token it appends).
    rows = [{"prompt": f"Question: {p.problem}\nAnswer:", "completion": f" {p.solution}"} for p in problems]
    print(f"TRL {installed_trl_version()}: {len(rows)} prompt-completion rows")

    set_seed(args.seed)  # the head's initial weights
    config = sft_config(
        args.output, max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=2e-3,
        max_length=args.max_length, logging_steps=max(1, args.steps // 10), save_steps=max(1, args.steps // 2),
        bf16=False, seed=args.seed,
    )  # fmt: skip
    trainer = sft_trainer(base, config, Dataset.from_list(rows), tokenizer, BackAttnConfig(r=args.r))
    trainer.model.print_trainable_parameters()
    result = trainer.train()
    trainer.save_model(args.output)  # the head only (PeftModel.save_pretrained), with its model card

    keys = load_file(Path(args.output) / "adapter_model.safetensors")
    head_only = all(".backattn_heads." in key for key in keys)
    print(f"Trained {result.global_step} steps, training loss {result.training_loss:.3f}")
    print(f"Saved {len(keys)} tensors to {args.output}; head tensors only: {head_only}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
