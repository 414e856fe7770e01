"""The `peft-backattn` command line: train, eval, generate, demo and serve, each a thin layer over the Python API,
and lm-eval (lm-evaluation-harness's own command line, with the method registered).

Errors the user can fix (a wrong path, an unknown model, a dataset without the needed fields, a head from another
base, an option out of range, a damaged file) print one line, `peft-backattn: error: ...`, and exit with status 2,
without a traceback. Options are checked before anything is loaded or written.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import datasets
import torch
import transformers
from transformers import set_seed

from . import __version__
from . import lm_eval as harness
from .config import BackAttnConfig
from .layer import BASE_ADAPTER_NAME
from .model_card import record_card_details
from .serve import SERVE_EXAMPLES, SERVE_HELP, add_serve_options, run_serve_command
from .validation import add_dataclass_options, given_options
from .workbench.base_models import EMBEDDED_DEFAULT, check_positions, load_base_config, load_base_model
from .workbench.data import describe_source, load_problems, stream_examples
from .workbench.demo import EVAL_MINUTES, TRAIN_MINUTES, run_demo
from .workbench.evaluation import (
    BASE_NAME,
    check_generation_length,
    evaluate,
    evaluate_heads,
    format_table,
    generate_solutions,
    head_names,
    load_heads,
    write_json,
)
from .workbench.features import check_feature_folder
from .workbench.plots import missing_plots_message, plot_loss_curve, plots_available
from .workbench.saving import check_writable, writing
from .workbench.training import TrainingOptions, attach_head, check_streaming, train_head

# (message pattern, category) of warnings that dependencies raise about their own code, filtered by the command line.
QUIET_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # transformers calls its own deprecated property when PEFT wraps a model
    ("`is_gradient_checkpointing` is deprecated", FutureWarning),
)
# (logger, message prefix) of log records that dependencies write about their own set-up, filtered likewise.
QUIET_RECORDS: tuple[tuple[str, str], ...] = (
    # When DeepSpeed is installed, accelerate imports it inside the Trainer (to unwrap a DeepSpeed engine), and
    # DeepSpeed's logger (its own handler, on stdout) tells on a machine without GPUs which accelerator it picked.
    ("DeepSpeed", "Setting accelerator to CPU"),
)

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
    "serve": SERVE_EXAMPLES,
    "lm-eval": """examples:
  peft-backattn lm-eval --model hf --model_args pretrained=BASE,peft=HEAD --tasks gsm8k_local \\
      --metadata gsm8k_dir=../shared/data/gsm8k --limit 200 --output_path results/
  peft-backattn lm-eval --help     (lm-eval's own help: every argument after lm-eval is lm-eval's)""",
}


# Errors the command line turns into one line; anything else is a bug and keeps its traceback. A read or write that
# fails on a damaged file or a full disk raises one of these naming the file (`workbench.saving.FileReadError` and
# `FileWriteError`, raised where the path is known).
_USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError)


def _number(text: str, kind: Callable[[str], int | float], test: Callable[[Any], bool], expected: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
    if not test(value):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def seed_int(text: str) -> int:
    return _number(text, int, lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32 - 1")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr, like every other error of the command line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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

    def data_options(sub: argparse.ArgumentParser, split: str, seed: bool = True) -> None:
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
        sub.add_argument(
            "--limit", type=positive_int, help="use the first N examples (synthetic: generate N; default 1000)"
        )
        if seed:
            sub.add_argument("--seed", type=seed_int, default=0, help="seed of the generator and of shuffling")

    train = command("train", "Fine-tune a head on math problems with the HF Trainer; saves only the head.")
    model_options(train)
    data_options(train, split="train", seed=False)  # --seed comes with the training options
    train.add_argument(
        "--streaming", action="store_true",
        help="read a local file or hub dataset lazily as training consumes it (needs --steps)",
    )  # fmt: skip
    add_dataclass_options(
        train.add_argument_group("training (TrainingOptions fields, see docs/api.md)"), TrainingOptions
    )
    add_dataclass_options(train.add_argument_group("head (BackAttnConfig fields, see docs/api.md)"), BackAttnConfig)

    evaluate = command("eval", "Evaluate the base and heads: perplexity, exact match, MSE/RMSE, token P/R/F1.")
    model_options(evaluate)
    data_options(evaluate, split="test")
    evaluate.add_argument("--heads", nargs="*", default=[], help="head folders to evaluate (named after them)")
    evaluate.add_argument("--no-base", action="store_true", help="do not evaluate the base without a head")
    evaluate.add_argument(
        "--generation-limit",
        type=non_negative_int,
        help="score generations on the first N problems only; 0: no generation, perplexity only (default: all)",
    )
    evaluate.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens generated per problem")
    evaluate.add_argument("--batch-size", type=positive_int, default=8, help="problems per batch")
    evaluate.add_argument("--max-length", type=positive_int, default=512, help="tokens per example for perplexity")
    evaluate.add_argument("--output", help="write the metrics to this JSON file")

    generate = command("generate", "Answer a problem with one or several heads, side by side.")
    model_options(generate)
    generate.add_argument("--heads", nargs="*", default=[], help="head folders to answer with")
    generate.add_argument("--base", action="store_true", help="also answer with the base alone")
    generate.add_argument("--problem", required=True, help="the problem text")
    generate.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens to generate")
    generate.add_argument(
        "--temperature", type=non_negative_float, help="sample at this temperature; 0 means greedy (default: greedy)"
    )
    generate.add_argument(
        "--top-k", type=positive_int, help="sample from the k most likely tokens (at temperature 1 unless given)"
    )
    generate.add_argument("--seed", type=seed_int, default=0, help="sampling seed")

    demo = command("demo", "The main job on the embedded defaults: train, evaluate, save, reload, swap heads.")
    demo.add_argument("--output-dir", default="runs/demo", help="where the heads and demo_results.json go")
    demo.add_argument("--model", default=EMBEDDED_DEFAULT, help="base model (default: the embedded SmolLM2)")
    demo.add_argument(
        "--train-minutes", type=positive_float, default=TRAIN_MINUTES, help="training time of the math head"
    )
    demo.add_argument(
        "--eval-minutes", type=non_negative_float, default=EVAL_MINUTES,
        help=f"time budget of the evaluation of base and head (default {EVAL_MINUTES:g}); it says what was cut",
    )  # fmt: skip
    demo.add_argument("--seed", type=seed_int, default=0, help="seed of data, head init and shuffling")
    add_serve_options(command("serve", SERVE_HELP))
    command(
        "lm-eval", "Score heads with lm-evaluation-harness: its own arguments, with the backattn method registered."
    )
    for sub in (evaluate, generate, demo):
        sub.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # every argument after it is lm-eval's, --help included
        quiet_notices()  # lm-eval's own logging and progress bars stay as they are
        return harness.main(argv[1:])
    quiet_dependencies()
    args = build_parser().parse_args(argv)
    try:
        commands = {"train": _train, "eval": _eval, "generate": _generate, "demo": _demo, "serve": run_serve_command}
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("peft-backattn: interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as error:
        print(f"peft-backattn: error: {describe_error(error)}", file=sys.stderr)
        return 2


def describe_error(error: BaseException) -> str:
    """The one line printed for an error the user can act on: its message, on one line."""
    return _flat(str(error)) or type(error).__name__


def _flat(text: str) -> str:
    return " ".join(text.split())


def quiet_dependencies() -> None:
    """Keep what dependencies print about their own internals off the user's stderr, so that stderr holds only
    what the user caused. Each filter names one logger or one message; nothing else is hidden."""
    quiet_notices()
    # The bars transformers and datasets draw while loading weights or preparing a split: the command line says
    # itself what it loads. The Trainer's progress bar is not theirs and stays.
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


class _DropRecord(logging.Filter):
    """Drops the records of one logger whose message starts with one prefix; lets every other record pass."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_RECORD_FILTERS = {name: _DropRecord(prefix) for name, prefix in QUIET_RECORDS}


def quiet_notices() -> None:
    """Filter the QUIET_WARNINGS and QUIET_RECORDS (a logger need not exist yet: a library that creates it later
    with `logging.getLogger(name)` gets the same logger, filter included)."""
    for pattern, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, record_filter in _RECORD_FILTERS.items():
        logging.getLogger(name).addFilter(record_filter)  # adding the same filter twice keeps one


def _train(args: argparse.Namespace) -> int:
    options = TrainingOptions(**given_options(TrainingOptions, args))
    config = BackAttnConfig(**given_options(BackAttnConfig, args))
    output = Path(options.output_dir)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; pass a folder for the head and its checkpoints.")
    check_writable(output, "--output")  # before anything is loaded: a run must not learn this at its first save
    if options.feature_cache is not None:
        check_feature_folder(options.feature_cache, output)
        check_writable(options.feature_cache, "--feature-cache")
    check_streaming(options, streamed=args.streaming)
    check_positions(load_base_config(args.model), options.max_length, "--max-length (max_length)")
    source = {"fields": args.fields, "split": args.split, "limit": args.limit, "subset": args.subset}
    examples = stream_examples(args.data, **source) if args.streaming else _load_data(args, seed=options.seed)
    base, tokenizer = load_base_model(args.model, load_in_4bit=args.load_in_4bit)
    set_seed(options.seed)  # the head's initial weights
    model = attach_head(base, config)
    record_card_details(model, training_data=describe_source(args.data, streaming=args.streaming, **source))
    report = train_head(model, tokenizer, examples, options)
    if _is_main_process():
        print(
            f"Trained {report.steps} steps on {report.processes} process{'es' if report.processes > 1 else ''} "
            f"in {report.seconds:.0f} s (loss {_loss(report.first_loss)} -> "
            f"{_loss(report.final_loss)}); head saved to {options.output_dir}"
        )
        if not report.losses:
            print("No loss was logged (fewer steps than --logging-steps), so there is no loss curve to draw.")
        elif plots_available():
            steps = [options.logging_steps * (i + 1) for i in range(len(report.losses))]
            picture = plot_loss_curve(report.losses, Path(options.output_dir) / "training_loss.png", steps=steps)
            print(f"Loss curve: {picture}")
        else:
            print(missing_plots_message())
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.no_base and not args.heads:
        raise ValueError("Nothing to evaluate: --no-base without --heads.")
    if args.output and Path(args.output).is_dir():
        raise ValueError(f"--output {args.output} is a folder; pass a JSON file name for the metrics.")
    if args.output:
        check_writable(args.output, "--output", file=True)
    head_names(args.heads)  # each folder holds a head, checked before anything is loaded
    check_positions(load_base_config(args.model), args.max_length, "--max-length")
    examples = _load_data(args, seed=args.seed)
    base, tokenizer = load_base_model(args.model, load_in_4bit=args.load_in_4bit)
    scored = examples if args.generation_limit is None else examples[: args.generation_limit]
    check_generation_length(base.config, tokenizer, [e.problem for e in scored], args.max_new_tokens)
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_length=args.max_length,
        generation_limit=args.generation_limit,
        progress=not args.no_progress,
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
    if args.generation_limit == 0:
        print("No generation (--generation-limit 0): exact match, RMSE and token P/R/F1 were not measured")
    if args.output:
        payload = {
            "model": args.model,
            "data": args.data,
            "split": args.split,
            "results": {name: result.to_dict() for name, result in results.items()},
        }
        with writing(args.output):
            write_json(args.output, payload)
        print(f"Metrics written to {args.output}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    if not args.heads and not args.base:
        args.base = True
    if not args.problem.strip():
        raise ValueError("--problem is empty; pass the text of a problem.")
    head_names(args.heads)
    base, tokenizer = load_base_model(args.model, load_in_4bit=args.load_in_4bit)
    check_generation_length(base.config, tokenizer, [args.problem], args.max_new_tokens)
    sampling = {}
    if args.temperature != 0 and (args.temperature is not None or args.top_k is not None):
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
            adapter_names=adapter_names, progress=not args.no_progress, **sampling,
        )  # fmt: skip
    else:
        shown = [BASE_NAME]
        answers = generate_solutions(
            base, tokenizer, [args.problem], max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
            **sampling,
        )  # fmt: skip
    for name, answer in zip(shown, answers, strict=True):
        print(f"=== {name} ===\n{answer.strip()}\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    run_demo(
        output_dir=args.output_dir, train_minutes=args.train_minutes, seed=args.seed, model_name=args.model,
        eval_minutes=args.eval_minutes, progress=not args.no_progress,
    )  # fmt: skip
    return 0


def _load_data(args: argparse.Namespace, seed: int) -> list:
    return load_problems(
        args.data, fields=args.fields, split=args.split, limit=args.limit, seed=seed, subset=args.subset
    )


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


if __name__ == "__main__":
    sys.exit(main())
