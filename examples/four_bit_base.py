"""A head on a 4-bit base: quantise the frozen base to bitsandbytes nf4, train a head on it, save only the head.

bitsandbytes nf4 runs on the CPU too (slowly). The base's linear layers become 4-bit; the output layer, which the
head wraps, stays in full precision, and the head itself trains in fp32. The saved head holds head tensors only, so
it loads onto the same base in any precision.

    python examples/four_bit_base.py                   # the embedded SmolLM2-135M-Instruct, quantised on load
    python examples/four_bit_base.py --model gpt2 --steps 50
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors import safe_open

from peft_backattn import BackAttnConfig
from peft_backattn.workbench.base_models import EMBEDDED_DEFAULT, load_base_model
from peft_backattn.workbench.synthetic import generate_examples
from peft_backattn.workbench.training import TrainingOptions, attach_head, train_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_DEFAULT, help="base model: a folder, a hub name or the default")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step")
    parser.add_argument("--r", type=int, default=64, help="latent size of the head")
    parser.add_argument("--output", type=Path, default=Path("runs/four_bit_head"), help="folder for the head")
    args = parser.parse_args()

    base, tokenizer = load_base_model(args.model, load_in_4bit=True)
    quantised = [name for name, module in base.named_modules() if type(module).__name__ == "Linear4bit"]
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    print(f"Base: {len(quantised)} linear layers in nf4, {base_bytes / 1e6:.2f} MB of weights in memory")

    model = attach_head(base, BackAttnConfig(r=args.r))
    model.print_trainable_parameters()
    examples = generate_examples(args.steps * args.batch_size, split="train")
    options = TrainingOptions(
        str(args.output), max_steps=args.steps, batch_size=args.batch_size, logging_steps=1, progress_bar=False
    )
    report = train_head(model, tokenizer, examples, options)
    print(f"Trained {report.steps} steps on the 4-bit base, loss {report.first_loss:.3f} -> {report.final_loss:.3f}")

    weights = args.output / "adapter_model.safetensors"
    with safe_open(weights, framework="pt") as handle:
        keys = sorted(handle.keys())  # noqa: SIM118 (safe_open handles are not mappings)
    assert all(".backattn_heads." in key for key in keys), keys
    print(f"Saved only the head: {len(keys)} head tensors, {weights.stat().st_size / 1e3:.1f} kB in {weights}")
    print(f"The head is {100 * weights.stat().st_size / base_bytes:.2f} % of the 4-bit base's weights")


if __name__ == "__main__":
    main()
