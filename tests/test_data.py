"""The data layer: loading the math formats, merging answers into targets, masking prompts and padding batches."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from conftest import build_tokenizer, requires_shared_data

from peft_backattn.workbench import data
from peft_backattn.workbench.data import (
    IGNORE_INDEX,
    PaddingCollator,
    TruncationReport,
    detect_schema,
    format_prompt,
    load_examples,
    load_problems,
    to_example,
    tokenize_examples,
)
from peft_backattn.workbench.problems import SCHEMAS, FieldMapping, MathExample, parse_field_mapping
from peft_backattn.workbench.synthetic import generate_examples

GSM8K_ROW = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}
GSM8K_SOLUTION = (
    "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
)
OPENMATH_ROW = {
    "problem": "What is $\\frac{4}{2}$?",
    "generated_solution": "Divide: $\\frac{4}{2} = \\boxed{2}$.",
    "expected_answer": "2",
    "problem_source": "augmented_math",
}
ROWS = [
    {"question": "Ann has 3 apples and buys 4 more. How many apples does she have?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "Bo has 10 pens and gives away 6. How many are left?", "answer": "10 - 6 = <<10-6=4>>4\n#### 4"},
    {"question": "A box holds 5 rows of 2 eggs. How many eggs?", "answer": "5 * 2 = 10\n#### 10"},
]


@pytest.fixture(autouse=True, scope="module")
def _datasets_cache(tmp_path_factory):
    """Keep the Arrow caches `datasets` writes for these files out of the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets_cache")))
        yield


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# Rows to examples.


def test_gsm8k_calculator_notes_removed_and_answer_line_kept():
    example = to_example(GSM8K_ROW, SCHEMAS["gsm8k"])
    assert example == MathExample(GSM8K_ROW["question"], GSM8K_SOLUTION, "72")


def test_answer_column_merged_into_solution():
    example = to_example(OPENMATH_ROW, SCHEMAS["openmathinstruct2"])
    assert example.solution == "Divide: $\\frac{4}{2} = \\boxed{2}$.\n#### 2"
    assert example.answer == "2"
    assert example.problem == OPENMATH_ROW["problem"]


def test_answer_column_used_when_solution_has_answer_line():
    row = {"q": "What is 6 * 7?", "s": "6 * 7 = 42\n#### 42", "a": "42.0"}
    example = to_example(row, FieldMapping("q", "s", "a"))
    assert example.solution == "6 * 7 = 42\n#### 42"  # not a second answer line
    assert example.answer == "42.0"


def test_answer_column_that_is_not_a_string():
    example = to_example({"q": "What is 6 * 7?", "s": "Multiply.", "a": 42}, FieldMapping("q", "s", "a"))
    assert example.solution == "Multiply.\n#### 42"
    assert example.answer == "42"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"answer": "#### 1"}, "the row has no value for 'question' (its fields: answer)"),
        ({"question": None, "answer": "#### 1"}, "the row has no value for 'question'"),
        ({"question": "  ", "answer": "#### 1"}, "the row has an empty problem ('question')"),
        ({"question": "What?", "answer": "It is 1."}, "no '#### <answer>' line and the field mapping names no answer"),
    ],
)
def test_bad_rows(row, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        to_example(row, SCHEMAS["gsm8k"])
    assert "\n" not in str(error.value)


# Schemas and field mappings.


@pytest.mark.parametrize(
    "text, expected",
    [
        ("problem=question,solution=answer", FieldMapping("question", "answer", None)),
        (" problem = q , solution = s , answer = final ", FieldMapping("q", "s", "final")),
        ("answer=a,solution=s,problem=p", FieldMapping("p", "s", "a")),
    ],
)
def test_parse_field_mapping(text, expected):
    mapping = parse_field_mapping(text)
    assert mapping == expected
    assert parse_field_mapping(str(mapping)) == mapping


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "bad part '' in field mapping ''"),
        ("problem=q", "field mapping 'problem=q' lacks solution"),
        ("question=q,solution=s", "bad part 'question=q'"),
        ("problem=q,solution=", "bad part 'solution='"),
        ("problem:q,solution=s", "bad part 'problem:q'"),
        ("problem=q,problem=r,solution=s", "'problem' is given twice"),
    ],
)
def test_parse_field_mapping_errors(text, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_field_mapping(text)
    assert "expected 'problem=COLUMN,solution=COLUMN[,answer=COLUMN]'" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "relative, schema",
    [
        ("gsm8k/train.jsonl", "gsm8k"),
        ("openmathinstruct2/sample100.jsonl", "openmathinstruct2"),
        ("math500/test.jsonl", "math500"),
    ],
)
def test_detect_schema_of_shared_files(relative, schema):
    path = requires_shared_data() / relative
    with open(path) as handle:
        columns = list(json.loads(handle.readline()))
    assert detect_schema(columns) == SCHEMAS[schema]


def test_detect_schema_error():
    with pytest.raises(ValueError) as error:
        detect_schema(["text", "label"])
    message = str(error.value)
    assert "columns found: text, label" in message
    assert "--fields problem=...,solution=...,answer=..." in message


# Loading files.


def test_gsm8k_file_loads_clean():
    path = requires_shared_data() / "gsm8k" / "train.jsonl"
    examples = load_examples(str(path))
    assert len(examples) == 7473
    assert examples[0] == MathExample(GSM8K_ROW["question"], GSM8K_SOLUTION, "72")
    for example in examples:
        assert "<<" not in example.solution and ">>" not in example.solution
        assert example.solution.endswith(f"\n#### {example.answer}")
        assert example.solution.count("#### ") == 1


def test_openmathinstruct2_sample_merges_expected_answer():
    path = requires_shared_data() / "openmathinstruct2" / "sample100.jsonl"
    with open(path) as handle:
        rows = [json.loads(line) for line in handle]
    examples = load_examples(str(path), fields="openmathinstruct2")
    assert len(examples) == len(rows) == 100
    for row, example in zip(rows, examples, strict=True):
        assert example.solution == row["generated_solution"].strip() + "\n#### " + row["expected_answer"]
        assert example.answer == row["expected_answer"]


def test_math500_loads_with_limit():
    path = requires_shared_data() / "math500" / "test.jsonl"
    with open(path) as handle:
        rows = [json.loads(line) for _, line in zip(range(7), handle, strict=False)]
    examples = load_examples(str(path), limit=7)
    assert [example.answer for example in examples] == [row["answer"] for row in rows]
    assert [example.problem for example in examples] == [row["problem"].strip() for row in rows]
    assert examples[0].solution.endswith("\n#### " + rows[0]["answer"])


def test_same_examples_from_jsonl_json_and_parquet(tmp_path):
    jsonl = _write_jsonl(tmp_path / "rows.jsonl", ROWS)
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "rows.parquet"))
    expected = [
        MathExample(ROWS[0]["question"], "3 + 4 = 7\n#### 7", "7"),
        MathExample(ROWS[1]["question"], "10 - 6 = 4\n#### 4", "4"),
        MathExample(ROWS[2]["question"], "5 * 2 = 10\n#### 10", "10"),
    ]
    assert load_examples(jsonl) == expected
    assert load_examples(str(tmp_path / "rows.json")) == expected
    assert load_examples(str(tmp_path / "rows.parquet")) == expected
    assert load_examples(jsonl, streaming=True) == expected


@pytest.mark.parametrize("fields", ["gsm8k", "problem=question,solution=answer", FieldMapping("question", "answer")])
def test_fields_given_explicitly(tmp_path, fields):
    path = _write_jsonl(tmp_path / "rows.jsonl", ROWS)
    assert [example.answer for example in load_examples(path, fields=fields)] == ["7", "4", "10"]


def test_limit(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", ROWS)
    assert [example.answer for example in load_examples(path, limit=2)] == ["7", "4"]
    assert len(load_examples(path, limit=100)) == 3
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"limit must be a positive number of examples or None, got {bad}"):
            load_examples(path, limit=bad)


def test_dataset_lacking_fields(tmp_path):
    path = _write_jsonl(tmp_path / "other.jsonl", [{"text": "What is 1 + 1?", "label": "2"}])
    with pytest.raises(ValueError, match="columns found: text, label") as error:
        load_examples(path)
    assert "--fields problem=...,solution=...,answer=..." in str(error.value)
    with pytest.raises(ValueError, match="lacks the field\\(s\\) question, answer \\(its columns: text, label\\)"):
        load_examples(path, fields="gsm8k")
    examples = load_examples(path, fields="problem=text,solution=text,answer=label")
    assert examples == [MathExample("What is 1 + 1?", "What is 1 + 1?\n#### 2", "2")]


def test_row_error_names_the_row(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", [*ROWS, {"question": "", "answer": "#### 1"}])
    with pytest.raises(ValueError, match=r"rows.jsonl, row 3: the row has an empty problem \('question'\)"):
        load_examples(path)


def test_unknown_schema_name(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", ROWS)
    with pytest.raises(ValueError, match="unknown schema 'gsm9k'; use one of openmathinstruct2, gsm8k, math500"):
        load_examples(path, fields="gsm9k")


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="does not exist; pass an existing .jsonl, .json or .parquet file"):
        load_examples(str(tmp_path / "missing.jsonl"))
    csv = tmp_path / "rows.csv"
    csv.write_text("question,answer\nWhat?,#### 1\n")
    with pytest.raises(ValueError, match="cannot read .*rows.csv: use a .jsonl, .json, .parquet file"):
        load_examples(str(csv))
    with pytest.raises(ValueError, match="cannot read"):
        load_examples(str(tmp_path))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl is empty; pass a file with examples in it"):
        load_examples(str(empty))


def test_the_line_checks_let_every_valid_json_file_through(tmp_path):
    """A byte-order mark, blank lines, a JSON document over several lines, a .json file of JSON Lines: all load."""
    lines = [json.dumps(row) for row in ROWS]
    (tmp_path / "bom.jsonl").write_bytes(("\ufeff" + lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n").encode())
    (tmp_path / "pretty.json").write_text(json.dumps(ROWS, indent=2))
    (tmp_path / "lines.json").write_text("\n".join(lines))
    for name in ("bom.jsonl", "pretty.json", "lines.json"):
        assert [example.answer for example in load_examples(str(tmp_path / name))] == ["7", "4", "10"], name


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("cut.jsonl", b'{"question": "a?", "answer": "#### 1"}\n{"question": "b', "cut.jsonl, line 2: not valid JSON"),
        ("list.jsonl", b'{"question": "a?", "answer": "#### 1"}\n[1, 2, 3]\n', "line 2: a JSON object per line"),
        ("number.jsonl", b'{"question": "a?", "answer": "#### 1"}\n\n7\n', "number.jsonl, line 3: a JSON object"),
        ("latin1.jsonl", b'{"question": "caf\xe9?", "answer": "#### 1"}\n', "latin1.jsonl, line 1: not UTF-8 text"),
        ("cut.json", b'[{"question": "a?",\n "answer": "#### 1"},\n{"question"', "cut.json, line 3: not valid JSON"),
    ],
)
def test_a_damaged_json_file_is_refused_with_its_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError) as error:
        load_examples(str(tmp_path / name))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_damaged_parquet_file_is_refused_naming_it(tmp_path):
    (tmp_path / "rows.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="cannot read .*rows.parquet: not a Parquet file or a damaged one"):
        load_examples(str(tmp_path / "rows.parquet"))


@pytest.mark.parametrize("limit", [0, -3])
def test_synthetic_limit_must_be_positive(limit):
    expected = f"--limit \\(limit\\) must be a positive number of examples or None, got {limit}"
    with pytest.raises(ValueError, match=expected):
        load_problems("synthetic", limit=limit)


def test_hub_names_stream_and_stop_after_limit(monkeypatch):
    calls = []

    def endless_rows():
        for index in range(10**9):
            yield {"question": f"What is {index} + 1?", "answer": f"{index} + 1 = {index + 1}\n#### {index + 1}"}

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.IterableDataset.from_generator(endless_rows)

    monkeypatch.setattr(data, "load_dataset", fake_load_dataset)
    examples = load_examples("someone/big-math", split="train_1M", limit=3)
    assert calls == [("someone/big-math", {"name": None, "split": "train_1M", "streaming": True})]
    assert [example.answer for example in examples] == ["1", "2", "3"]
    load_examples("someone/big-math", limit=1, streaming=False, subset="main")
    assert calls[-1] == ("someone/big-math", {"name": "main", "split": "train", "streaming": False})


# Prompts and tokenisation.


def test_format_prompt_plain_and_chat():
    assert format_prompt("What is 2 + 2?", build_tokenizer()) == "Question: What is 2 + 2?\nAnswer:"
    assert format_prompt("What is 2 + 2?", build_tokenizer(chat=True)) == "<s><|user|>What is 2 + 2?\n<|assistant|>"


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_labels_mask_the_prompt_exactly(chat):
    tokenizer = build_tokenizer(chat=chat)
    examples = [
        to_example(GSM8K_ROW, SCHEMAS["gsm8k"]),
        to_example(OPENMATH_ROW, SCHEMAS["openmathinstruct2"]),
    ]
    features, report = tokenize_examples(examples, tokenizer, max_length=512)
    assert (report.total, report.truncated, report.dropped) == (2, 0, 0)
    assert features.column_names == ["input_ids", "labels", "attention_mask"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for example, feature in zip(examples, features, strict=True):
        prompt = tokenizer(format_prompt(example.problem, tokenizer), add_special_tokens=False)["input_ids"]
        if not chat:
            prompt = [bos, *prompt]  # the plain prompt gets the tokenizer's special tokens; a template has its own
        input_ids, labels = feature["input_ids"], feature["labels"]
        assert input_ids[: len(prompt)] == prompt
        assert input_ids.count(bos) == 1
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt) :] == input_ids[len(prompt) :]
        assert input_ids[-1] == eos and input_ids.count(eos) == 1
        target = tokenizer.decode(input_ids[len(prompt) : -1])
        assert target == (example.solution if chat else " " + example.solution)
        assert feature["attention_mask"] == [1] * len(input_ids)


def test_truncation_is_counted_and_reported():
    tokenizer = build_tokenizer()
    examples = [to_example(row, SCHEMAS["gsm8k"]) for row in ROWS[:2]]
    full, _ = tokenize_examples(examples, tokenizer, max_length=512)
    lengths = [len(ids) for ids in full["input_ids"]]
    prompt_lengths = [labels.count(IGNORE_INDEX) for labels in full["labels"]]
    max_length = min(lengths) - 1  # both examples are cut...
    assert max(prompt_lengths) < max_length  # ...and both keep their prompt and at least one target token
    features, report = tokenize_examples(examples, tokenizer, max_length=max_length)
    assert report == TruncationReport(total=2, truncated=2, dropped=0, max_length=max_length)
    assert str(report) == f"2 of 2 examples truncated to {max_length} tokens, 0 dropped (prompt too long)"
    for row, (kept, original) in enumerate(zip(features["input_ids"], full["input_ids"], strict=True)):
        assert len(kept) == max_length
        assert kept == original[:max_length]  # the end is cut, eos included
        assert features["labels"][row] == full["labels"][row][:max_length]


def test_prompt_filling_max_length_is_dropped():
    tokenizer = build_tokenizer()
    short = MathExample("What is 1 + 1?", "1 + 1 = 2\n#### 2", "2")
    long = MathExample("What is " + " + ".join(["1"] * 40) + "?", "#### 40", "40")
    long_prompt = len(tokenizer(format_prompt(long.problem, tokenizer))["input_ids"])
    features, report = tokenize_examples([short, long], tokenizer, max_length=long_prompt)
    assert (report.total, report.truncated, report.dropped) == (2, 0, 1)
    assert str(report) == f"0 of 2 examples truncated to {long_prompt} tokens, 1 dropped (prompt too long)"
    assert len(features) == 1
    assert features[0]["input_ids"][-1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match=f"all 1 prompts fill max_length={long_prompt} tokens; raise max_length"):
        tokenize_examples([long], tokenizer, max_length=long_prompt)


def test_tokenize_errors():
    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match="max_length must be a positive integer, got 0"):
        tokenize_examples([], tokenizer, max_length=0)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="the tokenizer has no eos token"):
        tokenize_examples([MathExample("p", "#### 1", "1")], tokenizer, max_length=16)


# Batching.


def test_collator_pads_right():
    collate = PaddingCollator(pad_token_id=2)
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
            {"input_ids": [5, 6, 7, 8, 1], "labels": [-100, -100, 7, 8, 1], "attention_mask": [1, 1, 1, 1, 1]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 2], [5, 6, 7, 8, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 7, 8, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_collator_pads_with_eos_without_pad_token():
    assert PaddingCollator.from_tokenizer(build_tokenizer()).pad_token_id == build_tokenizer().pad_token_id
    without_pad = build_tokenizer(pad=False)
    assert without_pad.pad_token_id is None
    assert PaddingCollator.from_tokenizer(without_pad).pad_token_id == without_pad.eos_token_id


def test_tokenized_examples_batch():
    tokenizer = build_tokenizer()
    features, _ = tokenize_examples(generate_examples(4), tokenizer, max_length=256)
    batch = PaddingCollator.from_tokenizer(tokenizer)([features[index] for index in range(4)])
    lengths = [len(ids) for ids in features["input_ids"]]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
