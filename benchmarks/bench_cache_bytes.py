"""What a feature cache costs on disk, per token: plain heads (one row per trained position) against contextual heads
(one row per example, with its tapped layers' outputs), on the embedded base in float32 and in bfloat16.

    python benchmarks/bench_cache_bytes.py                  # the first 8 GSM8K train problems
    python benchmarks/bench_cache_bytes.py --problems 32 --dtypes bfloat16

For each base dtype and head (softmax and raw; each plain and contextual with the default context_layers), runs
`cache_features` on the same tokenised problems into a temporary folder and prints the size of `features.arrow`:
per trained position (whose hidden state and target are stored), and per tapped position (a contextual cache stores
the tapped layers' outputs at every position of each example up to its last trained one, prompt included). Small on
purpose: the bytes per token do not depend on how many problems are cached.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from common import SHARED_DATA, markdown_table

from peft_backattn import BackAttnConfig
from peft_backattn.workbench.base_models import EMBEDDED_DEFAULT, load_base_model
from peft_backattn.workbench.data import load_examples, tokenize_examples
from peft_backattn.workbench.features import FEATURES_FILE, cache_features
from peft_backattn.workbench.training import attach_head

HEADS = {
    "softmax": {},
    "raw": {"logit_weighting": "raw"},
    "softmax, contextual": {"context": True},
    "raw, contextual": {"context": True, "logit_weighting": "raw"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=8, help="GSM8K train problems (the first N)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per training example")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="dtypes to load the base in")
    args = parser.parse_args()
    if not SHARED_DATA.is_dir():
        sys.exit(f"the shared math data ({SHARED_DATA}) is absent")
    examples = load_examples(str(SHARED_DATA / "gsm8k" / "train.jsonl"), fields="gsm8k", limit=args.problems)
    rows = []
    for dtype in args.dtypes:
        for head, fields in HEADS.items():
            base, tokenizer = load_base_model(EMBEDDED_DEFAULT, dtype=getattr(torch, dtype))
            model = attach_head(base, BackAttnConfig(**fields))
            dataset, _ = tokenize_examples(examples, tokenizer, args.max_length)
            with tempfile.TemporaryDirectory() as folder:
                features = cache_features(
                    model, tokenizer, dataset, Path(folder) / "features", max_length=args.max_length, progress=False
                )
                size = (Path(folder) / "features" / FEATURES_FILE).stat().st_size
            tapped = features.context["positions"] if features.context is not None else None
            rows.append(
                [
                    dtype,
                    head,
                    f"{size:,}",
                    f"{features.positions:,}",
                    f"{size / features.positions:,.0f}",
                    f"{tapped:,}" if tapped else "-",
                    f"{size / tapped:,.0f}" if tapped else "-",
                ]
            )
    header = ["base dtype", "head", "file bytes", "trained positions", "bytes / trained", "tapped positions",
              "bytes / tapped"]  # fmt: skip
    print(f"\n{args.problems} GSM8K train problems, {EMBEDDED_DEFAULT}, max length {args.max_length}\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
