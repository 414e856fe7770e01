"""What the benchmark scripts share: the bases, the compared methods, timing and result files.

Every script runs its methods in one process, alternating them round by round after a warm-up, and reports
medians and ratios: absolute times on a shared 2-core machine drift, ratios measured in one run hold.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from peft_backattn import BackAttnConfig
from peft_backattn.workbench.base_models import EMBEDDED_DEFAULT, load_base_model

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The head variants compared everywhere: the original design, the residual variants, a mixture.
HEAD_MODES = {
    "backattn raw residual": dict(logit_weighting="raw", combine="residual"),
    "backattn raw replace (original)": dict(logit_weighting="raw", combine="replace"),
    "backattn softmax residual": dict(logit_weighting="softmax", combine="residual"),
    "backattn mixture x4": dict(logit_weighting="softmax", combine="residual", num_heads=4),
    "backattn contextual": dict(context=True),
    "backattn contextual taps only": dict(context=True, context_attention=False),
    "backattn contextual last layer": dict(context=True, context_layers=[-1]),
    "backattn contextual d64": dict(context=True, context_dim=64),
    "backattn contextual d256": dict(context=True, context_dim=256),
}
LORA_TARGETS = {"gpt2": ["c_attn", "attn.c_proj"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def load_base(name: str) -> nn.Module:
    """'tiny-gpt2' (2 layers, width 128, GPT-2's 50,257-token vocabulary, random weights) or 'smollm2'."""
    if name == "tiny-gpt2":
        torch.manual_seed(0)
        config = GPT2Config(n_layer=2, n_embd=128, n_head=2, n_positions=8192, vocab_size=50257)
        model = GPT2LMHeadModel(config).eval()
        for param in model.parameters():
            param.requires_grad_(False)
        return model
    if name == "smollm2":
        return load_base_model(EMBEDDED_DEFAULT)[0]
    raise ValueError(f"unknown base {name!r}: use tiny-gpt2 or smollm2")


def attach(base: nn.Module, method: str, r: int = 64, seed: int = 0, init_std: float | None = None) -> nn.Module:
    """A fresh copy of `base` prepared for `method`: a backattn mode, 'lora r=8', 'output head' or 'base'.

    `seed` draws the adapter's random initial weights; `init_std` sets a head's (None: the config's default).
    """
    model = copy.deepcopy(base)
    if method == "base":
        return model
    torch.manual_seed(seed)
    if method in HEAD_MODES:
        spread = {} if init_std is None else {"init_std": init_std}
        return get_peft_model(model, BackAttnConfig(r=r, **HEAD_MODES[method], **spread))
    if method.startswith("lora"):
        rank = int(method.split("r=")[1].split()[0])
        targets = LORA_TARGETS[model.config.model_type]
        # "top3": the last three decoder layers only (the cheapest LoRA, next to the head)
        layers = list(range(model.config.num_hidden_layers))[-3:] if method.endswith("top3") else None
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0, layers_to_transform=layers
        )
        return get_peft_model(model, config)
    if method == "output head":
        return untied_trainable_output_head(model)
    raise ValueError(f"unknown method {method!r}")


def untied_trainable_output_head(model: nn.Module) -> nn.Module:
    """Output-head fine-tuning: a trainable, untied copy of the output matrix; everything else frozen."""
    old = model.get_output_embeddings()
    new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    for param in model.parameters():
        param.requires_grad_(False)
    model.set_output_embeddings(new)
    model.config.tie_word_embeddings = False
    new.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def random_batch(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token ids for timing (speed does not depend on the text); the same ids for every method."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def alternate(
    tasks: dict[str, Callable[[], None]],
    rounds: int,
    warmup: int = 1,
    after_round: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Run each task once per round, in the same order each round; the first `warmup` rounds are not kept.

    `after_round` runs between rounds, untimed (e.g. to move every task on to the next batch).
    """
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for round_index in range(warmup + rounds):
        for name, task in tasks.items():
            start = time.perf_counter()
            task()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
        if after_round is not None:
            after_round()
        print(f"  round {round_index + 1}/{warmup + rounds} done", file=sys.stderr, flush=True)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> dict:
    """What the numbers were measured on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": _git_commit(),
    }


def save_result(name: str, payload: dict) -> Path:
    """benchmarks/results/<name>.json, with the machine and the exact command line."""
    RESULTS.mkdir(exist_ok=True)
    payload = {"command": "python " + " ".join(sys.argv), "machine": machine(), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            if abs(value) >= 1e7:
                return f"{value:.2e}"
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        return "unknown"
