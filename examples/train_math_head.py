"""Train a math head on a frozen base, then compare base and head on held-out problems.

Shows the library flow behind `peft-backattn train` and `peft-backattn eval`: load the base, load problems, attach
a head, train it with the HF Trainer (`train_head` saves only the head), and evaluate base and head side by side.

    python examples/train_math_head.py                      # embedded SmolLM2-135M-Instruct, synthetic problems
    python examples/train_math_head.py --data train.jsonl --eval-data test.jsonl --steps 500

A local file has a single split, so a local `--data` file needs a held-out `--eval-data` file; for 'synthetic' and
hub datasets the held-out problems come from `--eval-split`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from transformers import set_seed

from peft_backattn import BackAttnConfig
from peft_backattn.workbench.base_models import EMBEDDED_DEFAULT, load_base_model
from peft_backattn.workbench.data import load_problems
from peft_backattn.workbench.evaluation import BASE_NAME, evaluate_heads, format_table
from peft_backattn.workbench.training import TrainingOptions, attach_head, train_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_DEFAULT, help="base model: a folder, a hub name or the default")
    parser.add_argument("--data", default="synthetic", help="'synthetic', a .jsonl/.json/.parquet file or a hub name")
    parser.add_argument("--fields", help="field mapping or schema name (default: detected from the columns)")
    parser.add_argument("--eval-data", help="held-out problems (default: --data, split --eval-split)")
    parser.add_argument("--eval-split", default="test", help="split of the held-out problems")
    parser.add_argument("--train-problems", type=int, default=2000, help="training problems to load")
    parser.add_argument("--eval-problems", type=int, default=48, help="held-out problems for perplexity")
    parser.add_argument("--generation-limit", type=int, default=16, help="held-out problems to answer by generation")
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
    parser.add_argument("--r", type=int, default=64, help="latent size of the head")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens generated per answer")
    parser.add_argument("--output", default="runs/math_head", help="folder for the head and its checkpoints")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the training run")
    args = parser.parse_args()
    if args.eval_data is None and os.path.isfile(args.data):
        parser.error("a local --data file has one split; pass a held-out file with --eval-data")

    base, tokenizer = load_base_model(args.model)
    train = load_problems(args.data, fields=args.fields, limit=args.train_problems, seed=args.seed)
    source = args.eval_data or args.data
    held_out = load_problems(
        source, fields=args.fields, split=args.eval_split, limit=args.eval_problems, seed=args.seed
    )
    print(f"{len(train)} training problems, {len(held_out)} held-out problems")

    set_seed(args.seed)  # the head's initial weights come from torch's global generator
    model = attach_head(base, BackAttnConfig(r=args.r), adapter_name="math")
    model.print_trainable_parameters()
    options = TrainingOptions(
        output_dir=args.output,
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=2e-3,
        seed=args.seed,
        logging_steps=max(1, args.steps // 10),
        progress_bar=False,
    )
    report = train_head(model, tokenizer, train, options)  # also writes the head to args.output
    loss = f"{report.first_loss:.3f} -> {report.final_loss:.3f}"
    print(f"Trained {report.steps} steps in {report.seconds:.0f} s, training loss {loss}")

    model.eval()
    settings = dict(max_new_tokens=args.max_new_tokens, generation_limit=args.generation_limit)
    results = evaluate_heads(model, tokenizer, held_out, [BASE_NAME, "math"], **settings)
    print(format_table(results))
    size = (Path(report.head_dir) / "adapter_model.safetensors").stat().st_size
    print(f"Head saved to {report.head_dir} ({size / 1e3:.1f} kB of weights)")


if __name__ == "__main__":
    main()
