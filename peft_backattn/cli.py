"""The `peft-backattn` command line: train, eval, generate, demo and serve, each a thin layer over the Python API,
and lm-eval (lm-evaluation-harness's own command line, with the method registered).

Errors the user can fix (a wrong path, an unknown model, a dataset without the needed fields, a head from another
base, an option out of range, a damaged file) print one line, `peft-backattn: error: ...`, and exit with status 2,
without a traceback. Options are checked before anything is loaded or written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

import datasets
import transformers
from transformers import set_seed

from . import __version__
from . import lm_eval as harness
from .config import BackAttnConfig
from .model_card import record_card_details
from .serve import SERVE_EXAMPLES, SERVE_HELP, add_serve_options, run_serve_command
from .validation import add_dataclass_options, given_options
from .vllm.command import VLLM_SERVE_EXAMPLES, VLLM_SERVE_HELP, vllm_serve
from .workbench.base_models import ModelOptions
from .workbench.data import DataOptions
from .workbench.demo import DemoOptions, run_demo
from .workbench.evaluation import (
    EvalOptions,
    GenerateOptions,
    evaluate_base_and_heads,
    format_table,
    generate_answers,
    head_names,
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
    "vllm-serve": VLLM_SERVE_EXAMPLES,
    "lm-eval": """examples:
  peft-backattn lm-eval --model hf --model_args pretrained=BASE,peft=HEAD --tasks gsm8k_local \\
      --metadata gsm8k_dir=../shared/data/gsm8k --limit 200 --output_path results/
  peft-backattn lm-eval --help     (lm-eval's own help: every argument after lm-eval is lm-eval's)""",
}


# Errors the command line turns into one line; anything else is a bug and keeps its traceback. A read or write that
# fails on a damaged file or a full disk raises one of these naming the file (`workbench.saving.FileReadError` and
# `FileWriteError`, raised where the path is known).
_USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError)


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

    def options(sub: argparse.ArgumentParser, title: str, cls: type, **kwargs) -> None:
        add_dataclass_options(
            sub.add_argument_group(f"{title} ({cls.__name__} fields, see docs/api.md)"), cls, **kwargs
        )

    train = command("train", "Fine-tune a head on math problems with the HF Trainer; saves only the head.")
    options(train, "base", ModelOptions)
    options(train, "data", DataOptions)
    options(train, "training", TrainingOptions)
    options(train, "head", BackAttnConfig)

    evaluate = command("eval", "Evaluate the base and heads: perplexity, exact match, MSE/RMSE, token P/R/F1.")
    options(evaluate, "base", ModelOptions)
    options(evaluate, "data", DataOptions, defaults={"split": "test"}, leave_out={"streaming"})
    options(evaluate, "evaluation", EvalOptions)

    generate = command("generate", "Answer a problem with one or several heads, side by side.")
    options(generate, "base", ModelOptions)
    options(generate, "generation", GenerateOptions)

    demo = command("demo", "The main job on the embedded defaults: train, evaluate, save, reload, swap heads.")
    options(demo, "demo", DemoOptions)
    add_serve_options(command("serve", SERVE_HELP))
    command("vllm-serve", VLLM_SERVE_HELP)  # listed here; its arguments are vllm serve's, handled in main()
    command(
        "lm-eval", "Score heads with lm-evaluation-harness: its own arguments, with the backattn method registered."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # every argument after it is lm-eval's, --help included
        quiet_notices()  # lm-eval's own logging and progress bars stay as they are
        return harness.main(argv[1:])
    if argv[:1] == ["vllm-serve"]:  # every argument after it but --head and --heads-dir is vllm serve's
        return vllm_serve(argv[1:])
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


Options = TypeVar("Options")


def _options(cls: type[Options], args: argparse.Namespace) -> Options:
    """The options dataclass `cls` built from what was given on the command line (it checks its values)."""
    return cls(**given_options(cls, args))


def _train(args: argparse.Namespace) -> int:
    base_model, data = _options(ModelOptions, args), _options(DataOptions, args)
    options, config = _options(TrainingOptions, args), _options(BackAttnConfig, args)
    output = Path(options.output_dir)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; pass a folder for the head and its checkpoints.")
    check_writable(output, "--output")  # before anything is loaded: a run must not learn this at its first save
    if options.feature_cache is not None:
        check_feature_folder(options.feature_cache, output)
        check_writable(options.feature_cache, "--feature-cache")
    check_streaming(options, streamed=data.streaming)
    options = options.for_base(base_model.load_config(), say=_is_main_process())
    examples = data.examples(seed=options.seed)
    base, tokenizer = base_model.load()
    set_seed(options.seed)  # the head's initial weights
    model = attach_head(base, config)
    record_card_details(model, training_data=data.describe())
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
    base_model, data, options = _options(ModelOptions, args), _options(DataOptions, args), _options(EvalOptions, args)
    if options.output and Path(options.output).is_dir():
        raise ValueError(f"--output {options.output} is a folder; pass a JSON file name for the metrics.")
    if options.output:
        check_writable(options.output, "--output", file=True)
    head_names(options.heads)  # each folder holds a head, checked before anything is loaded
    options = options.for_base(base_model.load_config())
    examples = data.examples(seed=options.seed)
    base, tokenizer = base_model.load()
    results = evaluate_base_and_heads(base, tokenizer, examples, options)
    print(format_table(results))
    cut = next(iter(results.values())).truncated
    if cut:
        print(
            f"{cut} of {len(examples)} examples were cut to --max-length {options.max_length} tokens for the "
            "perplexity"
        )
    if options.generation_limit == 0:
        print("No generation (--generation-limit 0): exact match, RMSE and token P/R/F1 were not measured")
    if options.output:
        payload = {
            "model": base_model.model,
            "data": data.source,
            "split": data.split,
            "results": {name: result.to_dict() for name, result in results.items()},
        }
        with writing(options.output):
            write_json(options.output, payload)
        print(f"Metrics written to {options.output}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    base_model, options = _options(ModelOptions, args), _options(GenerateOptions, args)
    head_names(options.heads)
    base, tokenizer = base_model.load()
    for name, answer in generate_answers(base, tokenizer, options).items():
        print(f"=== {name} ===\n{answer.strip()}\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    run_demo(_options(DemoOptions, args))
    return 0


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


if __name__ == "__main__":
    sys.exit(main())
