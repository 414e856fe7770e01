"""The scripts in examples/ run as a user runs them (a fresh process each), on a tiny model folder in seconds.

Each script defaults to the embedded SmolLM2 base; here `--model` points at a tiny Llama saved with its tokenizer,
and the size options are turned down. The assertions read the line each script prints to show its point.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_lm

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("examples") / "model")


def run_example(script: str, *args: str | Path, cwd: Path) -> str:
    """Run examples/<script> in a new process and return its standard output; fail with its stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [sys.executable, str(EXAMPLES / script), *(str(a) for a in args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def swapped(model_dir, tmp_path_factory) -> tuple[str, Path]:
    """swap_heads.py's output and the folder of the two heads it trained (reused by the mixed-batch test)."""
    work = tmp_path_factory.mktemp("swap")
    output = work / "heads"
    stdout = run_example(
        "swap_heads.py", "--model", model_dir, "--steps", "2", "--r", "8", "--output", output, cwd=work
    )
    return stdout, output


def test_train_math_head(model_dir, tmp_path):
    output = tmp_path / "math_head"
    stdout = run_example(
        "train_math_head.py", "--model", model_dir, "--train-problems", "16", "--eval-problems", "4",
        "--generation-limit", "2", "--steps", "2", "--batch-size", "4", "--r", "8", "--max-new-tokens", "4",
        "--output", output, cwd=tmp_path,
    )  # fmt: skip
    table = [line.split()[0] for line in stdout.splitlines() if line.startswith(("model ", "base ", "math "))]
    assert table == ["model", "base", "math"], stdout
    assert f"Head saved to {output}" in stdout
    assert (output / "adapter_model.safetensors").is_file()


def test_swap_heads_equal_each_head_alone(swapped):
    stdout, _ = swapped
    differences = re.findall(r"set_adapter\('(\w+)'\): .* vs \1 alone: (\S+)", stdout)
    assert [name for name, _ in differences] == ["math_head", "short_head", "math_head"], stdout
    assert all(float(value) == 0.0 for _, value in differences), stdout


def test_mixed_head_batch_with_saved_heads(swapped, model_dir, tmp_path):
    _, heads = swapped
    stdout = run_example(
        "mixed_head_batch.py", "--model", model_dir, "--heads", heads / "math_head", heads / "short_head",
        "--max-new-tokens", "4", cwd=tmp_path,
    )  # fmt: skip
    assert "adapter_names=['__base__', 'math_head', 'short_head', 'math_head']" in stdout
    assert stdout.count("equals that head alone: True") == 4, stdout
    assert "equals that head alone: False" not in stdout


def test_four_bit_base(model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    output = tmp_path / "head"
    stdout = run_example(
        "four_bit_base.py", "--model", model_dir, "--steps", "2", "--r", "8", "--output", output, cwd=tmp_path
    )
    assert re.search(r"Base: [1-9]\d* linear layers in nf4", stdout), stdout
    assert "Saved only the head: 4 head tensors" in stdout
