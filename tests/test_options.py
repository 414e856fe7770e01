"""One place for the checks of option values (`peft_backattn.validation`) and one dataclass for each command's
options: the command line is made from the fields and reads only types; a value is checked when its dataclass is
built, by the same check that the Python API runs on the same value, with the same one-line message.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from conftest import save_tiny_lm
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from peft_backattn import BackAttnConfig
from peft_backattn.cli import build_parser
from peft_backattn.validation import (
    Check,
    check_fields,
    check_option,
    fraction,
    given_options,
    non_negative_int,
    non_negative_number,
    option_fields,
    option_name,
    path_like,
    positive_int,
    positive_number,
    seed_int,
    true_or_false,
)
from peft_backattn.workbench.base_models import ModelOptions, fit_length
from peft_backattn.workbench.data import DataOptions, load_examples, load_problems, tokenize_examples
from peft_backattn.workbench.demo import DemoOptions
from peft_backattn.workbench.evaluation import EvalOptions, GenerateOptions, evaluate, generate_solutions, target_nll
from peft_backattn.workbench.synthetic import generate_examples
from peft_backattn.workbench.training import TrainingOptions, attach_head, train_head

# Each command's options, and the dataclasses they are made from (eval reads no stream).
COMMANDS = {
    "train": [ModelOptions, DataOptions, TrainingOptions, BackAttnConfig],
    "eval": [ModelOptions, DataOptions, EvalOptions],
    "generate": [ModelOptions, GenerateOptions],
    "demo": [DemoOptions],
}
LEFT_OUT = {"eval": {"streaming"}}
REQUIRED = {
    TrainingOptions: {"output_dir": "head"},
    DataOptions: {"source": "synthetic"},
    GenerateOptions: {"problem": "2+2?"},
}


def subcommand(name: str):
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[name]


@pytest.mark.parametrize(
    "check, accepted, refused",
    [
        (positive_int, [1, 10**12], [0, -1, 2.5, True, "3", None]),
        (non_negative_int, [0, 7], [-1, 1.0, False, None]),
        (seed_int, [0, 2**32 - 1], [-1, 2**32, 1.5, True]),
        (positive_number, [1e-12, 3, 2.5], [0, -1e-3, math.nan, math.inf, -math.inf, True, "1e-3", None]),
        (non_negative_number, [0, 0.0, 4.5], [-1e-9, math.nan, math.inf, False]),
        (fraction, [0, 0.5, 0.999], [1, 1.0, -0.1, math.nan]),
        (true_or_false, [True, False], [0, 1, "yes", None]),
        (path_like, ["head", Path("runs/head")], ["", None, 3]),
    ],
    ids=["positive_int", "non_negative_int", "seed_int", "positive_number", "non_negative_number", "fraction",
         "true_or_false", "path_like"],
)  # fmt: skip
def test_each_check_accepts_and_refuses_exactly_these_values(check, accepted, refused):
    for value in accepted:
        assert check(value, "x") is value
    for value in refused:
        with pytest.raises(ValueError) as error:
            check(value, "--x (x)")
        assert str(error.value) == f"--x (x) must be {check.expected}, got {value!r}."


def test_a_check_takes_none_and_other_words_when_asked():
    limit = positive_int.or_none("a positive number of examples or None")
    assert limit(None, "limit") is None and limit(3, "limit") == 3
    with pytest.raises(ValueError, match=r"^limit must be a positive number of examples or None, got 0\.$"):
        limit(0, "limit")
    with pytest.raises(ValueError, match=r"^s must be a finite positive number or None, got nan\.$"):
        positive_number.or_none()(math.nan, "s")
    clipping = non_negative_number.saying("a finite number >= 0 (0: no clipping)")
    assert clipping(0, "c") == 0
    with pytest.raises(ValueError, match=r"^c must be a finite number >= 0 \(0: no clipping\), got -1\.$"):
        clipping(-1, "c")
    assert Check("even", lambda value: value % 2 == 0)(4, "n") == 4


def test_a_field_is_named_by_its_flag_and_its_name():
    assert option_name(TrainingOptions, "gradient_accumulation_steps") == "--grad-accum (gradient_accumulation_steps)"
    assert option_name(TrainingOptions, "batch_size") == "--batch-size (batch_size)"
    assert option_name(EvalOptions, "base") == "--no-base (base)"  # a bool on by default is turned off by its flag
    assert option_name(DataOptions, "source") == "--data (source)"
    assert option_name(TrainingOptions, "save_final") == "save_final"  # no command-line option
    assert option_name(EvalOptions, "time_budget_seconds") == "time_budget_seconds"


@pytest.mark.parametrize("cls", [cls for classes in COMMANDS.values() for cls in classes], ids=lambda c: c.__name__)
def test_every_default_passes_its_own_check(cls):
    options = cls(**REQUIRED.get(cls, {}))
    checked = [spec for spec in dataclasses.fields(cls) if "check" in spec.metadata]
    assert checked, f"{cls.__name__} checks none of its fields"
    check_fields(options)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_every_command_is_a_dataclass_field(command):
    """No option is written by hand: each is one field's, with the field's name, default and help text."""
    actions = [action for action in subcommand(command)._actions if action.dest != "help"]
    fields = {spec.name: spec for cls in COMMANDS[command] for spec in option_fields(cls)}
    expected = set(fields) - LEFT_OUT.get(command, set())
    assert sorted(action.dest for action in actions) == sorted(expected)
    for action in actions:
        assert action.help.startswith(fields[action.dest].metadata["help"])


def test_a_command_may_give_a_field_its_own_default():
    data = DataOptions(**given_options(DataOptions, build_parser().parse_args(["eval", "--data", "synthetic"])))
    assert (data.split, DataOptions("synthetic").split) == ("test", "train")
    assert data.streaming is False  # eval has no --streaming


def test_the_command_line_reads_types_and_each_value_is_checked_once(monkeypatch):
    """Parsing reads `--batch-size 0` as an int; building EvalOptions refuses it: one check, one message, run once."""
    calls = []
    run = Check.__call__

    def counted(self, value, name):
        calls.append(name)
        return run(self, value, name)

    monkeypatch.setattr(Check, "__call__", counted)
    args = build_parser().parse_args(["eval", "--data", "synthetic", "--batch-size", "0"])
    assert args.batch_size == 0 and calls == []
    with pytest.raises(ValueError, match=r"^--batch-size \(batch_size\) must be a positive integer, got 0\.$"):
        EvalOptions(**given_options(EvalOptions, args))
    assert calls.count("--batch-size (batch_size)") == 1


def test_a_value_that_is_no_number_is_a_usage_error_in_its_checks_words(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--data", "synthetic", "--max-length", "1e3"])
    assert "argument --max-length: must be a positive integer, or None for the default, got '1e3'" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: evaluate(None, None, [], batch_size=0), "--batch-size (batch_size) must be a positive integer"),
        (lambda: EvalOptions(batch_size=0), "--batch-size (batch_size) must be a positive integer, got 0."),
        (lambda: target_nll(None, None, [], max_length=0), "--max-length (max_length) must be a positive integer"),
        (lambda: generate_solutions(None, None, [], max_new_tokens=0), "--max-new-tokens (max_new_tokens) must be"),
        (lambda: evaluate(None, None, [], generation_limit=-1), "--generation-limit (generation_limit) must be an "
                                                                "integer >= 0 (0: no generation) or None, got -1."),
        (lambda: evaluate(None, None, [], time_budget_seconds=math.inf), "time_budget_seconds must be a finite number "
                                                                         ">= 0 or None, got inf."),
        (lambda: load_problems("synthetic", limit=0), "--limit (limit) must be a positive number of examples or None"),
        (lambda: DataOptions("synthetic", limit=0), "--limit (limit) must be a positive number of examples or None"),
        (lambda: load_examples("rows.jsonl", limit=True), "limit must be a positive number of examples or None, got "
                                                          "True."),
        (lambda: generate_examples(0), "count must be a positive integer, got 0."),
        (lambda: tokenize_examples([], None, 0), "max_length must be a positive integer, got 0."),
        (lambda: GenerateOptions("2+2?", top_k=0), "--top-k (top_k) must be a positive integer or None, got 0."),
        (lambda: DemoOptions(learning_rate=0), "--lr (learning_rate) must be a finite positive number, got 0."),
        (lambda: ModelOptions(load_in_4bit="yes"), "--load-in-4bit (load_in_4bit) must be True or False, got 'yes'."),
    ],
)  # fmt: skip
def test_the_python_api_refuses_a_value_as_its_option_does(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_check_option_checks_a_keyword_as_its_field_does():
    assert check_option(EvalOptions, "max_length", None) is None
    with pytest.raises(ValueError, match=r"^--seed \(seed\) must be an integer from 0 to 2\*\*32 - 1, got -1\.$"):
        check_option(GenerateOptions, "seed", -1)


def test_only_a_chosen_length_beyond_the_base_is_an_error(capsys):
    config = LlamaConfig(max_position_embeddings=128)
    assert fit_length(config, None, 256, "--max-length (max_length)") == 128
    assert capsys.readouterr().out == (
        "--max-length (max_length) not given: 128 tokens, the positions the base takes (the default, 256, is beyond "
        "them)\n"
    )
    assert fit_length(config, None, 64, "x") == 64 and fit_length(config, 128, 256, "x") == 128
    assert fit_length(config, None, 256, "x", say=False) == 128
    assert fit_length(GPT2Config(n_positions=1024), None, 512, "x") == 512
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match=r"^x is 129 tokens, beyond the 128 positions the base takes"):
        fit_length(config, 129, 256, "x")


@pytest.fixture(scope="module")
def short_lm(tmp_path_factory):
    """A tiny base taking 128 positions, and its tokenizer."""
    folder = save_tiny_lm(tmp_path_factory.mktemp("short") / "model", positions=128)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_evaluate_without_max_length_fits_the_base(short_lm, capsys):
    model, tokenizer = short_lm
    examples = generate_examples(3, split="test")
    fitted = evaluate(model, tokenizer, examples, generation_limit=0, progress=False)
    assert "not given: 128 tokens" in capsys.readouterr().out
    assert fitted == evaluate(model, tokenizer, examples, max_length=128, generation_limit=0, progress=False)
    with pytest.raises(ValueError, match=r"--max-length \(max_length\) is 512 tokens, beyond the 128 positions"):
        evaluate(model, tokenizer, examples, max_length=512, generation_limit=0, progress=False)


def test_train_head_without_max_length_fits_the_base(short_lm, tmp_path, capsys):
    model = attach_head(short_lm[0], BackAttnConfig(r=4))
    options = TrainingOptions(str(tmp_path / "head"), max_steps=1, batch_size=2, progress_bar=False, save_final=False)
    report = train_head(model, short_lm[1], generate_examples(2), options)
    assert report.truncation.max_length == 128
    assert "--max-length (max_length) not given: 128 tokens" in capsys.readouterr().out
