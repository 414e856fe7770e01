"""Peak memory of training and inference for growing sequence lengths: the head's share stays bounded.

    python benchmarks/bench_memory.py --base smollm2 --lengths 256 1024 4096

Each (method, mode, length) runs in a fresh child process: load the base, attach the method, run the step once to
warm up, reset the kernel's peak-RSS counter (/proc/self/clear_refs), run it again and report the peak resident
memory above what was resident before the step. Inference is a no-grad forward; training is forward with the LM
loss and backward. A logits tensor (length x vocabulary, fp32) is printed alongside, since every method produces
one. Writes benchmarks/results/memory-<base>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

METHODS = ["base", "backattn raw residual", "backattn softmax residual", "backattn mixture x4", "lora r=8"]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(base_name: str, method: str, mode: str, length: int, r: int) -> dict:
    """Runs in the child process: the measured peak, in MB, above the memory resident before the step."""
    import torch
    from common import attach, load_base, random_batch

    torch.manual_seed(0)
    base = load_base(base_name)
    model = attach(base, method, r=r)
    del base
    ids = random_batch(model.config.vocab_size, 1, length)
    if mode == "train":
        if method == "base":
            return {"skipped": "the frozen base does not train"}
        model.train()

        def step() -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step() -> None:
            with torch.no_grad():
                model(input_ids=ids)

    step()  # warm-up: caches of frozen tensors, allocator
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before = _status_kb("VmRSS")
    step()
    peak = _status_kb("VmHWM")
    return {"peak_mb": (peak - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2", choices=("smollm2", "tiny-gpt2"), help="base model")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="sequence lengths")
    parser.add_argument("--r", type=int, default=64, help="latent size of the heads")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, mode, length = args.child
        print(json.dumps(child(args.base, method, mode, int(length), args.r)))
        return

    from common import load_base, markdown_table, save_result

    vocab = load_base("tiny-gpt2").config.vocab_size if args.base == "tiny-gpt2" else 49152
    # A fixed mmap threshold makes glibc return every large block to the kernel, so RSS follows the tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    rows = []
    for mode in ("inference", "train"):
        for length in args.lengths:
            row = {"mode": mode, "length": length, "logits_mb": length * vocab * 4 / 2**20}
            for method in METHODS:
                command = [sys.executable, __file__, "--base", args.base, "--r", str(args.r),
                           "--child", method, mode, str(length)]  # fmt: skip
                result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).parent)
                if result.returncode != 0:
                    raise RuntimeError(f"{method} {mode} {length} failed:\n{result.stderr[-2000:]}")
                measured = json.loads(result.stdout.strip().splitlines()[-1])
                row[method] = measured.get("peak_mb")
                print(f"  {mode} {length} {method}: {measured}", file=sys.stderr, flush=True)
            rows.append(row)
    for mode in ("inference", "train"):
        print(f"\nPeak memory above the loaded model, {mode}, batch 1, MB (one fp32 logits tensor alongside)")
        header = ["length", "logits tensor", *METHODS]
        table = [[r["length"], r["logits_mb"], *(r[m] if r[m] is not None else "-" for m in METHODS)]
                 for r in rows if r["mode"] == mode]  # fmt: skip
        print(markdown_table(header, table))
    save_result(f"memory-{args.base}", {"base": args.base, "r": args.r, "rows": rows})


if __name__ == "__main__":
    main()
