"""Scaling out: the accelerate config files in examples/accelerate load, DeepSpeed ZeRO-2 trains a head with two
CPU processes and saves only the head, and cached features train on two processes (DDP) as on one, for the seed's
head (batches of positions) and a contextual head (batches of whole examples); ordinary DDP training with two CPU
processes is tested in test_cli.py."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from peft_backattn.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
TRAIN = ["--data", "synthetic", "--limit", "24", "--batch-size", "4", "--max-length", "128", "--no-progress"]
HEAD_FILE = "adapter_model.safetensors"
HEAD_KEYS = {
    f"base_model.model.lm_head.backattn_heads.{n}" for n in ("norm_scale", "value_proj", "key_proj", "query_proj")
}


@pytest.mark.parametrize(
    ("name", "kind"),
    [("ddp", DistributedType.MULTI_GPU), ("deepspeed_zero2", DistributedType.DEEPSPEED),
     ("deepspeed_zero3", DistributedType.DEEPSPEED), ("fsdp", DistributedType.FSDP)],
)  # fmt: skip
def test_the_accelerate_config_files_load(name, kind):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type == kind and config.num_processes == 2
    if kind == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
        # Must equal the Trainer's (TrainingOptions' defaults), or DeepSpeed refuses the mismatch.
        assert config.deepspeed_config["gradient_accumulation_steps"] == 1
        assert config.deepspeed_config["gradient_clipping"] == 1.0
    if kind == DistributedType.FSDP:
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"  # the head stays in the root


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason='DeepSpeed is the optional extra peft-backattn[deepspeed] (pip install "deepspeed==0.19.8"); not installed',
)
def test_deepspeed_zero2_trains_with_two_cpu_processes_and_saves_only_the_head(tiny_lm_dir, tmp_path):
    """About 1-2 minutes on 2 cores (plus a one-time build of DeepSpeed's CPU communication op, ~1 minute)."""
    launcher = shutil.which("accelerate")
    if launcher is None:
        pytest.skip("accelerate's launcher is not on PATH")
    output = tmp_path / "head"
    command = [
        launcher, "launch", "--config_file", str(CONFIGS / "deepspeed_zero2.yaml"), "-m", "peft_backattn.cli",
        "train", "--model", str(tiny_lm_dir), *TRAIN, "--steps", "2", "--save-steps", "2", "--output", str(output),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Trained 2 steps on 2 processes") == 1, result.stdout
    head = load_file(output / "adapter_model.safetensors")
    assert set(head) == HEAD_KEYS
    assert set(load_file(output / "checkpoint-2" / "adapter_model.safetensors")) == HEAD_KEYS
    # DeepSpeed's own checkpoint also holds the frozen output matrix (tied to the embeddings here), as noted in
    # docs/training.md: the head folder is what to keep.
    (states,) = (output / "checkpoint-2").glob("global_step2/mp_rank_00_model_states.pt")
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    assert "base_model.model.lm_head.base_layer.weight" in module


def test_cached_features_train_on_two_processes_as_on_one(tiny_lm_dir, tmp_path, capsys):
    """`--feature-cache` under `accelerate launch` with two CPU processes (DDP, gloo): the main process computes the
    cache, both train on it, and 2 examples' worth of positions per process take the steps that 4 take in one
    process (each process gets its half of the one-process batch): the same logged losses and head, over 3 steps
    that cross an epoch. About 20 s on 2 cores."""
    two, one = cached_run_on_two_processes_and_one(tiny_lm_dir, tmp_path, capsys)
    assert two.count("Trained 3 steps on 2 processes") == 1 and two.count("positions written") == 1  # one pass

    (positions, per_process), (_, per_step) = cached_batches(two), cached_batches(one)
    assert per_step == 2 * per_process and positions < 3 * per_step  # the same global batch; an epoch is crossed
    assert re.findall(r"step \d+: loss [\d.]+", two) == re.findall(r"step \d+: loss [\d.]+", one)
    on_two, on_one = load_file(tmp_path / "two" / HEAD_FILE), load_file(tmp_path / "one" / HEAD_FILE)
    assert set(on_two) == set(on_one) == HEAD_KEYS
    for key in on_one:
        torch.testing.assert_close(on_two[key], on_one[key], rtol=1e-5, atol=1e-6, msg=key)


def cached_run_on_two_processes_and_one(model_dir, tmp_path, capsys, extra: tuple[str, ...] = ()) -> tuple[str, str]:
    """`train --feature-cache` for 3 steps on 8 synthetic examples: under `accelerate launch` with two CPU processes
    (DDP, gloo) at `--batch-size 2` into tmp_path/two, then in this process at `--batch-size 4` into tmp_path/one,
    reusing the cache the first run left complete; the two printouts."""
    launcher = shutil.which("accelerate")
    if launcher is None:
        pytest.skip("accelerate's launcher is not on PATH")
    cached = [
        "train", "--model", str(model_dir), "--data", "synthetic", "--limit", "8", "--max-length", "128",
        "--no-progress", "--steps", "3", "--logging-steps", "1", "--feature-cache", str(tmp_path / "features"), *extra,
    ]  # fmt: skip
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "peft_backattn.cli", *cached, "--batch-size", "2", "--output",
        str(tmp_path / "two"),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main([*cached, "--batch-size", "4", "--output", str(tmp_path / "one")]) == 0
    one = capsys.readouterr().out
    assert "Feature cache: reusing" in one  # the two-process run left a complete cache
    return result.stdout, one


def cached_batches(output: str) -> tuple[int, int]:
    """(cached positions, positions per step and process) from a cached run's printed line."""
    found = re.search(r"alone on ([\d,]+) cached positions, ([\d,]+) per step", output)
    assert found, output
    return int(found[1].replace(",", "")), int(found[2].replace(",", ""))


def test_a_contextual_head_trains_on_cached_features_on_two_processes_as_on_one(tiny_lm_dir, tmp_path, capsys):
    """A contextual cache holds whole examples (their tapped layers), so a process's share of a step is examples, of
    unequal lengths: 2 examples per process take the step that 4 take in one process, the trained-token count being
    summed over both processes (the Trainer's `num_items_in_batch`), so the losses and heads end equal (the heads up to
    rounding). About 30 s on 2 cores."""
    context = ["--context", "--context-dim", "16", "--context-heads", "2"]
    two, one = cached_run_on_two_processes_and_one(tiny_lm_dir, tmp_path, capsys, context)
    assert two.count("Trained 3 steps on 2 processes") == 1 and "2 examples per step, with their tapped layers" in two
    assert "4 examples per step, with their tapped layers" in one
    on_two, on_one = load_file(tmp_path / "two" / HEAD_FILE), load_file(tmp_path / "one" / HEAD_FILE)
    assert set(on_two) == set(on_one) and {key for key in on_one if ".context." in key}
    assert re.findall(r"step \d+: loss [\d.]+", two) == re.findall(r"step \d+: loss [\d.]+", one)
    # Each process pads its 2 examples to their own longest, so the context path's sums run in another order than in
    # one batch of 4; Adam's normalised step makes that rounding visible in near-zero gradients (about 3e-6 here).
    for key in on_one:
        torch.testing.assert_close(on_two[key], on_one[key], rtol=1e-4, atol=1e-5, msg=key)
