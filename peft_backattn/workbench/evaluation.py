"""Evaluating the base and its heads on math problems: perplexity, exact match, MSE/RMSE, token P/R/F1.

Perplexity is teacher-forced over the target tokens (the worked solution and its final answer). The other metrics
score greedy generations: the final answer extracted from the generated solution against the reference answer,
and the generated solution's tokens against the reference solution's.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..layer import BASE_ADAPTER_NAME
from ..validation import (
    Check,
    check_fields,
    check_option,
    non_negative_int,
    non_negative_number,
    option_name,
    positive_int,
    seed_int,
    true_or_false,
)
from .base_models import check_positions, fit_length
from .data import (
    IGNORE_INDEX,
    PaddingCollator,
    TruncationReport,
    format_prompt,
    pad_token_id,
    prompt_adds_special_tokens,
    tokenize_examples,
)
from .metrics import (
    exact_match,
    extract_answer,
    has_answer_line,
    mean_token_overlap,
    numeric_errors,
    perplexity,
)
from .problems import MathExample
from .progress import Progress

BASE_NAME = "base"  # how results name the frozen base without a head (use_head also takes "__base__")
MAX_LENGTH = 512  # tokens per example for the perplexity where `max_length` is not given (fewer on a smaller base)
_PROGRESS_HELP = "show progress: a bar on a terminal, a line a minute in a log"


@dataclass
class EvalOptions:
    """How to evaluate the base and its heads: the options of `eval` (beside `ModelOptions` and `DataOptions`) and the
    settings of `evaluate` and `evaluate_heads`, which check their keywords as these fields do."""

    heads: list[str] = field(default_factory=list, metadata={"help": "head folders to evaluate (named after them)"})
    base: bool = field(default=True, metadata={"help": "evaluate the base without a head too", "check": true_or_false})
    generation_limit: int | None = field(
        default=None,
        metadata={
            "help": "score generations on the first N problems only; 0: no generation, perplexity only (default: all)",
            "check": non_negative_int.or_none("an integer >= 0 (0: no generation) or None"),
        },
    )
    max_new_tokens: int = field(default=256, metadata={"help": "tokens generated per problem", "check": positive_int})
    batch_size: int = field(default=8, metadata={"help": "problems per batch", "check": positive_int})
    max_length: int | None = field(
        default=None,
        metadata={
            "help": f"tokens per example for perplexity (default: {MAX_LENGTH}, or the base's positions where it "
            "takes fewer)",
            "check": positive_int.or_none("a positive integer, or None for the default"),
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the generator and of shuffling", "check": seed_int})
    output: str | None = field(default=None, metadata={"help": "write the metrics to this JSON file"})
    progress: bool = field(
        default=True, metadata={"help": _PROGRESS_HELP, "flag": "--no-progress", "check": true_or_false}
    )
    time_budget_seconds: float | None = field(
        default=None,
        metadata={
            "help": "stop starting batches when it is spent (see evaluate_heads)",
            "flag": None,
            "check": non_negative_number.or_none(),
        },
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if not (self.base or self.heads):
            raise ValueError("Nothing to evaluate: --no-base without --heads.")

    def for_base(self, config: PretrainedConfig) -> EvalOptions:
        """These options with `max_length` for the base (`fit_length`): given, it is refused beyond the base's
        positions (and the options come back as they are); None becomes MAX_LENGTH tokens, or the base's positions
        where it takes fewer (said in one line)."""
        max_length = fit_length(config, self.max_length, MAX_LENGTH, option_name(EvalOptions, "max_length"))
        return self if max_length == self.max_length else replace(self, max_length=max_length)


@dataclass
class GenerateOptions:
    """What `generate` answers, and how: its options beside `ModelOptions` (`generate_answers` takes them)."""

    problem: str = field(
        metadata={
            "help": "the problem text",
            "check": Check("the text of a problem", lambda value: isinstance(value, str)),
        }
    )
    heads: list[str] = field(default_factory=list, metadata={"help": "head folders to answer with"})
    base: bool = field(
        default=False,
        metadata={
            "help": "also answer with the base alone (without --heads it answers alone)",
            "check": true_or_false,
        },
    )
    max_new_tokens: int = field(default=256, metadata={"help": "tokens to generate", "check": positive_int})
    temperature: float | None = field(
        default=None,
        metadata={
            "help": "sample at this temperature; 0 means greedy (default: greedy)",
            "check": non_negative_number.or_none(),
        },
    )
    top_k: int | None = field(
        default=None,
        metadata={
            "help": "sample from the k most likely tokens (at temperature 1 unless given)",
            "check": positive_int.or_none(),
        },
    )
    seed: int = field(default=0, metadata={"help": "sampling seed", "check": seed_int})
    progress: bool = field(
        default=True, metadata={"help": _PROGRESS_HELP, "flag": "--no-progress", "check": true_or_false}
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.problem.strip():
            raise ValueError("--problem is empty; pass the text of a problem.")

    def sampling(self) -> dict:
        """`generate`'s sampling keywords: none (greedy) unless a temperature above 0 or a top-k is given."""
        if self.temperature == 0 or (self.temperature is None and self.top_k is None):
            return {}
        sampling = {"do_sample": True, "temperature": self.temperature or 1.0}
        if self.top_k is not None:
            sampling["top_k"] = self.top_k
        return sampling


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one model (the base or one head) on one set of problems."""

    perplexity: float
    exact_match: float | None  # None (like precision, recall and F1) when no generation was scored
    mse: float | None
    rmse: float | None
    precision: float | None
    recall: float | None
    f1: float | None
    n: int  # problems whose generations were scored
    target_tokens: int  # tokens behind the perplexity
    numeric_pairs: int  # answer pairs behind MSE/RMSE
    unparsed_answers: int  # generations with no numeric answer where the reference has one (not in MSE/RMSE)
    truncated: int  # examples cut to max_length (of all given; counted, never silent)
    perplexity_problems: int  # problems behind the perplexity (all, unless a time budget ran out)
    answer_lines: float | None = None  # share of generations with a parseable `#### N` line (None: none scored)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def target_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MathExample],
    *,
    max_length: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[float, int, TruncationReport]:
    """Summed negative log-likelihood (nats) of the target tokens, their count, and what truncation did.

    `max_length` None is MAX_LENGTH tokens, or the base's positions where it takes fewer (`EvalOptions.for_base`)."""
    options = EvalOptions(max_length=max_length, batch_size=batch_size, progress=progress).for_base(model.config)
    max_length = options.max_length
    dataset, report = tokenize_examples(examples, tokenizer, max_length)
    collate = PaddingCollator.from_tokenizer(tokenizer)
    device = _device(model)
    total_nll, total_tokens = 0.0, 0
    batches = range(0, len(dataset), batch_size)
    with Progress(len(batches), "perplexity", enabled=progress) as shown:
        for start in batches:
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            nll, tokens = _batch_nll(model, batch, device)
            total_nll, total_tokens = total_nll + nll, total_tokens + tokens
            shown.update(1)
    return total_nll, total_tokens, report


def _batch_nll(model: PreTrainedModel, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[float, int]:
    """Summed NLL of one padded batch's target tokens, and their count."""
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    labels = batch["labels"].to(device)[:, 1:]  # position t predicts token t + 1
    shifted = logits[:, :-1].float().transpose(1, 2)  # (B, V, T - 1), as cross_entropy wants
    nll = F.cross_entropy(shifted, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return nll.item(), int((labels != IGNORE_INDEX).sum())


@torch.no_grad()
def generate_solutions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    adapter_names: Sequence[str] | None = None,
    progress: bool = True,
    **generation_kwargs,
) -> list[str]:
    """Generated solutions for `problems` (greedy unless sampling options are given), decoded without prompts.

    `adapter_names` (one per problem) runs a different head per problem in the same batches. `progress` shows the
    problems done, the tokens generated per second and the time left. A prompt whose tokens and `max_new_tokens`
    together exceed the base's position limit is refused before anything is generated.
    """
    check_option(EvalOptions, "batch_size", batch_size)
    check_option(EvalOptions, "max_new_tokens", max_new_tokens)
    check_generation_length(model.config, tokenizer, problems, max_new_tokens)
    outputs: list[str] = []
    start_time, new_token_count = time.monotonic(), 0
    with Progress(len(problems), "generating", unit="problem", enabled=progress) as shown:
        for start in range(0, len(problems), batch_size):
            names = None if adapter_names is None else list(adapter_names[start : start + batch_size])
            texts, tokens = _generate_batch(
                model, tokenizer, problems[start : start + batch_size], max_new_tokens, names, generation_kwargs
            )
            outputs += texts
            new_token_count += tokens
            shown.update(len(texts), tokens_per_s=new_token_count / max(time.monotonic() - start_time, 1e-9))
    return outputs


def generate_answers(
    base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, options: GenerateOptions
) -> dict[str, str]:
    """What `generate` answers: `options.problem` answered by each head of `options.heads`, loaded onto `base`, and
    by the base alone with `options.base` (or without heads), in one batch, sampled as `options.sampling()` says."""
    torch.manual_seed(options.seed)
    settings = dict(max_new_tokens=options.max_new_tokens, progress=options.progress, **options.sampling())
    if not options.heads:
        return {BASE_NAME: generate_solutions(base, tokenizer, [options.problem], **settings)[0]}
    model, names = load_heads(base, options.heads)
    shown = ([BASE_NAME] if options.base else []) + names
    adapter_names = [BASE_ADAPTER_NAME if name == BASE_NAME else name for name in shown]
    answers = generate_solutions(
        model, tokenizer, [options.problem] * len(shown), adapter_names=adapter_names, **settings
    )
    return dict(zip(shown, answers, strict=True))


@torch.no_grad()
def _generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[str],
    max_new_tokens: int,
    adapter_names: list[str] | None,
    generation_kwargs: dict,
) -> tuple[list[str], int]:
    """One batch of solutions, decoded without their prompts, and the number of tokens generated (padding not)."""
    prompts = [format_prompt(p, tokenizer) for p in problems]
    with _left_padding(tokenizer):
        encoded = tokenizer(
            prompts, return_tensors="pt", padding=True, add_special_tokens=prompt_adds_special_tokens(tokenizer)
        ).to(_device(model))
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_token_id(tokenizer), **generation_kwargs)
    kwargs.setdefault("do_sample", False)
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names
    generated = model.generate(**encoded, **kwargs)
    new_tokens = generated[:, encoded["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return texts, int((new_tokens != pad_token_id(tokenizer)).sum())


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MathExample],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    max_length: int | None = None,
    generation_limit: int | None = None,
    progress: bool = True,
    time_budget_seconds: float | None = None,
) -> EvalResult:
    """All metrics of the model as it is now (its active head, or the base inside `disable_adapter()`).

    Perplexity covers every example and generation (the slow part) the first `generation_limit` of them (all when
    None), unless `time_budget_seconds` runs out first (see `evaluate_heads`). `generation_limit=0` skips
    generation: exact match, precision, recall and F1 are then None, not 0. The keywords are `EvalOptions` fields,
    checked as they are; `max_length` None is MAX_LENGTH tokens, or the base's positions where it takes fewer.
    """
    options = EvalOptions(
        max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length,
        generation_limit=generation_limit, progress=progress, time_budget_seconds=time_budget_seconds,
    )  # fmt: skip
    return _evaluate_together(model, tokenizer, examples, {"model": nullcontext}, options)["model"]


def evaluate_heads(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MathExample],
    heads: Sequence[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    max_length: int | None = None,
    generation_limit: int | None = None,
    progress: bool = True,
    time_budget_seconds: float | None = None,
) -> dict[str, EvalResult]:
    """Evaluate several heads of one PeftModel (and the base, named 'base') on the same problems.

    The models take turns batch by batch (a head switch costs milliseconds), so that every model is always scored
    on the same problems. With `time_budget_seconds`, no perplexity batch starts after a third of the budget (the
    first always runs, so that perplexity is defined) and no generation batch after all of it (a spent budget skips
    generation: `n` is 0 and exact match None): the budget bounds the evaluation to within one batch per model, and
    `n` and `perplexity_problems` say how far it got. The keywords are as for `evaluate`.
    """
    options = EvalOptions(
        max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length,
        generation_limit=generation_limit, progress=progress, time_budget_seconds=time_budget_seconds,
    )  # fmt: skip
    return _evaluate_heads(model, tokenizer, examples, heads, options)


def evaluate_base_and_heads(
    base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[MathExample], options: EvalOptions
) -> dict[str, EvalResult]:
    """What `eval` measures: the base (unless `options.base` is False) and each head of `options.heads`, loaded onto
    `base` (`load_heads`), on the same problems with `options`' settings."""
    if not options.heads:
        return {BASE_NAME: _evaluate_together(base, tokenizer, examples, {BASE_NAME: nullcontext}, options)[BASE_NAME]}
    model, names = load_heads(base, options.heads)
    return _evaluate_heads(model, tokenizer, examples, ([BASE_NAME] if options.base else []) + names, options)


def _evaluate_heads(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MathExample],
    heads: Sequence[str],
    options: EvalOptions,
) -> dict[str, EvalResult]:
    models = {name: functools.partial(use_head, model, name) for name in heads}
    return _evaluate_together(model, tokenizer, examples, models, options)


def _evaluate_together(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MathExample],
    models: dict[str, Callable[[], AbstractContextManager]],
    options: EvalOptions,
) -> dict[str, EvalResult]:
    """Perplexity, then generation, batch by batch; on each batch every model in turn (entered by its context)."""
    options = options.for_base(model.config)
    generation_limit, max_new_tokens, batch_size = options.generation_limit, options.max_new_tokens, options.batch_size
    max_length, progress = options.max_length, options.progress
    scored = list(examples[:generation_limit]) if generation_limit is not None else list(examples)
    check_generation_length(model.config, tokenizer, [e.problem for e in scored], max_new_tokens)
    start = time.monotonic()
    budget = math.inf if options.time_budget_seconds is None else options.time_budget_seconds

    # Perplexity: teacher-forced NLL of the target tokens, at most a third of the budget.
    dataset, truncation = tokenize_examples(examples, tokenizer, max_length)
    collate = PaddingCollator.from_tokenizer(tokenizer)
    device = _device(model)
    nll = {name: [0.0, 0] for name in models}  # name -> [summed NLL, target tokens]
    batches = range(0, len(dataset), batch_size)
    perplexity_problems = 0
    with Progress(len(batches), "perplexity", enabled=progress) as shown:
        for first in batches:
            if perplexity_problems and time.monotonic() - start >= budget / 3:
                break
            rows = range(first, min(first + batch_size, len(dataset)))
            batch = collate([dataset[i] for i in rows])
            for name, enter in models.items():
                with enter():
                    batch_nll, tokens = _batch_nll(model, batch, device)
                nll[name][0] += batch_nll
                nll[name][1] += tokens
            perplexity_problems += len(rows)
            shown.update(1)

    # Generation: greedy solutions, scored against the references, until the budget is spent.
    solutions: dict[str, list[str]] = {name: [] for name in models}
    generation_start, new_tokens = time.monotonic(), 0
    with Progress(len(scored), "generating", unit="problem", enabled=progress) as shown:
        for first in range(0, len(scored), batch_size):
            if time.monotonic() - start >= budget:
                break
            problems = [e.problem for e in scored[first : first + batch_size]]
            for name, enter in models.items():
                with enter():
                    texts, tokens = _generate_batch(model, tokenizer, problems, max_new_tokens, None, {})
                solutions[name] += texts
                new_tokens += tokens
            shown.update(len(problems), tokens_per_s=new_tokens / max(time.monotonic() - generation_start, 1e-9))
    scored = scored[: len(next(iter(solutions.values()), []))]

    return {name: _result(nll[name], solutions[name], scored, truncation, perplexity_problems) for name in models}


def _result(
    nll: list, solutions: list[str], scored: list[MathExample], truncation: TruncationReport, perplexity_problems: int
) -> EvalResult:
    total_nll, total_tokens = nll
    predicted = [extract_answer(s) for s in solutions]
    references = [e.answer for e in scored]
    errors = numeric_errors(predicted, references)
    overlap = mean_token_overlap(solutions, [e.solution for e in scored])
    generated = bool(scored)
    return EvalResult(
        perplexity=perplexity(total_nll, total_tokens) if total_tokens else math.nan,
        exact_match=exact_match(predicted, references) if generated else None,
        mse=errors.mse,
        rmse=errors.rmse,
        precision=overlap.precision if generated else None,
        recall=overlap.recall if generated else None,
        f1=overlap.f1 if generated else None,
        n=len(scored),
        target_tokens=total_tokens,
        numeric_pairs=errors.n,
        unparsed_answers=errors.n_unparsed,
        truncated=truncation.truncated + truncation.dropped,
        perplexity_problems=perplexity_problems,
        answer_lines=sum(map(has_answer_line, solutions)) / len(solutions) if generated else None,
    )


def check_generation_length(
    config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, problems: Sequence[str], max_new_tokens: int
) -> None:
    """Refuse problems whose prompt plus `max_new_tokens` exceed the base's position limit (`config`'s), naming
    the longest, before anything is generated: models with learned positions fail on them with an IndexError."""
    if not problems:
        return
    prompts = [format_prompt(problem, tokenizer) for problem in problems]
    encoded = tokenizer(prompts, add_special_tokens=prompt_adds_special_tokens(tokenizer))["input_ids"]
    lengths = [len(ids) for ids in encoded]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    prompt = "the prompt" if len(problems) == 1 else f"problem {longest}'s prompt"
    what = f"{prompt} ({lengths[longest]} tokens) plus --max-new-tokens (max_new_tokens) {max_new_tokens}"
    check_positions(config, lengths[longest] + max_new_tokens, what)


def load_heads(base: PreTrainedModel, head_dirs: Sequence[str | os.PathLike]) -> tuple[PeftModel, list[str]]:
    """One frozen base with several saved heads, named after their folders; the first one is active.

    Each head is checked against the base before it is attached (PEFT's `from_pretrained`/`load_adapter`).
    """
    if not head_dirs:
        raise ValueError("No head given; pass at least one head folder.")
    names = head_names(head_dirs)
    model = PeftModel.from_pretrained(base, str(head_dirs[0]), adapter_name=names[0])
    for name, directory in zip(names[1:], head_dirs[1:], strict=True):
        model.load_adapter(str(directory), adapter_name=name)
    model.eval()
    return model, names


def head_names(head_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """The name of each head folder (its last part, with '_' appended to a repeated name or to 'base'), refusing a
    folder without a head; cheap, so that a wrong folder is refused before the base is loaded."""
    names: list[str] = []
    for directory in head_dirs:
        if not (Path(directory) / "adapter_config.json").is_file():
            raise ValueError(f"No head at {directory} (no adapter_config.json); pass a folder written by `train`.")
        name = Path(directory).resolve().name or "head"
        while name in names or name == BASE_NAME:
            name += "_"
        names.append(name)
    return names


@contextmanager
def use_head(model: PeftModel, name: str) -> Iterator[None]:
    """Run `model` with head `name` ('base' or '__base__': no head), restoring the active head afterwards."""
    if name in (BASE_NAME, BASE_ADAPTER_NAME):
        with model.disable_adapter():
            yield
        return
    if name not in model.peft_config:
        raise ValueError(f"Unknown head {name!r}; known heads: {sorted(model.peft_config)} (or {BASE_NAME!r}).")
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON via a temporary file and a rename: `path` holds the old file or the new one, whole, and a failed
    write leaves neither a partial file nor the temporary one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False)
    try:
        with handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
        os.replace(handle.name, path)
    except BaseException:  # a payload that is not JSON, a full disk, a folder at `path`: no temporary file stays
        with contextlib.suppress(FileNotFoundError):
            os.unlink(handle.name)
        raise


def format_table(results: dict[str, EvalResult]) -> str:
    """A plain-text table of the metrics, one row per model."""
    columns = ("perplexity", "exact_match", "rmse", "precision", "recall", "f1", "n")
    rows = [("model", *columns)]
    for name, result in results.items():
        values = result.to_dict()
        rows.append((name, *(_cell(values[c]) for c in columns)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@contextmanager
def _left_padding(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """Decoder-only generation needs the prompts right-aligned."""
    previous = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
