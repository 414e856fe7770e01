"""Head swapping: `set_adapter` and `load_adapter` latency, and the size of a saved head against the base.

    python benchmarks/bench_swap.py --base smollm2 --swaps 500 --loads 10

Two saved heads (and, for comparison, two PEFT LoRA r=8 adapters) on one frozen base. `set_adapter` alternates
between the two; `load_adapter` loads a saved adapter from disk under a new name and is then deleted again. Also
times the first forward after a swap against the next ones (a raw head rebuilds its cached collapsed map once).
Writes benchmarks/results/swap-<base>.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import attach, load_base, markdown_table, median, random_batch, save_result
from peft import PeftModel


def saved_pair(base, method: str, work: Path) -> tuple[Path, Path]:
    """Two adapters of one method with different weights, saved to `work`."""
    paths = []
    for index in range(2):
        torch.manual_seed(index)
        model = attach(base, method)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.01 * torch.randn_like(param))
        path = work / f"{method.replace(' ', '_')}_{index}"
        model.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def file_bytes(path: Path) -> int:
    return (path / "adapter_model.safetensors").stat().st_size


def measure(base, method: str, work: Path, args) -> dict:
    first, second = saved_pair(base, method, work)
    model = PeftModel.from_pretrained(base, first, adapter_name="one")
    model.load_adapter(second, adapter_name="two")
    model.eval()
    swap_times = []
    for index in range(args.swaps):
        name = "two" if index % 2 == 0 else "one"
        start = time.perf_counter()
        model.set_adapter(name)
        swap_times.append(time.perf_counter() - start)
    load_times = []
    for index in range(args.loads):
        start = time.perf_counter()
        model.load_adapter(first, adapter_name=f"loaded{index}")
        load_times.append(time.perf_counter() - start)
        model.delete_adapter(f"loaded{index}")
    ids = random_batch(base.config.vocab_size, 1, 32)
    forward_times = []
    with torch.no_grad():
        for index in range(6):  # after each swap: first forward, then a second one
            model.set_adapter("one" if index % 2 == 0 else "two")
            for _ in range(2):
                start = time.perf_counter()
                model(input_ids=ids)
                forward_times.append(time.perf_counter() - start)
    model.unload()
    return {
        "method": method,
        "set_adapter_ms": 1e3 * median(swap_times),
        "load_adapter_ms": 1e3 * median(load_times),
        "first_forward_after_swap_ms": 1e3 * median(forward_times[0::2]),
        "next_forward_ms": 1e3 * median(forward_times[1::2]),
        "file_bytes": file_bytes(first),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2", choices=("smollm2", "tiny-gpt2"), help="base model")
    parser.add_argument("--swaps", type=int, default=500, help="set_adapter calls to time")
    parser.add_argument("--loads", type=int, default=10, help="load_adapter calls to time")
    args = parser.parse_args()
    base = load_base(args.base)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for method in ("backattn softmax residual", "backattn raw residual", "lora r=8"):
            rows.append(measure(base, method, Path(work), args))
    for row in rows:
        row["file_fraction_of_base"] = row["file_bytes"] / base_bytes
    header = ["method", "set_adapter ms", "load_adapter ms", "1st forward after swap ms", "next forward ms",
              "file kB", "file / base"]  # fmt: skip
    table = [[r["method"], r["set_adapter_ms"], r["load_adapter_ms"], r["first_forward_after_swap_ms"],
              r["next_forward_ms"], r["file_bytes"] / 1e3, f"{100 * r['file_fraction_of_base']:.3f} %"]
             for r in rows]  # fmt: skip
    print(f"\nSwapping on {args.base} ({base_bytes / 1e6:.0f} MB of weights), medians")
    print(markdown_table(header, table))
    save_result(f"swap-{args.base}", {"base": args.base, "base_bytes": base_bytes, "rows": rows})


if __name__ == "__main__":
    main()
