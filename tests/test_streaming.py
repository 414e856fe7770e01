"""`train_head` and `peft-backattn train --streaming` train from a streamed data set without reading all of it."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from conftest import save_tiny_lm
from datasets import IterableDataset
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_backattn import BackAttnConfig
from peft_backattn.cli import main
from peft_backattn.workbench.data import load_examples, stream_examples, tokenize_examples, tokenize_stream
from peft_backattn.workbench.training import TrainingOptions, train_head

ROWS = [{"question": f"Tom has {i} pens and buys {i + 2} more. How many now?", "answer": f"{i} + {i + 2} = "
         f"{2 * i + 2}\n#### {2 * i + 2}"} for i in range(40)]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    work = tmp_path_factory.mktemp("streaming")
    good = work / "train.jsonl"
    good.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return {"good": good, "model": save_tiny_lm(work / "model", chat=False), "work": work}


def endless_problems():
    """Rows without end: a data set that training could never read in full."""
    for i in itertools.count():
        yield {"problem": f"What is {i} + 1?", "solution": f"{i} + 1 = {i + 1}\n#### {i + 1}", "answer": str(i + 1)}


def test_a_stream_tokenises_like_a_list_and_counts_truncation_as_it_is_read(files):
    tokenizer = AutoTokenizer.from_pretrained(files["model"])
    streamed, report = tokenize_stream(stream_examples(str(files["good"]), limit=10), tokenizer, max_length=40)
    assert report.total == 0  # nothing read yet
    rows = list(streamed)
    listed, expected = tokenize_examples(load_examples(str(files["good"]), limit=10), tokenizer, max_length=40)
    assert [row["input_ids"] for row in rows] == listed["input_ids"]
    assert [row["labels"] for row in rows] == listed["labels"]
    assert (report.total, report.truncated, report.dropped) == (expected.total, expected.truncated, expected.dropped)
    assert report.truncated > 0


def test_train_head_trains_on_an_endless_stream_reading_only_what_it_needs(files, tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(files["model"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(files["model"]), BackAttnConfig(r=8))
    examples = IterableDataset.from_generator(endless_problems)
    options = TrainingOptions(output_dir=str(tmp_path / "head"), max_steps=2, batch_size=4, progress_bar=False)
    report = train_head(model, tokenizer, examples, options)
    assert report.steps == 2
    # 2 steps x 4 examples, counted as they streamed, plus what the data loader read ahead (a batch or two)
    assert 8 <= report.truncation.total <= 16
    out = capsys.readouterr().out
    assert "Training data: streamed, counted as it is read" in out
    assert f"Training data: 0 of {report.truncation.total} examples truncated to 256 tokens, 0 dropped" in out
    assert all(".backattn_heads." in key for key in load_file(tmp_path / "head" / "adapter_model.safetensors"))


def test_a_stream_needs_a_number_of_steps(files, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(files["model"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(files["model"]), BackAttnConfig(r=8))
    with pytest.raises(ValueError, match=r"give --steps \(max_steps > 0\)"):
        train_head(model, tokenizer, stream_examples(str(files["good"])), TrainingOptions(str(tmp_path / "h")))


def test_the_command_line_streams_a_local_file(files, tmp_path, capsys):
    output = tmp_path / "head"
    code = main([
        "train", "--model", str(files["model"]), "--data", str(files["good"]), "--streaming", "--steps", "2",
        "--batch-size", "2", "--r", "8", "--no-progress", "--output", str(output),
    ])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert re.search(r"Training data: 0 of [4-8] examples truncated", out) and "Trained 2 steps" in out, out
    assert "streamed" in (output / "README.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "synthetic", "--streaming", "--steps", "2"], "synthetic generator is not streamed"),
        (["--streaming"], "give --steps"),
    ],
)
def test_the_command_line_refuses_what_cannot_stream(files, tmp_path, capsys, args, message):
    args = [*args] if "--data" in args else ["--data", str(files["good"]), *args]
    assert main(["train", "--model", str(files["model"]), *args, "--output", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("peft-backattn: error: ") and message in err[-1]


def train_on_a_short_stream(files, output, *extra) -> int:
    """10 rows, 2 a step: 5 steps a pass, and --steps 12 asks for more."""
    return main([
        "train", "--model", str(files["model"]), "--data", str(files["good"]), "--limit", "10", "--streaming",
        "--steps", "12", "--batch-size", "2", "--r", "8", "--no-progress", "--output", str(output), *extra,
    ])  # fmt: skip


def test_a_stream_shorter_than_the_steps_stops_at_its_end_and_says_so(files, tmp_path, capsys):
    assert train_on_a_short_stream(files, tmp_path / "head") == 0
    out = capsys.readouterr().out
    assert (
        "Training data: the stream ended after its 10 examples, at step 5 of --steps 12; training stops there "
        "(--repeat-stream starts it again from its first row until --steps)." in out
    ), out
    assert "Trained 5 steps" in out and "Training data: 0 of 10 examples truncated" in out
    assert "| passes over the streamed data | `1.0` |" in (tmp_path / "head" / "README.md").read_text()


def test_repeat_stream_goes_over_a_short_stream_again_and_says_how_many_passes(files, tmp_path, capsys):
    assert train_on_a_short_stream(files, tmp_path / "head", "--repeat-stream") == 0
    out = capsys.readouterr().out
    assert (
        "Training data: the stream of 10 examples ended 2 times before --steps 12 and was started again each time "
        "(--repeat-stream): 12 steps made 2.4 passes over it." in out
    ), out
    assert "Trained 12 steps" in out
    card = (tmp_path / "head" / "README.md").read_text()
    assert "| passes over the streamed data | `2.4 (--repeat-stream)` |" in card


def test_train_head_repeats_a_stream_only_when_asked(files, tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(files["model"])
    rows = list(itertools.islice(endless_problems(), 6))  # 3 steps of 2 a pass
    read = []

    def six_problems():
        read.extend(rows)
        yield from rows

    for repeat, steps in ((False, 3), (True, 9)):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(files["model"]), BackAttnConfig(r=8))
        options = TrainingOptions(
            output_dir=str(tmp_path / f"head-{repeat}"), max_steps=9, batch_size=2, progress_bar=False,
            repeat_stream=repeat,
        )  # fmt: skip
        read.clear()
        report = train_head(model, tokenizer, IterableDataset.from_generator(six_problems), options)
        assert report.steps == steps
        assert len(read) == 6 * steps // 3  # one pass, or three
    assert "9 steps made 3.0 passes over it" in capsys.readouterr().out
