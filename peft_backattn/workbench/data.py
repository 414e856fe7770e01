"""Math word problems for supervised fine-tuning: loading rows, merging them into one target, tokenising, batching.

Every data set becomes a list of `MathExample` (problem, worked solution ending in a GSM8K-style `#### answer` line,
answer), so the rest of the library sees one format whatever the source. `tokenize_examples` turns examples into
teacher-forcing features whose labels mask the prompt, and `PaddingCollator` pads them into batches.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow
import pyarrow.parquet
import torch
from datasets import Dataset, Features, IterableDataset, Value, load_dataset
from datasets.exceptions import DatasetGenerationError

from ..validation import check_fields, check_option, positive_int, true_or_false
from .problems import SCHEMAS, FieldMapping, MathExample, parse_field_mapping
from .synthetic import generate_examples

IGNORE_INDEX = -100  # label of positions the loss skips (the default ignore_index of torch's cross-entropy)

# GSM8K's calculator notes, e.g. '<<48/2=24>>'; the solution text repeats each result right after its note.
_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
# A final-answer line, '#### 72'; the last one in a solution holds the answer.
_ANSWER_LINE = re.compile(r"^####[ \t]+(.+?)[ \t]*$", re.MULTILINE)
# A source ending in a file extension ('train.jsonl') is a file; hub names ('openai/gsm8k') do not end in one.
_FILE_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]*$")

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # file extension -> `datasets` builder
# The loggers of those builders: each logs a line about a file it cannot read before raising; the error we raise
# instead names the file, so their line would only repeat it.
_BUILDER_LOGGERS = ("datasets.packaged_modules.json.json", "datasets.packaged_modules.parquet.parquet")
_PLAIN_PROMPT = "Question: {problem}\nAnswer:"  # for tokenizers without a chat template
_FIELDS_HINT = "--fields problem=...,solution=...,answer=..."
LIMIT = positive_int.or_none("a positive number of examples or None")  # rows to read; None: all


def _field(row: Mapping[str, Any], name: str) -> str:
    if row.get(name) is None:
        raise ValueError(f"the row has no value for {name!r} (its fields: {', '.join(row)})")
    return str(row[name]).strip()


def to_example(row: Mapping[str, Any], fields: FieldMapping) -> MathExample:
    """One dataset row -> MathExample, with the answer merged into the solution as its last line.

    Every target then ends in '#### <answer>', whether the data set writes that line (GSM8K) or keeps the answer in
    a column of its own (OpenMathInstruct-2, MATH-500), so a model learns one way of stating the answer.
    """
    problem = _field(row, fields.problem)
    if not problem:
        raise ValueError(f"the row has an empty problem ({fields.problem!r})")
    solution = _CALCULATOR_NOTE.sub("", _field(row, fields.solution))
    answer_lines = _ANSWER_LINE.findall(solution)
    if fields.answer is not None:
        answer = _field(row, fields.answer)
    elif answer_lines:
        answer = answer_lines[-1]
    else:
        raise ValueError(
            f"the solution ({fields.solution!r}) has no '#### <answer>' line and the field mapping names no answer "
            f"column; add answer=COLUMN to {_FIELDS_HINT}"
        )
    if not answer:
        raise ValueError(f"the row has an empty answer ({fields.answer!r})")
    if not answer_lines:
        solution = f"{solution}\n#### {answer}" if solution else f"#### {answer}"
    return MathExample(problem=problem, solution=solution, answer=answer)


def detect_schema(columns: Iterable[str]) -> FieldMapping:
    """The first SCHEMAS entry whose columns are all present."""
    columns = list(columns)
    for mapping in SCHEMAS.values():
        if all(name in columns for name in (mapping.problem, mapping.solution, mapping.answer) if name is not None):
            return mapping
    raise ValueError(
        f"cannot tell which columns hold the problem and the solution (columns found: "
        f"{', '.join(columns) or 'none'}); pass a field mapping ('{_FIELDS_HINT}')"
    )


def _resolve_fields(fields: FieldMapping | str | None, columns: Sequence[str]) -> FieldMapping:
    if isinstance(fields, FieldMapping):
        return fields
    if fields is None:
        return detect_schema(columns)
    if "=" in fields:
        return parse_field_mapping(fields)
    if fields not in SCHEMAS:
        raise ValueError(f"unknown schema {fields!r}; use one of {', '.join(SCHEMAS)} or a mapping '{_FIELDS_HINT}'")
    return SCHEMAS[fields]


def _open_rows(
    source: str, split: str, streaming: bool | None, subset: str | None = None
) -> Dataset | IterableDataset:
    """A `datasets` dataset for a local file or a hub name; hub data is streamed unless `streaming` is False."""
    path = os.path.expanduser(source)
    looks_local = os.path.exists(path) or source.startswith(("/", ".", "~")) or _FILE_EXTENSION.search(source)
    if not looks_local:
        return load_dataset(source, name=subset, split=split, streaming=True if streaming is None else streaming)
    if not os.path.exists(path):
        raise ValueError(
            f"{source} does not exist; pass an existing .jsonl, .json or .parquet file or a Hugging Face dataset name"
        )
    extension = os.path.splitext(path)[1].lower()
    if extension not in _BUILDERS or not os.path.isfile(path):
        raise ValueError(f"cannot read {source}: use a {', '.join(_BUILDERS)} file (one file, not a folder)")
    if os.path.getsize(path) == 0:  # `datasets` fails on an empty file with a bare StopIteration
        raise ValueError(f"{source} is empty; pass a file with examples in it")
    if extension == ".parquet":
        _check_parquet(path, source)
    else:
        _check_json(path, source, extension)
    # Local files have a single split, which `datasets` names 'train'.
    try:
        with _quiet_builders():
            return load_dataset(_BUILDERS[extension], data_files=path, split="train", streaming=bool(streaming))
    except DatasetGenerationError as error:  # what the checks above let through, e.g. a column changing type
        cause = error.__cause__ or error
        raise ValueError(f"cannot read {source}: {_first_line(cause)}") from None


def _check_json(path: str, source: str, extension: str) -> None:
    """Refuse a local JSON Lines file, naming the file and line, where a line is not UTF-8, not JSON or not an
    object: `datasets` fails on those with a traceback that names neither (or a row of its own counting).

    A `.json` file may also be one JSON document (an array of objects), which `datasets` reads whole; it is checked
    as such when its first line is not an object on its own.
    """
    first_line_is_object, problem = None, None
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{source}, line {number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at byte "
                    f"{error.start + 1} of the line); save the file as UTF-8"
                ) from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                problem = problem or f"{source}, line {number}: not valid JSON ({_json_problem(error)})"
                row = None
            if first_line_is_object is None:
                first_line_is_object = isinstance(row, dict)
            if row is not None and not isinstance(row, dict):
                kind = {list: "an array", str: "a string"}.get(type(row), type(row).__name__)
                problem = problem or f"{source}, line {number}: a JSON object per line is expected, got {kind}"
            if problem and first_line_is_object:
                raise ValueError(problem)
    if problem is None:
        return
    if extension == ".json":  # one JSON document, perhaps over several lines
        with open(path, encoding="utf-8-sig") as handle:
            try:
                json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source}, line {error.lineno}: not valid JSON ({_json_problem(error)})") from None
        return
    raise ValueError(problem)


def _json_problem(error: json.JSONDecodeError) -> str:
    """'Expecting value at column 58' (json's own text ends in ' at' where it means a position)."""
    return f"{error.msg.removesuffix(' at')} at column {error.colno}"


def _check_parquet(path: str, source: str) -> None:
    try:
        pyarrow.parquet.read_metadata(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise ValueError(f"cannot read {source}: not a Parquet file or a damaged one ({_first_line(error)})") from None


@contextmanager
def _quiet_builders() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _BUILDER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_examples(
    source: str,
    *,
    fields: FieldMapping | str | None = None,
    split: str = "train",
    limit: int | None = None,
    streaming: bool | None = None,
    subset: str | None = None,
) -> list[MathExample]:
    """The first `limit` examples (all when None) of a local .jsonl/.json/.parquet file or a hub dataset.

    `fields` is a FieldMapping, a SCHEMAS key, a 'problem=...,solution=...' string, or None to detect the schema from
    the columns. `split` and `subset` (a hub dataset's configuration, e.g. 'main' for openai/gsm8k) apply to hub
    datasets only. Hub datasets stream by default, so that taking the first rows
    of a split with millions of them (OpenMathInstruct-2) never downloads the whole split.
    """
    LIMIT(limit, "limit")
    dataset = _open_rows(source, split, streaming, subset)
    rows = iter(dataset)
    columns = dataset.column_names
    if columns is None:  # a streamed dataset may learn its columns only from its first row
        first = next(rows, None)
        columns = [] if first is None else list(first)
        rows = itertools.chain([] if first is None else [first], rows)
    mapping = _resolve_fields(fields, columns)
    needed = [name for name in (mapping.problem, mapping.solution, mapping.answer) if name is not None]
    missing = [name for name in needed if name not in columns]
    if missing:
        raise ValueError(
            f"{source} lacks the field(s) {', '.join(missing)} (its columns: {', '.join(columns) or 'none'}); "
            f"pass a field mapping that names its columns ('{_FIELDS_HINT}')"
        )
    examples = []
    for index, row in enumerate(itertools.islice(rows, limit)):
        try:
            examples.append(to_example(row, mapping))
        except ValueError as error:
            raise ValueError(f"{source}, row {index}: {error}") from None
    if not examples:
        raise ValueError(f"{source} holds no rows; pass a file or split with examples in it")
    return examples


EXAMPLE_FEATURES = Features({name: Value("string") for name in ("problem", "solution", "answer")})


def stream_examples(
    source: str,
    *,
    fields: FieldMapping | str | None = None,
    split: str = "train",
    limit: int | None = None,
    subset: str | None = None,
) -> IterableDataset:
    """`load_examples` without reading the data: a streamed data set of MathExample rows (problem, solution, answer).

    A hub dataset streams from the hub, a local file is read lazily as the rows are consumed. Only the first row is
    read here (to learn the columns of a source that does not declare them); `limit` keeps the first N rows.
    """
    if source == SYNTHETIC_SOURCE:
        raise ValueError("--streaming reads a local file or a hub dataset; the synthetic generator is not streamed")
    LIMIT(limit, "limit")
    dataset = _open_rows(source, split, True, subset)
    columns = dataset.column_names
    if columns is None:  # a streamed dataset may learn its columns only from its first row
        columns = list(next(iter(dataset), None) or [])
    mapping = _resolve_fields(fields, columns)
    missing = [name for name in (mapping.problem, mapping.solution, mapping.answer) if name and name not in columns]
    if missing:
        raise ValueError(
            f"{source} lacks the field(s) {', '.join(missing)} (its columns: {', '.join(columns) or 'none'}); "
            f"pass a field mapping that names its columns ('{_FIELDS_HINT}')"
        )
    if limit is not None:
        dataset = dataset.take(limit)

    def convert(row: Mapping[str, Any], index: int) -> dict[str, str]:
        try:
            return dataclasses.asdict(to_example(row, mapping))
        except ValueError as error:
            raise ValueError(f"{source}, row {index}: {error}") from None

    return dataset.map(convert, with_indices=True, remove_columns=columns, features=EXAMPLE_FEATURES)


SYNTHETIC_SOURCE = (
    "synthetic"  # the embedded generator of arithmetic word problems (peft_backattn.workbench.synthetic)
)


def load_problems(
    source: str,
    *,
    fields: FieldMapping | str | None = None,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    subset: str | None = None,
) -> list[MathExample]:
    """`load_examples`, plus the embedded generator under the name 'synthetic' (`limit` problems, 1000 if None).

    This is what the command line's `--data` takes: 'synthetic', a local file or a hub dataset name.
    """
    check_option(DataOptions, "limit", limit)  # before `limit or 1000` reads 0 as the default
    if source == SYNTHETIC_SOURCE:
        return generate_examples(limit or 1000, split=split, seed=seed)
    return load_examples(source, fields=fields, split=split, limit=limit, subset=subset)


def describe_source(
    source: str,
    *,
    fields: FieldMapping | str | None = None,
    split: str = "train",
    limit: int | None = None,
    subset: str | None = None,
    streaming: bool = False,
) -> str:
    """The training data in one line, as a head's model card names it (the arguments of `load_problems`): a hub
    dataset by its name, a local file by its file name only (the card is published; the path is this machine's)."""
    if source == SYNTHETIC_SOURCE:
        return f"`synthetic`: {limit or 1000} generated arithmetic word problems (split {split})"
    local = os.path.expanduser(source)
    if os.path.exists(local):
        where = f"`{os.path.basename(os.path.normpath(local))}` (a local file)"
    elif subset:
        where = f"`{source}` (configuration {subset}, split {split})"
    else:  # a hub dataset: the split applies
        where = f"`{source}` (split {split})"
    rows = f"the first {limit} rows" if limit else "all rows"
    return f"{where}, {rows}{', streamed' if streaming else ''}; fields: {fields or 'detected'}"


@dataclass
class DataOptions:
    """Where a command's problems come from: the data options of `train` and `eval`, read by `examples()`."""

    source: str = field(
        metadata={
            "help": "'synthetic' (embedded word-problem generator), a .jsonl/.json/.parquet file, or a hub dataset",
            "flag": "--data",
        }
    )
    fields: str | None = field(
        default=None,
        metadata={
            "help": "field mapping 'problem=COL,solution=COL[,answer=COL]', or a schema name: openmathinstruct2, "
            "gsm8k, math500 (default: detected from the columns)"
        },
    )
    split: str = field(default="train", metadata={"help": "split of a hub dataset or of 'synthetic'"})
    subset: str | None = field(
        default=None,
        metadata={"help": "configuration of a hub dataset that has several, e.g. 'main' for openai/gsm8k"},
    )
    limit: int | None = field(
        default=None,
        metadata={"help": "use the first N examples (synthetic: generate N; default 1000)", "check": LIMIT},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "read a local file or hub dataset lazily as training consumes it (needs --steps)",
            "check": true_or_false,
        },
    )

    def __post_init__(self) -> None:
        check_fields(self)

    def examples(self, seed: int = 0) -> list[MathExample] | IterableDataset:
        """The problems: read as `load_problems` reads them (synthetic ones drawn from `seed`), or with `streaming` a
        streamed data set (`stream_examples`)."""
        source = {"fields": self.fields, "split": self.split, "limit": self.limit, "subset": self.subset}
        if self.streaming:
            return stream_examples(self.source, **source)
        return load_problems(self.source, seed=seed, **source)

    def describe(self) -> str:
        """The data in one line, as a head's model card names it (`describe_source`)."""
        return describe_source(
            self.source, fields=self.fields, split=self.split, limit=self.limit, subset=self.subset,
            streaming=self.streaming,
        )  # fmt: skip


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, or its eos token when it has none (masked out either way)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
    return pad


@dataclass
class TruncationReport:
    """How many examples `tokenize_examples` cut or dropped to fit `max_length`, so that neither happens silently."""

    total: int = 0  # examples tokenised
    truncated: int = 0  # examples whose target was cut to fit max_length
    dropped: int = 0  # examples whose prompt alone filled max_length (no target token left): skipped
    max_length: int = 0

    def __str__(self) -> str:
        return (
            f"{self.truncated} of {self.total} examples truncated to {self.max_length} tokens, "
            f"{self.dropped} dropped (prompt too long)"
        )


def prompt_adds_special_tokens(tokenizer) -> bool:
    """Whether prompts get the tokenizer's special tokens (e.g. BOS): only without a chat template, which writes its
    own. Training, perplexity and generation all encode prompts by this one rule."""
    return not getattr(tokenizer, "chat_template", None)


def format_prompt(problem: str, tokenizer) -> str:
    """The prompt for a problem: the chat template's user turn when the tokenizer has one, as the model expects."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": problem}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return _PLAIN_PROMPT.format(problem=problem)


def tokenize_examples(examples: Sequence[MathExample], tokenizer, max_length: int) -> tuple[Dataset, TruncationReport]:
    """Teacher-forcing features: input_ids = prompt + target + eos, labels masking the prompt with IGNORE_INDEX.

    Prompt and target are tokenised separately, so the boundary between masked and trained positions is exact (a
    tokenizer could merge tokens across it if the two were tokenised as one string). A chat template writes its own
    special tokens, so the prompt gets the tokenizer's special tokens only without one; the target never does.
    Sequences over `max_length` lose their end; an example whose prompt alone fills `max_length` has nothing left to
    train on and is dropped. Both are counted in the returned report.
    """
    positive_int(max_length, "max_length")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token so that targets end where to stop")
    report = TruncationReport(max_length=max_length)
    columns = _encode(
        [example.problem for example in examples], [example.solution for example in examples], tokenizer, report
    )
    if report.total and report.dropped == report.total:
        raise ValueError(f"all {report.total} prompts fill max_length={max_length} tokens; raise max_length")
    return Dataset.from_dict(columns), report


def _encode(
    problems: Sequence[str], solutions: Sequence[str], tokenizer, report: TruncationReport
) -> dict[str, list[list[int]]]:
    """The features of a batch of examples (dropped ones left out), counted into `report` as they are encoded."""
    max_length = report.max_length
    chat = bool(getattr(tokenizer, "chat_template", None))
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    report.total += len(problems)
    if not problems:
        return columns
    prompts = [format_prompt(problem, tokenizer) for problem in problems]
    # Without a chat template the target follows 'Answer:' after a space, as it would in running text.
    targets = [solution if chat else " " + solution for solution in solutions]
    prompt_ids = tokenizer(prompts, add_special_tokens=prompt_adds_special_tokens(tokenizer))["input_ids"]
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    for prompt, target in zip(prompt_ids, target_ids, strict=True):
        if len(prompt) >= max_length:
            report.dropped += 1
            continue
        target = [*target, tokenizer.eos_token_id]
        if len(prompt) + len(target) > max_length:
            report.truncated += 1
            target = target[: max_length - len(prompt)]
        columns["input_ids"].append(prompt + target)
        columns["labels"].append([IGNORE_INDEX] * len(prompt) + target)
        columns["attention_mask"].append([1] * (len(prompt) + len(target)))
    return columns


def tokenize_stream(
    examples: IterableDataset, tokenizer, max_length: int, batch_size: int = 64
) -> tuple[IterableDataset, TruncationReport]:
    """`tokenize_examples` for a streamed data set of rows with `problem` and `solution` (`stream_examples`).

    Nothing is read here: rows are tokenised `batch_size` at a time as training consumes them (`IterableDataset.map`),
    and the returned report counts the examples, truncations and drops as they stream by: what was read so far,
    including a batch or two the data loader reads ahead (a second pass over the data counts again).
    """
    positive_int(max_length, "max_length")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token so that targets end where to stop")
    report = TruncationReport(max_length=max_length)
    columns = examples.column_names or ["problem", "solution", "answer"]

    def encode(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        return _encode(batch["problem"], batch["solution"], tokenizer, report)

    tokenized = examples.map(encode, batched=True, batch_size=batch_size, remove_columns=columns)
    return tokenized, report


@dataclass(frozen=True)
class PaddingCollator:
    """Pads features to the longest in the batch (right padding), so positions line up with the unpadded ones.

    input_ids get `pad_token_id`, labels IGNORE_INDEX (padding is never trained on) and attention_mask 0.
    """

    pad_token_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> PaddingCollator:
        return cls(pad_token_id(tokenizer))

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        width = max(len(feature["input_ids"]) for feature in features)
        fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
        batch = {name: torch.full((len(features), width), value, dtype=torch.long) for name, value in fill.items()}
        for row, feature in enumerate(features):
            for name, tensor in batch.items():
                values = torch.as_tensor(feature[name], dtype=torch.long)
                tensor[row, : len(values)] = values
        return batch
