"""Evaluating the base and its heads on math problems: perplexity, exact match, MSE/RMSE, token P/R/F1.

Perplexity is teacher-forced over the target tokens (the worked solution and its final answer). The other metrics
score greedy generations: the final answer extracted from the generated solution against the reference answer,
and the generated solution's tokens against the reference solution's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..layer import BASE_ADAPTER_NAME
from .data import (
    IGNORE_INDEX,
    PaddingCollator,
    TruncationReport,
    format_prompt,
    pad_token_id,
    prompt_adds_special_tokens,
    tokenize_examples,
)
from .metrics import exact_match, extract_answer, mean_token_overlap, numeric_errors, perplexity
from .problems import MathExample

BASE_NAME = "base"  # how results name the frozen base without a head (use_head also takes "__base__")


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one model (the base or one head) on one set of problems."""

    perplexity: float
    exact_match: float
    mse: float | None
    rmse: float | None
    precision: float
    recall: float
    f1: float
    n: int  # problems whose generations were scored
    target_tokens: int  # tokens behind the perplexity
    numeric_pairs: int  # answer pairs behind MSE/RMSE
    unparsed_answers: int  # generations with no numeric answer where the reference has one (not in MSE/RMSE)
    truncated: int  # examples cut to max_length for the perplexity (counted, never silent)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def target_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MathExample],
    *,
    max_length: int = 512,
    batch_size: int = 8,
) -> tuple[float, int, TruncationReport]:
    """Summed negative log-likelihood (nats) of the target tokens, their count, and what truncation did."""
    dataset, report = tokenize_examples(examples, tokenizer, max_length)
    collate = PaddingCollator.from_tokenizer(tokenizer)
    device = _device(model)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        labels = batch["labels"].to(device)[:, 1:]  # position t predicts token t + 1
        nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += int((labels != IGNORE_INDEX).sum())
    return total_nll, total_tokens, report


@torch.no_grad()
def generate_solutions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    adapter_names: Sequence[str] | None = None,
    **generation_kwargs,
) -> list[str]:
    """Generated solutions for `problems` (greedy unless sampling options are given), decoded without prompts.

    `adapter_names` (one per problem) runs a different head per problem in the same batches.
    """
    device = _device(model)
    outputs: list[str] = []
    with _left_padding(tokenizer):
        for start in range(0, len(problems), batch_size):
            prompts = [format_prompt(p, tokenizer) for p in problems[start : start + batch_size]]
            encoded = tokenizer(
                prompts, return_tensors="pt", padding=True, add_special_tokens=prompt_adds_special_tokens(tokenizer)
            ).to(device)
            kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_token_id(tokenizer), **generation_kwargs)
            kwargs.setdefault("do_sample", False)
            if adapter_names is not None:
                kwargs["adapter_names"] = list(adapter_names[start : start + batch_size])
            generated = model.generate(**encoded, **kwargs)
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MathExample],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    max_length: int = 512,
    generation_limit: int | None = None,
) -> EvalResult:
    """All metrics of the model as it is now (its active head, or the base inside `disable_adapter()`).

    Perplexity covers every example; generation (the slow part) covers the first `generation_limit` of them.
    """
    total_nll, total_tokens, truncation = target_nll(
        model, tokenizer, examples, max_length=max_length, batch_size=batch_size
    )
    scored = list(examples[:generation_limit]) if generation_limit is not None else list(examples)
    solutions = generate_solutions(
        model, tokenizer, [e.problem for e in scored], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    predicted = [extract_answer(s) for s in solutions]
    references = [e.answer for e in scored]
    errors = numeric_errors(predicted, references)
    overlap = mean_token_overlap(solutions, [e.solution for e in scored])
    return EvalResult(
        perplexity=perplexity(total_nll, total_tokens) if total_tokens else math.nan,
        exact_match=exact_match(predicted, references),
        mse=errors.mse,
        rmse=errors.rmse,
        precision=overlap.precision,
        recall=overlap.recall,
        f1=overlap.f1,
        n=len(scored),
        target_tokens=total_tokens,
        numeric_pairs=errors.n,
        unparsed_answers=errors.n_unparsed,
        truncated=truncation.truncated + truncation.dropped,
    )


def evaluate_heads(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MathExample],
    heads: Sequence[str],
    **kwargs,
) -> dict[str, EvalResult]:
    """Evaluate several heads of one PeftModel (and the base, named 'base') on the same problems."""
    results = {}
    for name in heads:
        with use_head(model, name):
            results[name] = evaluate(model, tokenizer, examples, **kwargs)
    return results


def load_heads(base: PreTrainedModel, head_dirs: Sequence[str | os.PathLike]) -> tuple[PeftModel, list[str]]:
    """One frozen base with several saved heads, named after their folders; the first one is active.

    Each head is checked against the base before it is attached (PEFT's `from_pretrained`/`load_adapter`).
    """
    if not head_dirs:
        raise ValueError("No head given; pass at least one head folder.")
    names: list[str] = []
    for directory in head_dirs:
        if not (Path(directory) / "adapter_config.json").is_file():
            raise ValueError(f"No head at {directory} (no adapter_config.json); pass a folder written by `train`.")
        name = Path(directory).resolve().name or "head"
        while name in names or name == BASE_NAME:
            name += "_"
        names.append(name)
    model = PeftModel.from_pretrained(base, str(head_dirs[0]), adapter_name=names[0])
    for name, directory in zip(names[1:], head_dirs[1:], strict=True):
        model.load_adapter(str(directory), adapter_name=name)
    model.eval()
    return model, names


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
