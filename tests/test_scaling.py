"""Scaling out: the accelerate config files in examples/accelerate load, and DeepSpeed ZeRO-2 trains a head with two
CPU processes and saves only the head (DDP with two CPU processes is tested in test_cli.py)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from safetensors.torch import load_file

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
TRAIN = ["--data", "synthetic", "--limit", "24", "--batch-size", "4", "--max-length", "128", "--no-progress"]
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
