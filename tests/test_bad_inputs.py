"""Bad input on the command line: one line on stderr, exit status 2, and nothing changed on disk.

One table of cases (id, command line, expected message) goes through one check: the command exits with status 2,
stderr is exactly one line starting `peft-backattn` that holds the message (no traceback), and no file under the
test's folder, the base models or the trained head was created, removed or modified. Options are refused before a
model is loaded, so most cases take milliseconds; those that need a model use the tiny ones built here.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow
import pyarrow.ipc
import pyarrow.parquet
import pytest
from conftest import build_tokenizer, save_tiny_lm
from safetensors import SafetensorError
from transformers import GPT2Config, GPT2LMHeadModel

from peft_backattn.cli import main
from peft_backattn.workbench.demo import DemoOptions
from peft_backattn.workbench.training import TrainingOptions

GSM8K_ROW = {"question": "Tom has 3 boxes of 12 pens. How many pens?", "answer": "3 * 12 = 36\n#### 36"}
ROW = json.dumps(GSM8K_ROW)
TRAIN = ["train", "--model", "{model}", "--data", "synthetic", "--limit", "8", "--batch-size", "4", "--no-progress"]
TRAIN_OUT = [*TRAIN, "--output", "{tmp}/head"]
EVAL = ["eval", "--model", "{model}", "--data", "synthetic", "--limit", "2", "--max-new-tokens", "4"]
GENERATE = ["generate", "--model", "{model}", "--problem", "What is 2 + 3?", "--max-new-tokens", "4"]
DEMO = ["demo", "--model", "{model}", "--output-dir", "{tmp}/demo"]
RESUME = [*TRAIN, "--output", "{tmp}/copy", "--steps", "4", "--save-steps", "2", "--resume"]


@dataclass
class World:
    """What the cases refer to by name in their command lines: {model}, {gpt2}, {wider}, {head}, {tmp}."""

    model: Path  # tiny Llama, 512 positions
    gpt2: Path  # tiny GPT-2 with learned positions, 64 of them (an IndexError beyond)
    wider: Path  # tiny Llama of hidden size 48: heads trained on {model} do not fit it
    head: Path  # a head trained on {model}, with its checkpoint-2

    def shared(self) -> list[Path]:
        return [self.model, self.gpt2, self.wider, self.head]


@pytest.fixture(scope="module")
def world(tiny_lm_dir, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad_inputs")
    tokenizer = build_tokenizer(chat=True)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    head = root / "head"
    command = [*TRAIN, "--output", head, "--steps", "2", "--save-steps", "2"]
    assert main([str(a).format(model=tiny_lm_dir) for a in command]) == 0
    assert (head / "checkpoint-2" / "optimizer.pt").is_file()
    return World(tiny_lm_dir, root / "gpt2", save_tiny_lm(root / "wider", hidden=48), head)


def write(name: str, content: str | bytes) -> Callable[[Path, World], None]:
    def setup(tmp: Path, world: World) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def parquet_without_the_needed_columns(tmp: Path, world: World) -> None:
    pyarrow.parquet.write_table(pyarrow.table({"text": ["a"]}), tmp / "rows.parquet")


def copy_of_model_with(name: str, damage: Callable[[bytes], bytes]) -> Callable[[Path, World], None]:
    def setup(tmp: Path, world: World) -> None:
        shutil.copytree(world.model, tmp / "model")
        path = tmp / "model" / name
        path.write_bytes(damage(path.read_bytes()))

    return setup


def copy_of_head_with(name: str, damage: Callable[[bytes], bytes]) -> Callable[[Path, World], None]:
    """A copy of the trained head (at {tmp}/copy) with one file damaged; `name` is relative to the head folder."""

    def setup(tmp: Path, world: World) -> None:
        shutil.copytree(world.head, tmp / "copy")
        path = tmp / "copy" / name
        path.write_bytes(damage(path.read_bytes()))

    return setup


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def empty(data: bytes) -> bytes:
    return b""


def garbage(data: bytes) -> bytes:
    return b"\x00not a checkpoint" * 8


def copy_of_head(tmp: Path, world: World) -> None:
    shutil.copytree(world.head, tmp / "copy")


def a_file_named_head(tmp: Path, world: World) -> None:
    (tmp / "head").write_text("not a folder")


def a_folder(name: str) -> Callable[[Path, World], None]:
    def setup(tmp: Path, world: World) -> None:
        (tmp / name).mkdir()

    return setup


@dataclass
class Case:
    id: str
    argv: list[str]
    message: str | tuple[str, ...]  # the substring(s) the one line must hold
    setup: Callable[[Path, World], None] | None = None


CASES = [
    # usage errors: argparse, one line from _Parser.error (a number that is no number, in its option's words)
    Case("train-without-output", ["train", "--data", "synthetic"], "the following arguments are required: --output"),
    Case("train-r-not-a-number", [*TRAIN_OUT, "--r", "four"], "argument --r: must be a positive integer, got 'four'"),
    Case("train-unknown-combine", [*TRAIN_OUT, "--combine", "add"], "argument --combine: invalid choice: 'add'"),
    Case("unknown-command", ["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    Case("eval-batch-size-word", [*EVAL, "--batch-size", "eight"],
         "argument --batch-size: must be a positive integer, got 'eight'"),
    Case("train-batch-size-word", [*TRAIN_OUT, "--batch-size", "8.5"],
         "argument --batch-size: must be a positive integer, got '8.5'"),
    # every command's options: their dataclasses' checks (`validation`), before anything is loaded
    Case("train-limit-0", [*TRAIN_OUT, "--limit", "0"],
         "--limit (limit) must be a positive number of examples or None, got 0."),
    Case("eval-batch-size-0", [*EVAL, "--batch-size", "0"],
         "--batch-size (batch_size) must be a positive integer, got 0."),
    Case("eval-generation-limit-negative", [*EVAL, "--generation-limit", "-1"],
         "--generation-limit (generation_limit) must be an integer >= 0 (0: no generation) or None, got -1."),
    Case("eval-max-new-tokens-0", [*EVAL, "--max-new-tokens", "0"],
         "--max-new-tokens (max_new_tokens) must be a positive"),
    Case("eval-max-length-0", [*EVAL, "--max-length", "0"], "--max-length (max_length) must be a positive integer"),
    Case("eval-seed-negative", [*EVAL, "--seed", "-1"],
         "--seed (seed) must be an integer from 0 to 2**32 - 1, got -1."),
    Case("generate-temperature-negative", [*GENERATE, "--temperature", "-1"],
         "--temperature (temperature) must be a finite number >= 0 or None, got -1.0."),
    Case("generate-temperature-nan", [*GENERATE, "--temperature", "nan"],
         "must be a finite number >= 0 or None, got nan"),
    Case("generate-top-k-0", [*GENERATE, "--top-k", "0"],
         "--top-k (top_k) must be a positive integer or None, got 0."),
    Case("generate-max-new-tokens-0", [*GENERATE, "--max-new-tokens", "0"], "--max-new-tokens (max_new_tokens) must"),
    Case("demo-train-minutes-negative", [*DEMO, "--train-minutes", "-1"],
         "--train-minutes (train_minutes) must be a finite positive number, got -1.0."),
    Case("demo-train-minutes-0", [*DEMO, "--train-minutes", "0"], "must be a finite positive number, got 0.0"),
    Case("demo-train-minutes-inf", [*DEMO, "--train-minutes", "inf"], "must be a finite positive number, got inf"),
    Case("demo-lr-0", [*DEMO, "--lr", "0"], "--lr (learning_rate) must be a finite positive number, got 0.0."),
    # training options: TrainingOptions.__post_init__, before the model is loaded
    Case("train-grad-accum-0", [*TRAIN_OUT, "--grad-accum", "0"],
         "--grad-accum (gradient_accumulation_steps) must be a positive integer, got 0."),
    Case("train-epochs-nan", [*TRAIN_OUT, "--epochs", "nan"], "--epochs (epochs) must be a finite number >= 0"),
    Case("train-steps-0-epochs-0", [*TRAIN_OUT, "--steps", "0", "--epochs", "0"],
         "--steps (max_steps) must be a positive integer, or -1 to train for --epochs, got 0."),
    Case("train-epochs-0", [*TRAIN_OUT, "--epochs", "0"], "nothing would be trained"),
    Case("train-time-budget-negative", [*TRAIN_OUT, "--time-budget", "-1"],
         "--time-budget (time_budget_seconds) must be a positive number of seconds"),
    Case("train-save-steps-0", [*TRAIN_OUT, "--save-steps", "0"], "--save-steps (save_steps) must be a positive"),
    Case("train-batch-size-0", [*TRAIN_OUT, "--batch-size", "0"], "--batch-size (batch_size) must be a positive"),
    Case("train-lr-0", [*TRAIN_OUT, "--lr", "0"], "--lr (learning_rate) must be a finite positive number, got 0.0"),
    Case("train-warmup-ratio-1", [*TRAIN_OUT, "--warmup-ratio", "1"], "--warmup-ratio (warmup_ratio) must be"),
    Case("train-max-grad-norm-inf", [*TRAIN_OUT, "--max-grad-norm", "inf"], "--max-grad-norm (max_grad_norm) must be"),
    Case("train-kl-to-base-negative", [*TRAIN_OUT, "--kl-to-base", "-1"],
         "--kl-to-base (kl_to_base) must be a finite number >= 0 (0: off), got -1.0."),
    Case("train-max-length-0", [*TRAIN_OUT, "--max-length", "0"], "--max-length (max_length) must be a positive"),
    Case("train-logging-steps-0", [*TRAIN_OUT, "--logging-steps", "0"], "--logging-steps (logging_steps) must be"),
    Case("train-save-total-limit-0", [*TRAIN_OUT, "--save-total-limit", "0"], "--save-total-limit (save_total_limit)"),
    Case("train-seed-negative", [*TRAIN_OUT, "--seed", "-1"], "--seed (seed) must be an integer from 0 to 2**32 - 1"),
    # head options: BackAttnConfig's own checks
    Case("train-r-0", [*TRAIN_OUT, "--r", "0"], "BackAttnConfig.r must be a positive integer, got 0"),
    Case("train-scaling-negative", [*TRAIN_OUT, "--scaling", "-1"], "BackAttnConfig.scaling must be a finite"),
    # lengths beyond the base's positions: checked on its config, before data or weights are loaded
    Case("train-max-length-beyond-positions", [*TRAIN_OUT, "--max-length", "1000"],
         "--max-length (max_length) is 1000 tokens, beyond the 512 positions the base takes"),
    Case("train-max-length-beyond-learned-positions", [*TRAIN_OUT, "--model", "{gpt2}", "--max-length", "100"],
         "--max-length (max_length) is 100 tokens, beyond the 64 positions the base takes"),
    Case("eval-max-length-beyond-positions", [*EVAL, "--model", "{gpt2}", "--max-length", "100"],
         "--max-length (max_length) is 100 tokens, beyond the 64 positions"),
    Case("eval-generation-beyond-positions", [*EVAL, "--model", "{gpt2}", "--max-length", "64",
                                             "--max-new-tokens", "60"],
         ("prompt (", "plus --max-new-tokens (max_new_tokens) 60", "beyond the 64 positions")),
    Case("demo-base-with-too-few-positions", [*DEMO, "--model", "{gpt2}"],
         "the demo's perplexity length"),
    Case("generate-beyond-positions", [*GENERATE, "--model", "{gpt2}", "--max-new-tokens", "100"],
         ("the prompt (", "plus --max-new-tokens (max_new_tokens) 100", "beyond the 64 positions")),
    # data
    Case("data-missing", [*TRAIN_OUT, "--data", "{tmp}/missing.jsonl"], "missing.jsonl does not exist"),
    Case("data-folder", [*TRAIN_OUT, "--data", "{tmp}/rows.jsonl"], "one file, not a folder", a_folder("rows.jsonl")),
    Case("data-empty-file", [*TRAIN_OUT, "--data", "{tmp}/rows.jsonl"], "is empty", write("rows.jsonl", b"")),
    Case("data-csv", [*TRAIN_OUT, "--data", "{tmp}/rows.csv"], "use a .jsonl, .json, .parquet file",
         write("rows.csv", "question,answer\n")),
    Case("jsonl-last-line-truncated", [*TRAIN_OUT, "--data", "{tmp}/rows.jsonl"],
         "rows.jsonl, line 4: not valid JSON (Unterminated string", write("rows.jsonl", (ROW + "\n") * 3 + ROW[:30])),
    Case("jsonl-last-line-an-array", [*TRAIN_OUT, "--data", "{tmp}/rows.jsonl"],
         "rows.jsonl, line 4: a JSON object per line is expected, got an array",
         write("rows.jsonl", (ROW + "\n") * 3 + "[1,2,3]\n")),
    Case("jsonl-malformed-line", [*EVAL, "--data", "{tmp}/rows.jsonl"], "rows.jsonl, line 2: not valid JSON",
         write("rows.jsonl", ROW + "\n{'question': 'single quotes'}\n" + ROW + "\n")),
    Case("jsonl-bad-utf8", [*EVAL, "--data", "{tmp}/rows.jsonl"], "rows.jsonl, line 3: not UTF-8 text (byte 0xff",
         write("rows.jsonl", ((ROW + "\n") * 2).encode() + b'{"question": "\xff", "answer": "#### 1"}\n')),
    Case("json-document-truncated", [*EVAL, "--data", "{tmp}/rows.json"], "rows.json, line 7: not valid JSON",
         write("rows.json", json.dumps([GSM8K_ROW, GSM8K_ROW], indent=1)[:-40])),
    Case("parquet-garbage", [*EVAL, "--data", "{tmp}/rows.parquet"], "cannot read", write("rows.parquet", "no")),
    Case("parquet-without-the-needed-columns", [*EVAL, "--data", "{tmp}/rows.parquet"],
         "cannot tell which columns hold the problem", parquet_without_the_needed_columns),
    Case("data-without-the-needed-fields", [*EVAL, "--data", "{tmp}/rows.jsonl"], "--fields",
         write("rows.jsonl", json.dumps({"text": "hello", "label": 1}) + "\n")),
    Case("fields-unknown-schema", [*EVAL, "--data", "{tmp}/rows.jsonl", "--fields", "nope"], "unknown schema 'nope'",
         write("rows.jsonl", ROW + "\n")),
    Case("fields-without-solution", [*EVAL, "--data", "{tmp}/rows.jsonl", "--fields", "problem=question"],
         "field mapping 'problem=question' lacks solution", write("rows.jsonl", ROW + "\n")),
    Case("fields-naming-absent-columns", [*EVAL, "--data", "{tmp}/rows.jsonl", "--fields", "problem=q,solution=s"],
         "lacks the field(s) q, s", write("rows.jsonl", ROW + "\n")),
    Case("row-without-an-answer", [*EVAL, "--data", "{tmp}/rows.jsonl"], "rows.jsonl, row 1: the solution",
         write("rows.jsonl", ROW + "\n" + json.dumps({"question": "x?", "answer": "no answer line"}) + "\n")),
    # base models
    Case("unknown-model-folder", [*TRAIN_OUT, "--model", "{tmp}/no-model"], "No model folder at"),
    Case("base-weights-truncated", [*GENERATE, "--model", "{tmp}/model"],
         ("model/model.safetensors is truncated or corrupted",), copy_of_model_with("model.safetensors", half)),
    Case("base-config-broken", [*GENERATE, "--model", "{tmp}/model"], "Cannot load base model",
         copy_of_model_with("config.json", half)),
    # outputs and heads
    Case("train-existing-head-without-overwrite", [*TRAIN, "--output", "{head}", "--steps", "1"], "--overwrite"),
    Case("train-resume-without-checkpoint", [*TRAIN_OUT, "--steps", "1", "--resume"], "no checkpoint"),
    Case("train-output-is-a-file", [*TRAIN_OUT, "--steps", "1"], "is a file", a_file_named_head),
    Case("eval-output-is-a-folder", [*EVAL, "--output", "{tmp}/results"], "is a folder", a_folder("results")),
    Case("eval-nothing-to-evaluate", [*EVAL, "--no-base"], "Nothing to evaluate: --no-base without --heads"),
    Case("eval-missing-head", [*EVAL, "--heads", "{tmp}/no-head"], "No head at"),
    Case("generate-missing-head", [*GENERATE, "--heads", "{tmp}/no-head"], "No head at"),
    Case("generate-empty-problem", [*GENERATE, "--problem", " "], "--problem is empty"),
    Case("eval-head-from-another-base", [*EVAL, "--model", "{wider}", "--heads", "{head}"], "hidden size 32"),
    Case("eval-damaged-head", [*EVAL, "--heads", "{tmp}/copy"], ("copy/adapter_model.safetensors", "truncated"),
         copy_of_head_with("adapter_model.safetensors", half)),
    # damaged checkpoint files when resuming: checked before the Trainer reads them, one line naming the file
    Case("resume-truncated-checkpoint-weights", RESUME, "incomplete: adapter_model.safetensors is trunc",
         copy_of_head_with("checkpoint-2/adapter_model.safetensors", half)),
    Case("resume-empty-optimizer", RESUME, "no complete checkpoint in {tmp}/copy (checkpoint-2 is",
         copy_of_head_with("checkpoint-2/optimizer.pt", empty)),
    Case("resume-garbage-optimizer", RESUME, "checkpoint-2 is incomplete: optimizer.pt is truncated or corrupt",
         copy_of_head_with("checkpoint-2/optimizer.pt", garbage)),
    Case("resume-truncated-scheduler", RESUME, "checkpoint-2 is incomplete: scheduler.pt is truncated or corrupt",
         copy_of_head_with("checkpoint-2/scheduler.pt", half)),
    Case("resume-truncated-rng-state", RESUME, ("rng_state.pth is truncated or corrupt", "train without --resume"),
         copy_of_head_with("checkpoint-2/rng_state.pth", half)),
    Case("resume-truncated-trainer-state", RESUME, "checkpoint-2 is incomplete: trainer_state.json is truncated",
         copy_of_head_with("checkpoint-2/trainer_state.json", half)),
]  # fmt: skip


def tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `roots`: path -> (size, mtime in ns); folders get size -1."""
    state = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                info = path.lstat()
                state[str(path)] = (-1 if name in dirnames else info.st_size, info.st_mtime_ns)
    return state


def fill(value: str, tmp: Path, world: World) -> str:
    return value.format(tmp=tmp, model=world.model, gpt2=world.gpt2, wider=world.wider, head=world.head)


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exited:  # argparse's usage errors
        return exited.code


def check_refused(case: Case, world: World, tmp: Path, capsys) -> None:
    """The one check of every case: status 2, one line on stderr with the message, nothing changed on disk."""
    if case.setup is not None:
        case.setup(tmp, world)
    capsys.readouterr()
    before = tree(tmp, *world.shared())
    code = run_cli([fill(arg, tmp, world) for arg in case.argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, f"stderr is not one line:\n{err}"
    assert err.startswith("peft-backattn"), err
    assert "Traceback" not in err
    messages = (case.message,) if isinstance(case.message, str) else case.message
    for message in messages:
        assert fill(message, tmp, world) in err, err
    assert tree(tmp, *world.shared()) == before, "the failed command changed files on disk"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(case, world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a stray file written to the working folder shows up in the snapshot too
    check_refused(case, world, tmp_path, capsys)


def test_the_table_is_large_and_its_ids_unique():
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


# TrainingOptions refuses the same values from Python, naming the option and the field.
@pytest.mark.parametrize(
    "values, message",
    [
        ({"gradient_accumulation_steps": 0}, "--grad-accum (gradient_accumulation_steps) must be a positive integer"),
        ({"epochs": math.nan}, "--epochs (epochs) must be a finite number >= 0, got nan."),
        ({"max_steps": 0, "epochs": 0}, "--steps (max_steps) must be a positive integer, or -1"),
        ({"max_steps": -2}, "--steps (max_steps) must be a positive integer, or -1"),
        ({"epochs": 0}, "nothing would be trained"),
        ({"time_budget_seconds": -1}, "--time-budget (time_budget_seconds) must be a positive number of seconds"),
        ({"time_budget_seconds": math.inf}, "--time-budget (time_budget_seconds)"),
        ({"save_steps": 0}, "--save-steps (save_steps) must be a positive integer, got 0."),
        ({"batch_size": 2.5}, "--batch-size (batch_size) must be a positive integer, got 2.5."),
        ({"batch_size": True}, "--batch-size (batch_size) must be a positive integer, got True."),
        ({"learning_rate": -1e-3}, "--lr (learning_rate) must be a finite positive number"),
        ({"weight_decay": -0.1}, "--weight-decay (weight_decay) must be a finite number >= 0"),
        ({"warmup_ratio": 5}, "--warmup-ratio (warmup_ratio) must be a fraction of the steps"),
        ({"max_grad_norm": math.nan}, "--max-grad-norm (max_grad_norm)"),
        ({"kl_to_base": -0.5}, "--kl-to-base (kl_to_base) must be a finite number >= 0 (0: off), got -0.5."),
        ({"max_length": 0}, "--max-length (max_length) must be a positive integer"),
        ({"seed": 2**32}, "--seed (seed) must be an integer from 0 to 2**32 - 1"),
        ({"logging_steps": -1}, "--logging-steps (logging_steps) must be a positive integer"),
        ({"save_total_limit": 0}, "--save-total-limit (save_total_limit) must be a positive integer, or None"),
        ({"overwrite": "yes"}, "--overwrite (overwrite) must be True or False"),
        ({"progress_bar": 0}, "--no-progress (progress_bar) must be True or False"),
        ({"save_final": None}, "save_final must be True or False"),
        ({"output_dir": ""}, "--output (output_dir) must be a folder"),
    ],
)
def test_training_options_refuse_bad_values_naming_option_and_field(values, message):
    with pytest.raises(ValueError) as error:
        TrainingOptions(**{"output_dir": "head", **values})
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"train_minutes": 0}, "--train-minutes (train_minutes) must be a finite positive number, got 0."),
        ({"train_minutes": math.nan}, "--train-minutes (train_minutes) must be a finite positive number, got nan."),
        ({"eval_minutes": -1}, "--eval-minutes (eval_minutes) must be a finite number >= 0, got -1."),
        ({"learning_rate": math.inf}, "--lr (learning_rate) must be a finite positive number, got inf."),
        ({"seed": -1}, "--seed (seed) must be an integer from 0 to 2**32 - 1, got -1."),
        ({"output_dir": ""}, "--output-dir (output_dir) must be a folder, got ''."),
    ],
)
def test_demo_options_refuse_bad_values_before_the_demo_starts(tmp_path, values, message):
    """`run_demo` takes DemoOptions, which refuse a bad value when they are built (0 minutes would train without a
    time budget, for 10,000 steps)."""
    with pytest.raises(ValueError) as error:
        DemoOptions(**{"output_dir": str(tmp_path / "demo"), "model": str(tmp_path / "never-loaded"), **values})
    assert str(error.value) == message
    assert not (tmp_path / "demo").exists()


def test_training_options_accept_what_the_trainer_takes():
    TrainingOptions("head")
    TrainingOptions("head", max_steps=5, epochs=0, max_grad_norm=0, save_total_limit=None, time_budget_seconds=0.5)


# A disk filling during a save: the write fails deep inside torch or safetensors with a message that names no file;
# the command line names it. (The Trainer's checkpoint folder is left as the Trainer left it.)
def fail_safetensors_write(*args, **kwargs):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def fail_safetensors_write_with_oserror(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_torch_write(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")


@pytest.mark.parametrize(
    "target, replacement, file, reason",
    [
        ("safetensors.torch.serialize_file", fail_safetensors_write, "adapter_model.safetensors", "no space left"),
        (
            "safetensors.torch.serialize_file",
            fail_safetensors_write_with_oserror,
            "adapter_model.safetensors",
            "no space left on device",
        ),
        (
            "torch.serialization._save",
            fail_torch_write,
            "training_args.bin",
            "the write stopped short, is the disk full?",
        ),
    ],  # fmt: skip
    ids=["safetensors", "safetensors-oserror", "torch"],
)
def test_a_full_disk_during_a_checkpoint_is_one_line_naming_the_file(
    world, tmp_path, monkeypatch, capsys, target, replacement, file, reason
):
    module, _, name = target.rpartition(".")
    monkeypatch.setattr(f"{module}.{name}", replacement)
    output = tmp_path / "head"
    argv = [fill(a, tmp_path, world) for a in [*TRAIN, "--output", str(output), "--steps", "1", "--save-steps", "1"]]
    capsys.readouterr()
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("peft-backattn: error: could not write "), err
    assert f"{output}/checkpoint-1/{file} ({reason}" in err
    assert not (output / "adapter_config.json").exists()  # no final head


def test_a_full_disk_while_writing_the_metrics_names_the_file(world, tmp_path, monkeypatch, capsys):
    from peft_backattn.workbench import evaluation

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(evaluation.json, "dump", full)
    output = tmp_path / "results.json"
    argv = [fill(a, tmp_path, world) for a in [*EVAL, "--generation-limit", "0", "--output", str(output)]]
    capsys.readouterr()
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert err == f"peft-backattn: error: could not write {output} (no space left on device)\n"
    assert not output.exists()


# ---- cached features computed from something else, or damaged (issue 18, items 5 and 6) ---------------------------
# Each setup trains once with --feature-cache {tmp}/features (to {tmp}/first), then changes the base or the cache; the
# command reusing the cache must refuse it in one line before anything trains ({tmp}/head is never created).
FEATURE_CACHE = [*TRAIN_OUT, "--steps", "1", "--feature-cache", "{tmp}/features"]


def a_feature_cache_and(change: Callable[[Path, World], None]) -> Callable[[Path, World], None]:
    def setup(tmp: Path, world: World) -> None:
        command = [*TRAIN, "--output", tmp / "first", "--steps", "1", "--feature-cache", tmp / "features"]
        assert main([fill(str(a), tmp, world) for a in command]) == 0
        change(tmp, world)

    return setup


def same_weights_other_rope_theta_and_eps(tmp: Path, world: World) -> None:
    """{tmp}/model: the very same weights and tokenizer, under another rope_theta and rms_norm_eps."""
    shutil.copytree(world.model, tmp / "model")
    config = json.loads((tmp / "model" / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 500000.0
    config["rms_norm_eps"] = 1e-5
    (tmp / "model" / "config.json").write_text(json.dumps(config))


def flip_4000_bytes_inside_the_rows(tmp: Path, world: World) -> None:
    """The lowest bit of 4,000 bytes flipped from the first stored row on: same size, still a valid Arrow file."""
    path = tmp / "features" / "features.arrow"
    data = bytearray(path.read_bytes())
    first = next(pyarrow.ipc.open_stream(pyarrow.BufferReader(bytes(data)))).column("hidden")[0].values
    start = data.index(first.to_numpy().tobytes())
    data[start : start + 4000] = bytes(byte ^ 1 for byte in data[start : start + 4000])
    path.write_bytes(bytes(data))


FEATURE_CACHE_CASES = [
    Case("feature-cache-of-the-same-weights-under-another-config",
         [*FEATURE_CACHE, "--model", "{tmp}/model"],
         "holds features of another base model config (rms_norm_eps, rope_parameters.rope_theta); choose another",
         a_feature_cache_and(same_weights_other_rope_theta_and_eps)),
    Case("feature-cache-with-4000-bytes-flipped", FEATURE_CACHE,
         "{tmp}/features is damaged (features.arrow does not match the sha256 recorded in fingerprint.json)",
         a_feature_cache_and(flip_4000_bytes_inside_the_rows)),
]  # fmt: skip


@pytest.mark.parametrize("case", FEATURE_CACHE_CASES, ids=[case.id for case in FEATURE_CACHE_CASES])
def test_a_feature_cache_of_another_base_or_damaged_is_refused(case, world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    check_refused(case, world, tmp_path, capsys)


# ---- What a user sees and keeps (issue 18, section C) --------------------------------------------------------------
# An output that cannot be written is refused before anything is loaded: the run would otherwise learn it at its first
# save, after the work. Tests run as root, who may write in any folder, so the unwritable path here is one under a
# regular file. Each case names a model and data that do not exist: the output is checked before either is read.
def a_file(tmp: Path, world: World) -> None:
    (tmp / "a-file").write_text("not a folder")


NO_MODEL = ["--model", "{tmp}/no-model"]
SECTION_C_CASES = [
    Case("train-output-under-a-file", [*TRAIN, *NO_MODEL, "--output", "{tmp}/a-file/head"],
         "--output {tmp}/a-file/head cannot be created: {tmp}/a-file is a file, not a folder", a_file),
    Case("train-output-deep-under-a-file", [*TRAIN, *NO_MODEL, "--output", "{tmp}/a-file/runs/1/head"],
         "--output {tmp}/a-file/runs/1/head cannot be created: {tmp}/a-file is a file", a_file),
    Case("train-feature-cache-under-a-file", [*TRAIN_OUT, *NO_MODEL, "--feature-cache", "{tmp}/a-file/features"],
         "--feature-cache {tmp}/a-file/features cannot be created: {tmp}/a-file is a file", a_file),
    Case("train-streaming-output-under-a-file",
         [*TRAIN, *NO_MODEL, "--data", "{tmp}/no-data.jsonl", "--streaming", "--steps", "2", "--output",
          "{tmp}/a-file/head"], "--output {tmp}/a-file/head cannot be created", a_file),
    Case("eval-output-under-a-file", [*EVAL, *NO_MODEL, "--output", "{tmp}/a-file/results.json"],
         "--output {tmp}/a-file/results.json cannot be created: {tmp}/a-file is a file", a_file),
    Case("demo-output-dir-under-a-file", [*DEMO, *NO_MODEL, "--output-dir", "{tmp}/a-file/demo"],
         "--output-dir (output_dir) {tmp}/a-file/demo cannot be created: {tmp}/a-file is a file", a_file),
    Case("demo-output-dir-is-a-file", [*DEMO, *NO_MODEL, "--output-dir", "{tmp}/a-file"],
         "--output-dir (output_dir) {tmp}/a-file cannot be created: {tmp}/a-file is a file", a_file),
]  # fmt: skip


# A streamed data set ends before --steps: training stops there unless --repeat-stream is given (item 10); a stream
# too short for one optimiser step is an error either way, as repeating it would never reach --steps.
STREAM = [*TRAIN_OUT, "--data", "{tmp}/rows.jsonl", "--streaming", "--steps", "3"]
SECTION_C_CASES += [
    Case("train-repeat-stream-without-streaming", [*TRAIN_OUT, *NO_MODEL, "--steps", "2", "--repeat-stream"],
         "--repeat-stream (repeat_stream) starts a streamed data set again; without --streaming, give --epochs"),
    Case("train-stream-shorter-than-one-step", [*STREAM, "--grad-accum", "2", "--repeat-stream"],
         ("The streamed data ended after its 1 example without an optimiser step", "= 8 examples per process",
          "no head was saved"), write("rows.jsonl", ROW + "\n")),
]  # fmt: skip


@pytest.mark.parametrize("case", SECTION_C_CASES, ids=[case.id for case in SECTION_C_CASES])
def test_unwritable_outputs_and_streams_are_refused_in_one_line_and_change_nothing(
    case, world, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    check_refused(case, world, tmp_path, capsys)


def test_a_read_only_output_folder_is_refused_before_anything_is_loaded(world, tmp_path, monkeypatch, capsys):
    """A folder this user may not write in (as root, only a read-only file system is one: its answer is faked)."""
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_access = os.access

    def access(path, mode, **kwargs):
        return False if Path(path) == read_only and mode & os.W_OK else real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    case = Case("train-output-read-only", [*TRAIN, *NO_MODEL, "--output", "{tmp}/read-only/head"],
                "--output {tmp}/read-only/head cannot be written: {tmp}/read-only is not writable")  # fmt: skip
    check_refused(case, world, tmp_path, capsys)


def test_train_head_refuses_an_output_it_cannot_write_before_it_trains(world, tmp_path, monkeypatch):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_backattn import BackAttnConfig
    from peft_backattn.workbench.synthetic import generate_examples
    from peft_backattn.workbench.training import train_head

    a_file(tmp_path, world)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(world.model), BackAttnConfig(r=4))
    monkeypatch.setattr("peft_backattn.workbench.training.tokenize_examples", pytest.fail)  # no work may start
    options = TrainingOptions(output_dir=str(tmp_path / "a-file" / "head"), max_steps=1, progress_bar=False)
    with pytest.raises(
        ValueError, match=r"--output \(output_dir\) .*a-file/head cannot be created: .*a-file is a file"
    ):
        train_head(model, AutoTokenizer.from_pretrained(world.model), generate_examples(4), options)
    options = TrainingOptions(str(tmp_path / "head"), max_steps=1, feature_cache=str(tmp_path / "a-file" / "cache"))
    with pytest.raises(ValueError, match=r"--feature-cache \(feature_cache\) .*a-file/cache cannot be created"):
        train_head(model, AutoTokenizer.from_pretrained(world.model), generate_examples(4), options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
