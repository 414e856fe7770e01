"""The command line as a user calls it: train, eval, generate, demo, multi-process training, and its errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers
from conftest import save_tiny_lm
from safetensors.torch import load_file
from test_progress_and_plots import png_size

from peft_backattn.cli import build_parser, main

TRAIN = ["--data", "synthetic", "--limit", "24", "--batch-size", "4", "--max-length", "128", "--no-progress"]
HEAD_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def train(model_dir, output, *extra) -> int:
    return run_cli("train", "--model", model_dir, *TRAIN, "--output", output, *extra)


@pytest.fixture(scope="module")
def trained(tiny_lm_dir, tmp_path_factory) -> Path:
    """A head trained through the command line, shared by the eval and generate tests."""
    output = tmp_path_factory.mktemp("cli") / "math_head"
    assert train(tiny_lm_dir, output, "--steps", "4", "--save-steps", "2", "--lr", "0.01") == 0
    return output


def test_train_saves_only_the_head_and_checkpoints(trained):
    assert HEAD_FILES <= {p.name for p in trained.iterdir()}
    saved = load_file(trained / "adapter_model.safetensors")
    assert all(".backattn_heads." in key for key in saved)
    checkpoints = sorted(p.name for p in trained.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    for checkpoint in checkpoints:
        assert not (trained / checkpoint / "model.safetensors").exists()


def test_train_resumes_from_its_last_checkpoint(tiny_lm_dir, trained, tmp_path, capsys):
    output = tmp_path / "head"
    shutil.copytree(trained, output)
    assert train(tiny_lm_dir, output, "--steps", "6", "--save-steps", "2", "--resume") == 0
    assert "Trained 6 steps" in capsys.readouterr().out
    assert (output / "checkpoint-6").is_dir()


def test_train_on_cached_features_for_two_epochs(tiny_lm_dir, tmp_path, capsys):
    cache = tmp_path / "features"
    assert train(tiny_lm_dir, tmp_path / "head", "--feature-cache", cache, "--epochs", "2", "--lr", "0.01") == 0
    out = capsys.readouterr().out
    assert "trained positions of 24 examples" in out and "Training the head alone on" in out
    assert "Trained 12 steps" in out  # 24 examples, 4 examples' worth of positions per step, two epochs
    assert HEAD_FILES <= {p.name for p in (tmp_path / "head").iterdir()}
    assert {p.name for p in cache.iterdir()} == {"features.arrow", "fingerprint.json"}

    assert train(tiny_lm_dir, tmp_path / "second", "--feature-cache", cache, "--epochs", "1", "--r", "4") == 0
    out = capsys.readouterr().out
    assert f"Feature cache: reusing {cache}" in out and "Trained 6 steps" in out


def test_a_file_as_feature_cache_is_one_line_before_anything_is_loaded(tmp_path, capsys):
    a_file = tmp_path / "features"
    a_file.write_text("")
    assert run_cli("train", "--data", "synthetic", "--output", tmp_path / "head", "--feature-cache", a_file) == 2
    err = capsys.readouterr().err
    assert err == f"peft-backattn: error: --feature-cache {a_file} is a file; pass a folder for the cached features.\n"
    assert not (tmp_path / "head").exists()


def test_eval_writes_every_metric_for_base_and_head(tiny_lm_dir, trained, tmp_path, capsys):
    output = tmp_path / "results.json"
    code = run_cli(
        "eval", "--model", tiny_lm_dir, "--heads", trained, "--data", "synthetic", "--limit", "6",
        "--max-new-tokens", "8", "--output", output,
    )  # fmt: skip
    assert code == 0
    results = json.loads(output.read_text())["results"]
    assert set(results) == {"base", "math_head"}
    for metrics in results.values():
        assert {"perplexity", "exact_match", "mse", "rmse", "precision", "recall", "f1", "n"} <= set(metrics)
        assert metrics["n"] == 6 and metrics["perplexity"] > 1
    assert results["base"]["perplexity"] != results["math_head"]["perplexity"]
    table = capsys.readouterr().out
    assert "math_head" in table and "perplexity" in table


def test_generate_answers_side_by_side(tiny_lm_dir, trained, tmp_path, capsys):
    second = tmp_path / "second_head"
    shutil.copytree(trained, second)
    code = run_cli(
        "generate", "--model", tiny_lm_dir, "--heads", trained, second, "--base", "--problem", "What is 2 + 3?",
        "--max-new-tokens", "5",
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("===")] == [
        "=== base ===",
        "=== math_head ===",
        "=== second_head ===",
    ]


def test_generate_at_temperature_zero_is_greedy(tiny_lm_dir, trained, capsys):
    """--temperature 0 used to sample at temperature 1; it means greedy, whatever the seed."""
    common = ["generate", "--model", tiny_lm_dir, "--heads", trained, "--problem", "What is 2 + 3?"]
    answers = []
    for extra in ([], ["--temperature", "0", "--seed", "1"], ["--temperature", "0", "--seed", "2", "--top-k", "5"]):
        assert run_cli(*common, "--max-new-tokens", "12", *extra) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] == answers[2]


@pytest.fixture(scope="module")
def short_lm_dir(tmp_path_factory) -> Path:
    """A tiny base that takes 128 positions: fewer than the default --max-length of train (256) and eval (512)."""
    return save_tiny_lm(tmp_path_factory.mktemp("short_lm") / "model", positions=128)


@pytest.mark.parametrize("command, default", [("train", 256), ("eval", 512)])
def test_a_default_max_length_fits_a_base_with_fewer_positions(short_lm_dir, tmp_path, capsys, command, default):
    """Without --max-length, train and eval use the 128 positions the base takes and say so in one line; a
    --max-length given beyond them is refused as before, in one line, before anything is loaded or written."""
    if command == "train":
        options = ["--data", "synthetic", "--limit", "8", "--batch-size", "4", "--steps", "1", "--no-progress"]
        first, second = [*options, "--output", tmp_path / "head"], [*options, "--output", tmp_path / "other"]
    else:
        options = ["--data", "synthetic", "--limit", "2", "--generation-limit", "0", "--no-progress"]
        first, second = [*options, "--output", tmp_path / "m.json"], [*options, "--output", tmp_path / "n.json"]
    assert run_cli(command, "--model", short_lm_dir, *first) == 0
    out = capsys.readouterr().out
    notice = f"--max-length (max_length) not given: 128 tokens, the positions the base takes (the default, {default}"
    assert [line for line in out.splitlines() if "not given" in line] == [f"{notice}, is beyond them)"]
    if command == "train":
        assert "| max length (tokens) | 128 |" in (tmp_path / "head" / "README.md").read_text()
    else:
        assert json.loads((tmp_path / "m.json").read_text())["results"]["base"]["perplexity"] > 1

    assert run_cli(command, "--model", short_lm_dir, *second, "--max-length", "256") == 2
    assert_clean_error(capsys, "--max-length (max_length) is 256 tokens, beyond the 128 positions the base takes")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["head"] if command == "train" else ["m.json"])


def test_eval_generation_limit_zero_skips_generation(tiny_lm_dir, tmp_path, capsys):
    output = tmp_path / "results.json"
    code = run_cli(
        "eval", "--model", tiny_lm_dir, "--data", "synthetic", "--limit", "3", "--generation-limit", "0",
        "--output", output,
    )  # fmt: skip
    assert code == 0
    base = json.loads(output.read_text())["results"]["base"]
    assert base["n"] == 0 and base["perplexity"] > 1
    assert [base[name] for name in ("exact_match", "rmse", "precision", "recall", "f1")] == [None] * 5
    assert "No generation (--generation-limit 0)" in capsys.readouterr().out


def test_demo_runs_end_to_end_on_a_small_base(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    from peft_backattn.workbench import demo

    monkeypatch.setattr(demo, "TRAIN_PROBLEMS", 40)
    monkeypatch.setattr(demo, "PERPLEXITY_PROBLEMS", 6)
    monkeypatch.setattr(demo, "GENERATION_PROBLEMS", 4)
    monkeypatch.setattr(demo, "MAX_NEW_TOKENS", 6)
    monkeypatch.setattr(demo, "GENERATION_BATCH", 2)
    monkeypatch.setattr(demo, "SECOND_HEAD_MINUTES", 0.02)
    code = run_cli("demo", "--model", tiny_lm_dir, "--output-dir", tmp_path, "--train-minutes", "0.05")
    assert code == 0
    summary = json.loads((tmp_path / "demo_results.json").read_text())
    assert summary["reload_max_logit_difference"] == 0.0
    assert summary["swap_max_logit_difference"] == 0.0
    assert set(summary["results"]) == {"base", "math"}
    assert HEAD_FILES <= {p.name for p in (tmp_path / "math_head").iterdir()}
    assert HEAD_FILES <= {p.name for p in (tmp_path / "short_head").iterdir()}
    out = capsys.readouterr().out
    assert "perplexity" in out
    pictures = [tmp_path / "training_loss.png", tmp_path / "base_vs_head.png"]
    assert summary["pictures"] == [str(p) for p in pictures]
    for picture in pictures:
        assert png_size(picture)[0] > 0
    assert f"Pictures: {pictures[0]}, {pictures[1]}" in out
    for head in ("math_head", "short_head"):  # DemoOptions.learning_rate, the rate the documented numbers had
        assert "| learning rate (AdamW) | 0.002 |" in (tmp_path / head / "README.md").read_text()


def test_demo_without_matplotlib_says_how_to_get_the_pictures(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    from peft_backattn.workbench import demo, plots

    monkeypatch.setattr(plots, "Figure", None)
    for name, value in [("TRAIN_PROBLEMS", 16), ("PERPLEXITY_PROBLEMS", 4), ("GENERATION_PROBLEMS", 4),
                        ("MAX_NEW_TOKENS", 2), ("SECOND_HEAD_MINUTES", 0.01)]:  # fmt: skip
        monkeypatch.setattr(demo, name, value)
    code = run_cli(
        "demo", "--model", tiny_lm_dir, "--output-dir", tmp_path, "--train-minutes", "0.01", "--no-progress",
        "--lr", "0.005",
    )  # fmt: skip
    assert code == 0
    assert 'pip install "peft-backattn[plots]"' in capsys.readouterr().out
    assert "| learning rate (AdamW) | 0.005 |" in (tmp_path / "math_head" / "README.md").read_text()
    assert not list(tmp_path.glob("*.png"))
    assert json.loads((tmp_path / "demo_results.json").read_text())["pictures"] == []


def test_demo_evaluation_budget_cuts_generation_short_and_says_so(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    from peft_backattn.workbench import demo

    for name, value in [("TRAIN_PROBLEMS", 16), ("PERPLEXITY_PROBLEMS", 12), ("GENERATION_PROBLEMS", 12),
                        ("GENERATION_BATCH", 4), ("MAX_NEW_TOKENS", 3), ("SECOND_HEAD_MINUTES", 0.01)]:  # fmt: skip
        monkeypatch.setattr(demo, name, value)
    code = run_cli(
        "demo", "--model", tiny_lm_dir, "--output-dir", tmp_path, "--train-minutes", "0.01", "--eval-minutes", "0",
        "--no-progress",
    )  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "demo_results.json").read_text())["results"]
    assert results["base"]["n"] == results["math"]["n"] == 0  # a spent budget starts no generation batch
    assert results["base"]["exact_match"] is None and results["math"]["exact_match"] is None
    assert results["base"]["perplexity_problems"] == results["math"]["perplexity_problems"] == 4  # one batch
    out = capsys.readouterr().out
    assert "perplexity on 4 of 12 problems, answers scored on 0 of 12 (both models on the same problems)" in out
    assert "no answers scored (the evaluation budget ran out before generation)" in out


def test_demo_shortens_its_evaluation_when_earlier_steps_ran_long():
    from peft_backattn.workbench import demo

    now = time.monotonic()
    assert demo._evaluation_seconds(now, 3.0, 2.5) == 150.0  # on time: the whole budget
    late = demo._evaluation_seconds(now - 400, 3.0, 2.5)  # 600 s promised, 90 s kept for steps 5 and 6
    assert 109.0 < late <= 110.0
    assert demo._evaluation_seconds(now - 700, 3.0, 2.5) == 0.0
    assert demo._evaluation_seconds(now - 400, 8.0, 2.5) == 150.0  # 5 more minutes of training move the promise


@pytest.mark.parametrize("no_progress", [False, True], ids=["progress", "no-progress"])
def test_eval_shows_progress_lines_in_a_log_unless_told_not_to(tiny_lm_dir, trained, monkeypatch, capsys, no_progress):
    monkeypatch.setattr("peft_backattn.workbench.progress.LINE_INTERVAL_SECONDS", 0)  # a line per batch
    code = run_cli(
        "eval", "--model", tiny_lm_dir, "--heads", trained, "--no-base", "--data", "synthetic", "--limit", "4",
        "--batch-size", "2", "--max-new-tokens", "2", *(["--no-progress"] if no_progress else []),
    )  # fmt: skip
    assert code == 0
    out, err = capsys.readouterr()
    progress_lines = [
        line.strip() for line in out.splitlines() if " in " in line and ("batches" in line or "problems" in line)
    ]
    if no_progress:
        assert progress_lines == []
    else:
        assert [line.split(" in ")[0] for line in progress_lines] == [
            "perplexity: 1/2 batches", "perplexity: 2/2 batches",
            "generating: 2/4 problems", "generating: 4/4 problems",
        ]  # fmt: skip
        assert "tokens/s" in progress_lines[-1]
    assert err == ""


def test_train_ends_with_its_loss_curve(tiny_lm_dir, tmp_path, capsys):
    output = tmp_path / "head"
    assert train(tiny_lm_dir, output, "--steps", "4", "--logging-steps", "2") == 0
    assert png_size(output / "training_loss.png")[0] > 0
    assert f"Loss curve: {output / 'training_loss.png'}" in capsys.readouterr().out


WITH_PROGRESS = [arg for arg in TRAIN if arg != "--no-progress"]


def test_train_with_stderr_in_a_file_writes_no_carriage_returns(tiny_lm_dir, tmp_path):
    """The Trainer's bar follows the package's own terminal test: with stderr redirected to a file, no bar."""
    command = [sys.executable, "-m", "peft_backattn.cli", "train", "--model", str(tiny_lm_dir), *WITH_PROGRESS,
               "--steps", "3", "--output", str(tmp_path / "head")]  # fmt: skip
    with open(tmp_path / "err.log", "wb") as err, open(tmp_path / "out.log", "wb") as out:
        result = subprocess.run(
            command, stdout=out, stderr=err, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1")
        )
    log = (tmp_path / "err.log").read_bytes() + (tmp_path / "out.log").read_bytes()
    assert result.returncode == 0, log.decode()[-3000:]
    assert b"\r" not in log and b"Trained 3 steps" in log


def test_train_shows_progress_lines_in_a_log_and_the_bar_on_a_terminal(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("peft_backattn.workbench.progress.LINE_INTERVAL_SECONDS", 0)  # a line per step
    assert run_cli("train", "--model", tiny_lm_dir, *WITH_PROGRESS, "--steps", "3", "--output", tmp_path / "log") == 0
    out, err = capsys.readouterr()
    lines = [line.strip().split(" in ")[0] for line in out.splitlines() if line.strip().startswith("training: ")]
    assert lines == ["training: 1/3 steps", "training: 2/3 steps", "training: 3/3 steps"], out
    assert "\r" not in out + err

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert run_cli("train", "--model", tiny_lm_dir, *WITH_PROGRESS, "--steps", "3", "--output", tmp_path / "tty") == 0
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()  # tqdm's bar
    assert "training: " not in capsys.readouterr().out


def test_every_option_has_help_text():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


def assert_clean_error(capsys, expected: str) -> None:
    """The error is one line, the last one on stderr (progress bars may come before it), with no traceback."""
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1].split("\r")[-1]
    assert last.startswith("peft-backattn: error: "), err
    assert "Traceback" not in err
    assert expected in last, last


def test_wrong_data_path(tiny_lm_dir, tmp_path, capsys):
    output = tmp_path / "head"
    code = run_cli("train", "--model", tiny_lm_dir, "--data", tmp_path / "missing.jsonl", "--output", output)
    assert code == 2
    assert_clean_error(capsys, "missing.jsonl")
    assert not output.exists()


def test_unknown_model(tmp_path, capsys):
    output = tmp_path / "head"
    assert run_cli("train", "--model", tmp_path / "no-model", *TRAIN, "--output", output) == 2
    assert_clean_error(capsys, "pass an existing folder")
    assert not output.exists()


def test_dataset_without_the_needed_fields(tiny_lm_dir, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "hello", "label": 1}) + "\n")
    output = tmp_path / "results.json"
    assert run_cli("eval", "--model", tiny_lm_dir, "--data", data, "--output", output) == 2
    assert_clean_error(capsys, "--fields")
    assert not output.exists()


def test_head_from_another_base(trained, tmp_path, capsys):
    other = save_tiny_lm(tmp_path / "wider", hidden=48)
    output = tmp_path / "results.json"
    code = run_cli(
        "eval", "--model", other, "--heads", trained, "--data", "synthetic", "--limit", "2", "--output", output
    )
    assert code == 2
    assert_clean_error(capsys, "hidden size 32")
    assert not output.exists()


def test_existing_head_is_not_overwritten_silently(tiny_lm_dir, trained, capsys):
    before = (trained / "adapter_model.safetensors").read_bytes()
    assert train(tiny_lm_dir, trained, "--steps", "1") == 2
    assert_clean_error(capsys, "--overwrite")
    assert (trained / "adapter_model.safetensors").read_bytes() == before


def test_resume_without_a_checkpoint(tiny_lm_dir, tmp_path, capsys):
    assert train(tiny_lm_dir, tmp_path / "fresh", "--steps", "1", "--resume") == 2
    assert_clean_error(capsys, "no checkpoint")


def tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_resume_with_only_incomplete_checkpoints_changes_nothing(tiny_lm_dir, trained, tmp_path, capsys):
    output = tmp_path / "head"
    shutil.copytree(trained, output)
    (output / "checkpoint-2" / "optimizer.pt").unlink()
    (output / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4')  # cut short
    before = tree(output)
    assert train(tiny_lm_dir, output, "--steps", "6", "--resume") == 2
    assert capsys.readouterr().err == (
        f"peft-backattn: error: --resume: no complete checkpoint in {output} (checkpoint-4 is incomplete: "
        "trainer_state.json is truncated or corrupt; checkpoint-2 is incomplete: no optimizer.pt); train without "
        "--resume to start over.\n"
    )
    assert tree(output) == before


def test_a_diverging_run_stops_with_one_line_and_saves_nothing(tiny_lm_dir, tmp_path, capsys):
    output = tmp_path / "head"
    assert train(tiny_lm_dir, output, "--steps", "4", "--lr", "1e38") == 2
    assert capsys.readouterr().err == (
        "peft-backattn: error: Training diverged at step 1: the head's weights hold NaN or infinite values; lower "
        "the learning rate (--lr, now 1e+38); no head was saved.\n"
    )
    assert not output.exists()


def test_a_non_finite_loss_stops_the_run_even_with_finite_weights(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    compute_loss = transformers.Trainer.compute_loss

    def infinite(self, *args, **kwargs):  # a constant added to the loss: the gradients stay finite
        return compute_loss(self, *args, **kwargs) + float("inf")

    monkeypatch.setattr(transformers.Trainer, "compute_loss", infinite)
    assert train(tiny_lm_dir, tmp_path / "head", "--steps", "4", "--logging-steps", "1") == 2
    assert capsys.readouterr().err == (
        "peft-backattn: error: Training diverged at step 1: the loss is inf; lower the learning rate (--lr, now "
        "0.001); no head was saved.\n"
    )
    assert not (tmp_path / "head").exists()


def test_a_run_that_fails_before_its_first_step_leaves_no_folder_it_created(tiny_lm_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(transformers.Trainer, "training_step", fail)
    assert train(tiny_lm_dir, tmp_path / "runs" / "head") == 2
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()  # a folder the user had is kept, even empty
    assert train(tiny_lm_dir, tmp_path / "mine") == 2
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_four_bit_base_from_the_command_line(tiny_lm_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    output = tmp_path / "head"
    assert train(tiny_lm_dir, output, "--steps", "2", "--load-in-4bit") == 0
    assert HEAD_FILES <= {p.name for p in output.iterdir()}


def test_two_process_training_with_accelerate_launch(tiny_lm_dir, tmp_path):
    launcher = shutil.which("accelerate")
    if launcher is None:
        pytest.skip("accelerate's launcher is not on PATH")
    output = tmp_path / "head"
    command = [
        # On a machine without GPUs, --multi_gpu starts the processes with the gloo backend; --cpu would start one.
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "peft_backattn.cli", "train", "--model", str(tiny_lm_dir), *TRAIN,
        "--steps", "3", "--output", str(output),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Trained 3 steps on 2 processes") == 1  # printed by the main process only
    assert result.stdout.count("Training data: ") == 1
    assert HEAD_FILES <= {p.name for p in output.iterdir()}


def test_module_entry_point_and_console_script():
    result = subprocess.run([sys.executable, "-m", "peft_backattn.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout
    script = shutil.which("peft-backattn")
    if script is not None:
        assert subprocess.run([script, "--version"], capture_output=True, text=True).returncode == 0


def test_a_contextual_head_trains_evaluates_and_answers_from_the_command_line(tiny_lm_dir, tmp_path, capsys):
    """The context fields reach `train` through the generated options like every other config field; the saved head
    is contextual, with the layers resolved, and eval and generate run it (generate with its own decoding cache)."""
    output = tmp_path / "ctx_head"
    extra = ["--context", "--context-layers", "0", "-1", "--context-dim", "16", "--context-heads", "2"]
    assert train(tiny_lm_dir, output, "--steps", "2", "--kl-to-base", "0.5", *extra) == 0
    config = json.loads((output / "adapter_config.json").read_text())
    assert (config["context"], config["context_layers"], config["context_dim"]) == (True, [0, 1], 16)
    assert any(".context." in key for key in load_file(output / "adapter_model.safetensors"))
    capsys.readouterr()
    assert (
        run_cli("generate", "--model", tiny_lm_dir, "--heads", output, "--problem", "2 + 3?", "--max-new-tokens", "6")
        == 0
    )
    assert "=== ctx_head ===" in capsys.readouterr().out
    results = tmp_path / "eval.json"
    common = ["--data", "synthetic", "--limit", "4", "--max-length", "128", "--no-progress", "--output", results]
    assert run_cli("eval", "--model", tiny_lm_dir, "--heads", output, *common) == 0
    scores = json.loads(results.read_text())["results"]
    assert scores["ctx_head"]["perplexity"] != scores["base"]["perplexity"]  # the trained head changes the output
