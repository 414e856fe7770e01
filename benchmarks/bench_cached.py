"""Cached features against ordinary training, per trained token: the feature pass, a head-only epoch, and an ordinary
first epoch of the head and of LoRA on the same GSM8K problems; optionally, what many cheap epochs buy in quality.

    python benchmarks/bench_cached.py --problems 400
    python benchmarks/bench_cached.py --problems 400 --quality --quality-epochs 5 --ppl 200
    python benchmarks/bench_cached.py --problems 8 --batch 4 --max-length 128 --rounding-rows 64 --output cached-smoke

On the embedded SmolLM2-135M-Instruct base and the first --problems GSM8K train problems:

(a) the feature pass (`workbench.features.cache_features`): its time, the cache's size on disk, the time to check
    and reuse it, and how much the loss would move if the cached hidden states were rounded to fp16 or bf16;
(b) one epoch of the head alone on the cached positions (`train_head` with `feature_cache`);
(c) one ordinary epoch of `train_head` (the output layer on trained positions only) for the same head and for PEFT
    LoRA r=8 on q, k, v, o, with the same data, batch size, learning rate and seed.

Times are per trained token (a position whose next token is scored: the same set for every method), with the ratios
and the number of epochs after which the pass has paid for itself. (d), with --quality: GSM8K test perplexity of the
base, of the head and of LoRA after their ordinary epoch, and of the head after --quality-epochs cheap epochs, each
with the wall clock it took. An epoch cannot alternate with another step by step, so the methods run one after
another: run this on a quiet machine. --rounds R repeats (b) and (c) R times, in turn, and reports medians.
Writes benchmarks/results/<--output>.json.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import HEAD_MODES, SHARED_DATA, attach, markdown_table, median, save_result
from transformers import set_seed

from peft_backattn.workbench.base_models import EMBEDDED_DEFAULT, load_base_model
from peft_backattn.workbench.data import PaddingCollator, load_examples, tokenize_examples
from peft_backattn.workbench.evaluation import target_nll
from peft_backattn.workbench.features import FEATURES_FILE, cache_features, count_trained_positions, head_layer
from peft_backattn.workbench.metrics import perplexity
from peft_backattn.workbench.training import TrainingOptions, train_head

CACHED, HEAD, LORA = "head, cached features", "head, ordinary epoch", "lora r=8, ordinary epoch"


def feature_pass(base, tokenizer, dataset, folder: Path, args) -> dict:
    """(a): compute the cache (or say it was reused), its size, the reuse check, and the rounding test."""
    model = attach(base, args.head, r=args.r)
    warm_up(base, tokenizer, dataset, args.batch)
    start = time.perf_counter()
    features = cache_features(
        model, tokenizer, dataset, folder, max_length=args.max_length, batch_size=args.batch, progress=False
    )
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    cache_features(model, tokenizer, dataset, folder, max_length=args.max_length, progress=False)
    reuse_seconds = time.perf_counter() - start
    size = (folder / FEATURES_FILE).stat().st_size
    result = {
        "computed": features.computed,
        "pass_s": seconds if features.computed else None,
        "reuse_check_s": reuse_seconds,
        "bytes": size,
        "positions": features.positions,
        "bytes_per_trained_token": size / features.positions,
        "columns": features.rows.column_names,
        # A contextual cache stores its taps in bf16 by design (the live head reads them in bf16 too), per example.
        "rounding": rounding_losses(model, features, args.rounding_rows) if features.context is None else None,
    }
    del model
    gc.collect()
    return result


def warm_up(base, tokenizer, dataset, batch: int) -> None:
    """One untimed no-grad forward of a first batch: a process's first forward pays for its allocations."""
    inputs = PaddingCollator.from_tokenizer(tokenizer)([dataset[i] for i in range(min(batch, len(dataset)))])
    with torch.no_grad():
        base(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)


def rounding_losses(model, features, rows: int) -> dict:
    """The base's loss on the first `rows` cached positions (an untrained residual head's too), from the hidden
    states as stored (fp32) and rounded to fp16 and bf16: what a half-precision cache would change."""
    layer, _ = head_layer(model)
    output = layer.get_base_layer()
    batch = features.rows[: min(rows, features.positions)]
    device = output.weight.device
    hidden, targets = batch["hidden"].float().to(device), batch["target"].to(device)  # (n, d), (n,)
    losses = {}
    with torch.no_grad():
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
            rounded = hidden.to(dtype).float()
            total = sum(
                F.cross_entropy(output(rounded[i : i + 512]).float(), targets[i : i + 512], reduction="sum").item()
                for i in range(0, len(targets), 512)
            )
            losses[name] = total / len(targets)
    return {
        "rows": len(targets),
        **losses,
        **{f"{k}_minus_fp32": losses[k] - losses["fp32"] for k in ("fp16", "bf16")},
    }


def one_epoch(name: str, base, tokenizer, examples, folder: Path, work: Path, args, epochs: float = 1.0):
    """A fresh model for `name`, trained by `train_head` for `epochs`; returns (model, report)."""
    set_seed(args.seed)
    model = attach(base, "lora r=8" if name == LORA else args.head, r=args.r)
    options = TrainingOptions(
        output_dir=str(work / f"run-{time.monotonic_ns()}"), epochs=epochs, batch_size=args.batch,
        learning_rate=args.lr, max_length=args.max_length, seed=args.seed, logging_steps=10**6, save_steps=10**6,
        progress_bar=False, save_final=False, feature_cache=str(folder) if name == CACHED else None,
    )  # fmt: skip
    print(f"== {name}, {epochs:g} epoch(s)", file=sys.stderr, flush=True)
    report = train_head(model, tokenizer, examples, options)
    return model, report


def gsm8k_perplexity(model, tokenizer, test, args) -> float:
    nll, tokens, _ = target_nll(
        model.eval(), tokenizer, test, max_length=512, batch_size=args.eval_batch, progress=False
    )
    return perplexity(nll, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=400, help="GSM8K train problems (the first N)")
    parser.add_argument("--head", default="backattn softmax residual", choices=sorted(HEAD_MODES), help="head mode")
    parser.add_argument("--r", type=int, default=64, help="latent size of the head")
    parser.add_argument("--batch", type=int, default=8, help="examples per step (cached: that many examples' worth)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of every method")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per training example")
    parser.add_argument("--seed", type=int, default=0, help="seed of the head, LoRA and the data order")
    parser.add_argument("--rounds", type=int, default=1, help="times (b) and (c) run, in turn; medians are reported")
    parser.add_argument("--rounding-rows", type=int, default=2048, help="cached positions in the fp16/bf16 test")
    parser.add_argument("--cache-dir", help="keep the features here (reused if they match); default: a temporary one")
    parser.add_argument("--quality", action="store_true", help="also (d): GSM8K test perplexity after the epochs")
    parser.add_argument("--quality-epochs", type=float, default=5.0, help="(d): epochs of the head on the cache")
    parser.add_argument("--ppl", type=int, default=200, help="(d): GSM8K test problems for perplexity")
    parser.add_argument("--eval-batch", type=int, default=8, help="(d): evaluation batch size")
    parser.add_argument("--output", default="cached-smollm2", help="results file name in benchmarks/results")
    args = parser.parse_args()
    if not SHARED_DATA.is_dir():
        sys.exit(f"the shared math data ({SHARED_DATA}) is absent")

    torch.manual_seed(0)
    base, tokenizer = load_base_model(EMBEDDED_DEFAULT)
    examples = load_examples(str(SHARED_DATA / "gsm8k" / "train.jsonl"), fields="gsm8k", limit=args.problems)
    dataset, truncation = tokenize_examples(examples, tokenizer, args.max_length)
    trained = count_trained_positions(dataset)
    positions = sum(len(ids) for ids in dataset["input_ids"])
    result = {
        "settings": vars(args) | {"base": EMBEDDED_DEFAULT, "train_file": "gsm8k/train.jsonl"},
        "data": {"examples": len(dataset), "positions": positions, "trained_tokens": trained,
                 "truncation": str(truncation)},
    }  # fmt: skip

    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        folder = Path(args.cache_dir) if args.cache_dir else work / "features"
        result["feature_pass"] = passed = feature_pass(base, tokenizer, dataset, folder, args)

        epoch_s: dict[str, list[float]] = {CACHED: [], HEAD: [], LORA: []}
        kept = {}
        for round_index in range(args.rounds):
            for name in epoch_s:
                model, report = one_epoch(name, base, tokenizer, examples, folder, work, args)
                epoch_s[name].append(report.seconds)
                if args.quality and round_index == 0 and name != CACHED:
                    kept[name] = (model, report.seconds)
                else:
                    del model
                gc.collect()
        result["epochs"] = summarize(epoch_s, trained, passed)

        if args.quality:
            result["quality"] = quality(base, tokenizer, examples, folder, work, kept, passed, args)

    print_report(result, args)
    save_result(args.output, result)


def summarize(epoch_s: dict[str, list[float]], trained: int, passed: dict) -> dict:
    cached = median(epoch_s[CACHED])
    rows = {}
    for name, samples in epoch_s.items():
        seconds = median(samples)
        rows[name] = {
            "epoch_s": seconds, "samples": samples, "ms_per_trained_token": 1000 * seconds / trained,
            "trained_tokens_per_s": trained / seconds, "x_cached_epoch": seconds / cached,
        }  # fmt: skip
    pass_s = passed["pass_s"]
    for name in (HEAD, LORA):
        saved = rows[name]["epoch_s"] - cached  # what each epoch on the cache saves against this method
        rows[name]["break_even_epochs"] = pass_s / saved if pass_s is not None and saved > 0 else None
    if pass_s is not None:
        rows["feature pass"] = {
            "epoch_s": pass_s, "ms_per_trained_token": 1000 * pass_s / trained,
            "trained_tokens_per_s": trained / pass_s, "x_cached_epoch": pass_s / cached,
        }  # fmt: skip
    return rows


def quality(base, tokenizer, examples, folder: Path, work: Path, kept: dict, passed: dict, args) -> dict:
    """(d): GSM8K test perplexity of the base, each ordinary epoch, and the head after many cached epochs."""
    test = load_examples(str(SHARED_DATA / "gsm8k" / "test.jsonl"), fields="gsm8k", limit=args.ppl)
    rows = {"base": {"perplexity": gsm8k_perplexity(base, tokenizer, test, args), "train_s": 0.0}}
    for name, (model, seconds) in kept.items():
        rows[name] = {"perplexity": gsm8k_perplexity(model, tokenizer, test, args), "train_s": seconds}
    kept.clear()
    gc.collect()
    model, report = one_epoch(CACHED, base, tokenizer, examples, folder, work, args, epochs=args.quality_epochs)
    name = f"head, {args.quality_epochs:g} cached epochs"
    rows[name] = {
        "perplexity": gsm8k_perplexity(model, tokenizer, test, args),
        "train_s": report.seconds + (passed["pass_s"] or 0.0),  # the pass counts: it is what the epochs stand on
        "pass_s": passed["pass_s"], "epochs_s": report.seconds, "steps": report.steps, "losses": report.losses,
    }  # fmt: skip
    return {"test_problems": len(test), "rows": rows}


def print_report(result: dict, args) -> None:
    data, passed = result["data"], result["feature_pass"]
    print(
        f"\nGSM8K train, {data['examples']} problems: {data['trained_tokens']:,} trained tokens of "
        f"{data['positions']:,} positions ({data['truncation']}); head {args.head!r} r={args.r}, batch {args.batch}"
    )
    pass_text = f"{passed['pass_s']:.1f} s" if passed["pass_s"] is not None else "reused (not timed)"
    rounding = passed["rounding"]
    print(
        f"(a) feature pass {pass_text}; cache {passed['bytes'] / 1e6:.1f} MB on disk "
        f"({passed['bytes_per_trained_token']:.0f} bytes per trained token, columns {passed['columns']}); "
        f"checking and reusing it {passed['reuse_check_s']:.1f} s."
    )
    if rounding is not None:
        print(
            f"Loss on {rounding['rows']} cached positions: fp32 {rounding['fp32']:.5f}; stored in fp16 "
            f"{rounding['fp16_minus_fp32']:+.2e}, in bf16 {rounding['bf16_minus_fp32']:+.2e}"
        )
    rows = result["epochs"]
    header = ["", "median s", "ms / trained token", "trained tokens/s", "x cached epoch", "break-even epochs"]
    table = [
        [name, r["epoch_s"], r["ms_per_trained_token"], r["trained_tokens_per_s"], r["x_cached_epoch"],
         "-" if r.get("break_even_epochs") is None else r["break_even_epochs"]]
        for name, r in rows.items()
    ]  # fmt: skip
    print(f"\n(b), (c) one epoch each, medians of {args.rounds} round(s)")
    print(markdown_table(header, table))
    print(
        f"ratios: ordinary head epoch / cached epoch {rows[HEAD]['x_cached_epoch']:.2f}, LoRA epoch / cached epoch "
        f"{rows[LORA]['x_cached_epoch']:.2f}, LoRA / ordinary head {rows[LORA]['epoch_s'] / rows[HEAD]['epoch_s']:.2f}"
        + (
            f", feature pass / ordinary head epoch {rows['feature pass']['epoch_s'] / rows[HEAD]['epoch_s']:.2f}"
            if "feature pass" in rows
            else ""
        )
    )
    print("break-even epochs: the cache (pass + E cached epochs) is cheaper than E ordinary epochs for E above this")
    if "quality" in result:
        quality_rows = result["quality"]["rows"]
        print(f"\n(d) GSM8K test perplexity, first {result['quality']['test_problems']} problems")
        print(markdown_table(["model", "perplexity", "training s"],
                             [[n, r["perplexity"], r["train_s"]] for n, r in quality_rows.items()]))  # fmt: skip


if __name__ == "__main__":
    main()
