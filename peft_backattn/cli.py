"""The `peft-backattn` command line: train, eval, generate and demo, each a thin layer over the Python API.

Errors the user can fix (a wrong path, an unknown model, a dataset without the needed fields, a head from another
base) print one line, `peft-backattn: error: ...`, and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__

EXAMPLES = {
    "train": """examples:
  peft-backattn train --data synthetic --limit 2000 --output math_head --time-budget 300
  peft-backattn train --model gpt2 --data ../shared/data/gsm8k/train.jsonl --output gsm8k_head --steps 500
  peft-backattn train --data nvidia/OpenMathInstruct-2 --split train_1M --limit 20000 --output omi_head
  accelerate launch --multi_gpu --num_processes 2 -m peft_backattn.cli train --data synthetic --output math_head
  (without GPUs, --multi_gpu starts the processes on the CPU with the gloo backend)""",
    "eval": """examples:
  peft-backattn eval --heads math_head --data synthetic --split test --limit 200 --output results.json
  peft-backattn eval --heads math_head code_head --no-base --data ../shared/data/gsm8k/test.jsonl --limit 100""",
    "generate": """examples:
  peft-backattn generate --heads math_head --problem "Tom has 3 boxes of 12 pens. How many pens?"
  peft-backattn generate --heads math_head other_head --base --problem "What is 15% of 80?\"""",
    "demo": """examples:
  peft-backattn demo
  peft-backattn demo --output-dir runs/demo --train-minutes 3""",
}


HEAD_OPTIONS = {"r": int, "logit_weighting": str, "combine": str, "num_heads": int, "query_activation": str,
                "chunk_size": int}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from .base_models import EMBEDDED_DEFAULT
    from .config import COMBINE_MODES, LOGIT_WEIGHTINGS, QUERY_ACTIVATIONS, BackAttnConfig

    parser = argparse.ArgumentParser(
        prog="peft-backattn",
        description="Train, evaluate and swap backward-attention output heads on a frozen causal LM.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def model_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--model",
            default=EMBEDDED_DEFAULT,
            help=f"base model: a hub name, a local folder, or {EMBEDDED_DEFAULT!r} (default; needs no hub access)",
        )
        sub.add_argument("--load-in-4bit", action="store_true", help="quantise the base to bitsandbytes nf4")

    def data_options(sub: argparse.ArgumentParser, split: str) -> None:
        sub.add_argument(
            "--data",
            required=True,
            help="'synthetic' (embedded word-problem generator), a .jsonl/.json/.parquet file, or a hub dataset",
        )
        sub.add_argument(
            "--fields",
            help="field mapping 'problem=COL,solution=COL[,answer=COL]', or a schema name: "
            "openmathinstruct2, gsm8k, math500 (default: detected from the columns)",
        )
        sub.add_argument("--split", default=split, help=f"split of a hub dataset or of 'synthetic' (default {split})")
        sub.add_argument(
            "--subset", help="configuration of a hub dataset that has several, e.g. 'main' for openai/gsm8k"
        )
        sub.add_argument("--limit", type=int, help="use the first N examples (synthetic: generate N; default 1000)")
        sub.add_argument("--seed", type=int, default=0, help="seed of the generator, shuffling and head init")

    train = command("train", "Fine-tune a head on math problems with the HF Trainer; saves only the head.")
    model_options(train)
    data_options(train, split="train")
    train.add_argument("--output", required=True, help="folder for the head and its checkpoints")
    train.add_argument("--overwrite", action="store_true", help="replace a head already in --output")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    head = train.add_argument_group("head (BackAttnConfig fields; defaults are the config's, see docs/api.md)")
    for name, kind in HEAD_OPTIONS.items():
        spec = BackAttnConfig.__dataclass_fields__[name]
        choices = {"logit_weighting": LOGIT_WEIGHTINGS, "combine": COMBINE_MODES}.get(name)
        choices = QUERY_ACTIVATIONS if name == "query_activation" else choices
        head.add_argument(
            "--" + name.replace("_", "-"), type=kind, choices=choices,
            help=f"{spec.metadata['help']} (default: {spec.default})",
        )  # fmt: skip
    optimisation = train.add_argument_group("optimisation")
    optimisation.add_argument("--steps", type=int, default=-1, help="optimiser steps (overrides --epochs)")
    optimisation.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    optimisation.add_argument("--time-budget", type=float, help="stop training after this many seconds")
    optimisation.add_argument("--batch-size", type=int, default=8, help="examples per step and process")
    optimisation.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    optimisation.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant)")
    optimisation.add_argument("--max-length", type=int, default=256, help="tokens per example; longer are cut")
    optimisation.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps")
    optimisation.add_argument("--logging-steps", type=int, default=10, help="log the loss every N steps")
    optimisation.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = command("eval", "Evaluate the base and heads: perplexity, exact match, MSE/RMSE, token P/R/F1.")
    model_options(evaluate)
    data_options(evaluate, split="test")
    evaluate.add_argument("--heads", nargs="*", default=[], help="head folders to evaluate (named after them)")
    evaluate.add_argument("--no-base", action="store_true", help="do not evaluate the base without a head")
    evaluate.add_argument("--generation-limit", type=int, help="score generations on the first N problems only")
    evaluate.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per problem")
    evaluate.add_argument("--batch-size", type=int, default=8, help="problems per batch")
    evaluate.add_argument("--max-length", type=int, default=512, help="tokens per example for perplexity")
    evaluate.add_argument("--output", help="write the metrics to this JSON file")

    generate = command("generate", "Answer a problem with one or several heads, side by side.")
    model_options(generate)
    generate.add_argument("--heads", nargs="*", default=[], help="head folders to answer with")
    generate.add_argument("--base", action="store_true", help="also answer with the base alone")
    generate.add_argument("--problem", required=True, help="the problem text")
    generate.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate")
    generate.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    generate.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed")

    demo = command("demo", "The main job on the embedded defaults: train, evaluate, save, reload, swap heads.")
    demo.add_argument("--output-dir", default="runs/demo", help="where the heads and demo_results.json go")
    demo.add_argument("--model", default=EMBEDDED_DEFAULT, help="base model (default: the embedded SmolLM2)")
    demo.add_argument("--train-minutes", type=float, default=3.0, help="training time of the math head")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, head init and shuffling")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": _train, "eval": _eval, "generate": _generate, "demo": _demo}[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"peft-backattn: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peft-backattn: interrupted", file=sys.stderr)
        return 130


def _train(args: argparse.Namespace) -> int:
    from transformers import set_seed

    from .base_models import load_base_model
    from .config import BackAttnConfig
    from .training import TrainingOptions, attach_head, train_head

    output = Path(args.output)
    if (output / "adapter_config.json").exists() and not (args.overwrite or args.resume):
        raise ValueError(f"{output} already holds a head; pass --overwrite, --resume or another --output.")
    head_kwargs = {name: getattr(args, name) for name in HEAD_OPTIONS if getattr(args, name) is not None}
    config = BackAttnConfig(**head_kwargs)
    examples = _load_data(args)
    base, tokenizer = load_base_model(args.model, load_in_4bit=args.load_in_4bit)
    set_seed(args.seed)  # the head's initial weights
    model = attach_head(base, config)
    options = TrainingOptions(
        output_dir=str(output),
        max_steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        max_length=args.max_length,
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        time_budget_seconds=args.time_budget,
        resume=args.resume,
        progress_bar=not args.no_progress,
    )
    report = train_head(model, tokenizer, examples, options)
    if _is_main_process():
        print(
            f"Trained {report.steps} steps on {report.processes} process{'es' if report.processes > 1 else ''} "
            f"in {report.seconds:.0f} s (loss {_loss(report.first_loss)} -> "
            f"{_loss(report.final_loss)}); head saved to {output}"
        )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .base_models import load_base_model
    from .evaluation import BASE_NAME, evaluate, evaluate_heads, format_table, load_heads, write_json

    if args.no_base and not args.heads:
        raise ValueError("Nothing to evaluate: --no-base without --heads.")
    examples = _load_data(args)
    base, tokenizer = load_base_model(args.model, load_in_4bit=args.load_in_4bit)
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_length=args.max_length,
        generation_limit=args.generation_limit,
    )
    if args.heads:
        model, names = load_heads(base, args.heads)
        results = evaluate_heads(model, tokenizer, examples, ([] if args.no_base else [BASE_NAME]) + names, **settings)
    else:
        results = {BASE_NAME: evaluate(base, tokenizer, examples, **settings)}
    print(format_table(results))
    cut = next(iter(results.values())).truncated
    if cut:
        print(
            f"{cut} of {len(examples)} examples were cut to --max-length {args.max_length} tokens for the perplexity"
        )
    if args.output:
        payload = {
            "model": args.model,
            "data": args.data,
            "split": args.split,
            "results": {name: result.to_dict() for name, result in results.items()},
        }
        write_json(args.output, payload)
        print(f"Metrics written to {args.output}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .base_models import load_base_model
    from .evaluation import BASE_NAME, generate_solutions, load_heads
    from .layer import BASE_ADAPTER_NAME

    if not args.heads and not args.base:
        args.base = True
    base, tokenizer = load_base_model(args.model, load_in_4bit=args.load_in_4bit)
    sampling = {}
    if args.temperature is not None or args.top_k is not None:
        sampling = {"do_sample": True, "temperature": args.temperature or 1.0}
        if args.top_k is not None:
            sampling["top_k"] = args.top_k
    torch.manual_seed(args.seed)
    if args.heads:
        model, names = load_heads(base, args.heads)
        shown = ([BASE_NAME] if args.base else []) + names
        adapter_names = [BASE_ADAPTER_NAME if name == BASE_NAME else name for name in shown]
        answers = generate_solutions(
            model, tokenizer, [args.problem] * len(shown), max_new_tokens=args.max_new_tokens,
            adapter_names=adapter_names, **sampling,
        )  # fmt: skip
    else:
        shown = [BASE_NAME]
        answers = generate_solutions(base, tokenizer, [args.problem], max_new_tokens=args.max_new_tokens, **sampling)
    for name, answer in zip(shown, answers, strict=True):
        print(f"=== {name} ===\n{answer.strip()}\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, train_minutes=args.train_minutes, seed=args.seed, model_name=args.model)
    return 0


def _load_data(args: argparse.Namespace) -> list:
    from .data import load_problems

    return load_problems(
        args.data, fields=args.fields, split=args.split, limit=args.limit, seed=args.seed, subset=args.subset
    )


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


if __name__ == "__main__":
    sys.exit(main())
