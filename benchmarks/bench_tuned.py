"""Quality per minute, tuned and compared fairly: the default head against PEFT LoRA (issue 10, items 2 and 4).

    python bench_tuned.py sweep                      # learning rate (and the head's init_std) per method
    python bench_tuned.py compare --minutes 4 --seeds 0 1 2
    python bench_tuned.py sweep --methods "contextual head" "contextual, taps only" --sweep-output context_sweep
    python bench_tuned.py compare --methods "contextual head" "lora r=8 q,k,v,o, top 3 layers" --output context_tuned

`sweep` trains each grid point for a fixed number of steps (about what 4 quiet minutes buy each method, so that a
loaded machine changes the time, not the result) on GSM8K train without its last 300 problems, and scores the
perplexity of those 300 held-out training problems' first --validation (a validation split: the test set is never
used to choose). `compare` takes each method's best point from the sweep (or --head-lr/--lora-lr), trains it for
the same wall-clock minutes per seed, one run after another, and scores GSM8K test perplexity (first --ppl
problems), greedy exact match with its Wilson 95 % interval and the share of answers in a `#### N` line (first
--gen problems, batched generation), and MATH-500 solution perplexity (first --math500) as a transfer check.
Results go to benchmarks/results/{sweep,tuned}.json after every run; a stopped run continues where it stopped.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_quality import evaluate_all
from common import RESULTS, SHARED_DATA, attach, load_base, save_result, trainable_parameters
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, set_seed

from peft_backattn import BackAttnConfig
from peft_backattn.workbench.base_models import EMBEDDED_DEFAULT, load_base_model
from peft_backattn.workbench.data import load_examples
from peft_backattn.workbench.evaluation import target_nll
from peft_backattn.workbench.metrics import perplexity, wilson_interval
from peft_backattn.workbench.training import TrainingOptions, train_head

VALIDATION_PROBLEMS = 300  # the last problems of GSM8K train: held out from training, used only to choose
HEAD, LORA = "head (default config)", "lora r=8 q,k,v,o"
CONTEXT, LORA_TOP3 = "contextual head", "lora r=8 q,k,v,o, top 3 layers"
# The contextual head's variants (issue 20's ablations): each a method of its own, so that each gets its own rate.
CONTEXT_VARIANTS = {
    CONTEXT: "backattn contextual",
    "contextual, taps only": "backattn contextual taps only",
    "contextual, last layer only": "backattn contextual last layer",
    "contextual, context_dim 64": "backattn contextual d64",
    "contextual, context_dim 256": "backattn contextual d256",
    "contextual, kl_to_base 1": "backattn contextual",
}
ATTACH = {HEAD: "backattn softmax residual", LORA: "lora r=8", LORA_TOP3: "lora r=8 top3", **CONTEXT_VARIANTS}
KL_TO_BASE = {"contextual, kl_to_base 1": 1.0}  # TrainingOptions.kl_to_base per method (default 0)
# Steps per sweep run: about what 4 minutes buy each method on 2 quiet cores with trained-positions-only training.
SWEEP_STEPS = {HEAD: 60, LORA: 30, LORA_TOP3: 60} | dict.fromkeys(CONTEXT_VARIANTS, 60)
SWEEP_GRID = {
    # (learning rate, init_std), both spreads named on purpose: the sweep compared GPT-2's customary 0.02 with 0.1 (the
    # config's default since). 1e-2 diverged at init_std 0.02 (loss 8.9 at step 3), so not tried at 0.1
    HEAD: [(1e-3, 0.02), (3e-3, 0.02), (1e-2, 0.02), (1e-3, 0.1), (3e-3, 0.1)],
    LORA: [(lr, None) for lr in (1e-3, 3e-3)],
    LORA_TOP3: [(lr, None) for lr in (1e-3, 3e-3)],
} | dict.fromkeys(CONTEXT_VARIANTS, [(1e-3, 0.1), (3e-3, 0.1)])


def train(method: str, lr: float, init_std: float | None, seed: int, examples, tokenizer, steps: int,
          seconds: float | None, snapshots: _Snapshots | None = None):  # fmt: skip
    """A fresh base with `method` attached (its random init from `seed`), trained by `train_head` as users do."""
    set_seed(seed)
    model = attach(load_base("smollm2"), ATTACH[method], seed=seed, init_std=init_std)
    if snapshots is not None:
        snapshots.model = model
    with tempfile.TemporaryDirectory() as work:
        options = TrainingOptions(
            output_dir=work, max_steps=steps, batch_size=8, learning_rate=lr, max_length=256, seed=seed,
            logging_steps=1, save_steps=100_000, time_budget_seconds=seconds, progress_bar=False, save_final=False,
            kl_to_base=KL_TO_BASE.get(method, 0.0),
        )  # fmt: skip
        report = train_head(model, tokenizer, examples, options, [snapshots] if snapshots else [])
    return model.eval(), report


def sweep(args, tokenizer, train_examples, validation) -> None:
    path = RESULTS / f"{args.sweep_output}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["settings"] = vars(args) | {"steps": SWEEP_STEPS, "base": EMBEDDED_DEFAULT}
    runs = results.setdefault("runs", [])
    if "base_validation_perplexity" not in results:  # the untrained reference every grid point starts from
        nll, tokens, _ = target_nll(load_base("smollm2"), tokenizer, validation, max_length=512, progress=False)
        results["base_validation_perplexity"] = perplexity(nll, tokens)
    for method in args.methods:
        for lr, init_std in SWEEP_GRID[method]:
            if any(r["method"] == method and r["lr"] == lr and r["init_std"] == init_std for r in runs):
                continue
            if args.lrs and lr not in args.lrs:
                continue
            if args.same_rate_as and lr != best_point(args.same_rate_as, args.sweep_output)[0]:
                continue
            print(f"== sweep {method}, lr {lr:g}, init_std {init_std}", file=sys.stderr, flush=True)
            model, report = train(method, lr, init_std, 0, train_examples, tokenizer, SWEEP_STEPS[method], None)
            nll, tokens, _ = target_nll(model, tokenizer, validation, max_length=512, batch_size=8, progress=False)
            runs.append({
                "method": method, "lr": lr, "init_std": init_std, "steps": report.steps,
                "train_seconds": report.seconds, "losses": report.losses,
                "validation_perplexity": perplexity(nll, tokens), "validation_tokens": tokens,
            })  # fmt: skip
            save_result(args.sweep_output, results)
            del model
            gc.collect()


def best_point(method: str, sweep_output: str = "sweep") -> tuple[float, float | None]:
    runs = []
    for name in dict.fromkeys(["sweep", sweep_output]):
        if (RESULTS / f"{name}.json").exists():
            runs += [r for r in json.loads((RESULTS / f"{name}.json").read_text())["runs"] if r["method"] == method]
    if not runs and method in KL_TO_BASE:  # the same head with a KL term: at the rate the head itself was tuned to
        print(f"{method}: no sweep of its own, at the rate tuned for {CONTEXT!r}", file=sys.stderr)
        return best_point(CONTEXT, sweep_output)
    if not runs:
        sys.exit(f"no sweep runs for {method!r} in benchmarks/results/{sweep_output}.json: run `bench_tuned.py sweep`")
    best = min(runs, key=lambda r: r["validation_perplexity"])
    return best["lr"], best["init_std"]


def scores(model, tokenizer, data: dict, args, generate: bool = True) -> dict:
    """bench_quality's metrics, plus the count of solved problems and its Wilson interval (no answers: None)."""
    settings = argparse.Namespace(**{**vars(args), "gen": args.gen if generate else 0})
    result = evaluate_all(model, tokenizer, {"gsm8k_ppl": data["test"], "math500": data["math500"]}, settings, False)
    if not result["n"]:
        return {**result, "solved": None, "exact_match_interval": None}
    solved = round(result["exact_match"] * result["n"])
    return {**result, "solved": solved, "exact_match_interval": wilson_interval(solved, result["n"])}


class _Snapshots(TrainerCallback):
    """Copies the trained weights as each wall-clock budget is spent, counted as train_head's time budget counts.

    The rate is constant (no warm-up, no decay), so the weights after 4 minutes of a 15-minute run are those of a
    4-minute run with the same seed: one run gives every budget and the curve between them.
    """

    def __init__(self, model, budgets: list[float]) -> None:
        self.model, self.pending, self.taken = model, sorted(budgets), {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.monotonic() - self.start
        while self.pending and elapsed >= 60 * self.pending[0]:
            self.take(self.pending.pop(0), state.global_step, elapsed)

    def take(self, minutes: float, steps: int, seconds: float) -> None:
        weights = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        self.taken[minutes] = {"steps": steps, "train_seconds": seconds, "weights": weights}


def snapshot_file(args, method: str, seed: int, minutes: float):
    slug = re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-")  # the method's own name: variants share ATTACH
    return Path(args.snapshots) / f"{slug}-seed{seed}-{minutes:g}min.safetensors"


def load_snapshot(model, weights: dict) -> None:
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            parameters[name].copy_(value)


def compare(args, tokenizer, train_examples, data) -> None:
    path = RESULTS / f"{args.output}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    chosen = {HEAD: (args.head_lr, args.head_init_std), LORA: (args.lora_lr, None)}
    given = dict(rate.rsplit("=", 1) for rate in args.rate or [])  # "METHOD=LR"
    chosen |= {method: (float(lr), None if method.startswith("lora") else 0.1) for method, lr in given.items()}
    chosen = {method: chosen.get(method, (None, None)) for method in args.methods}
    for method, (lr, _) in chosen.items():
        if lr is None:
            chosen[method] = best_point(method, args.sweep_output)
    results["settings"] = vars(args) | {"base": EMBEDDED_DEFAULT, "chosen": {m: list(p) for m, p in chosen.items()}}
    runs = results.setdefault("runs", [])
    generate_at = set(args.minutes if args.gen_at is None else args.gen_at)
    if not any(run["method"] == "base" for run in runs):
        start = time.monotonic()
        runs.append({"method": "base", "seed": None, **scores(load_base("smollm2"), tokenizer, data, args),
                     "eval_seconds": time.monotonic() - start})  # fmt: skip
        save_result(args.output, results)
    Path(args.snapshots).mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for method in args.methods:
            done = {r["minutes"] for r in runs if r["method"] == method and r["seed"] == seed}
            needed = [m for m in args.minutes if m not in done]
            if not needed:
                continue
            lr, init_std = chosen[method]
            print(f"== {method}, seed {seed}, lr {lr:g}: {max(needed):g} min, scored at {needed}", file=sys.stderr,
                  flush=True)  # fmt: skip
            snapshots = _Snapshots(None, needed)
            model, report = train(method, lr, init_std, seed, train_examples, tokenizer, 100_000, 60 * max(needed),
                                  snapshots)  # fmt: skip
            for minutes in snapshots.pending:  # the budget's last step: the weights training ended with
                snapshots.take(minutes, report.steps, report.seconds)
            for minutes in needed:
                taken = snapshots.taken[minutes]
                save_file(taken["weights"], snapshot_file(args, method, seed, minutes))
                load_snapshot(model, taken["weights"])
                start = time.monotonic()
                runs.append({
                    "method": method, "seed": seed, "minutes": minutes, "lr": lr, "init_std": init_std,
                    "trainable": trainable_parameters(model), "steps": taken["steps"],
                    "train_seconds": taken["train_seconds"], "losses": report.losses[: taken["steps"]],
                    **scores(model, tokenizer, data, args, minutes in generate_at),
                    "eval_seconds": time.monotonic() - start,
                })  # fmt: skip
                save_result(args.output, results)
            del model
            gc.collect()
    answer_missing(args, tokenizer, data, results, generate_at, chosen)


def answer_missing(args, tokenizer, data, results, generate_at: set, chosen: dict) -> None:
    """Scores again, answers included, the saved snapshots of runs first scored without answers (--gen-at)."""
    for run in results["runs"]:
        if run["method"] == "base" or run["n"] or run["minutes"] not in generate_at:
            continue
        file = snapshot_file(args, run["method"], run["seed"], run["minutes"])
        if not file.exists():
            print(f"no snapshot {file}: train {run['method']} seed {run['seed']} again to answer", file=sys.stderr)
            continue
        print(f"== answers: {run['method']}, seed {run['seed']}, {run['minutes']:g} min", file=sys.stderr, flush=True)
        model = attach(load_base("smollm2"), ATTACH[run["method"]], seed=run["seed"], init_std=run["init_std"])
        load_snapshot(model, load_file(str(file)))
        start = time.monotonic()
        run.update(scores(model.eval(), tokenizer, data, args), eval_seconds=time.monotonic() - start)
        save_result(args.output, results)
        del model
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["sweep", "compare"])
    parser.add_argument("--methods", nargs="+", default=[HEAD, LORA], choices=list(ATTACH))
    parser.add_argument("--sweep-output", default="sweep", help="sweep results file name in benchmarks/results")
    parser.add_argument("--lrs", type=float, nargs="+", help="sweep: only these grid learning rates")
    parser.add_argument("--same-rate-as", choices=list(ATTACH), help="sweep: only the rate that method's sweep chose")
    parser.add_argument("--rate", nargs="+", metavar="METHOD=LR", help="compare: a method's rate, given (no sweep)")
    parser.add_argument("--validation", type=int, default=150, help="held-out training problems scored in sweep")
    parser.add_argument("--minutes", type=float, nargs="+", default=[4.0], help="wall-clock budgets (compare)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds: init and data order")
    parser.add_argument("--head-lr", type=float, help="the head's learning rate (default: the sweep's best)")
    parser.add_argument(
        "--head-init-std", type=float, default=BackAttnConfig().init_std, help="with --head-lr: the head's init_std"
    )
    parser.add_argument("--lora-lr", type=float, help="LoRA's learning rate (default: the sweep's best)")
    parser.add_argument(
        "--gen-at",
        type=float,
        nargs="+",
        help="budgets (minutes) whose runs also answer --gen problems (default: every budget); the "
        "others are scored without answers and their snapshots answer in a later run that names them",
    )
    parser.add_argument(
        "--snapshots",
        default=str(Path(tempfile.gettempdir()) / "bench_tuned_snapshots"),
        help="folder for the trained weights at each budget (not in the repository)",
    )
    parser.add_argument("--ppl", type=int, default=200, help="GSM8K test problems for perplexity")
    parser.add_argument("--gen", type=int, default=200, help="GSM8K test problems answered greedily")
    parser.add_argument("--math500", type=int, default=100, help="MATH-500 problems for solution perplexity")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="generation length")
    parser.add_argument("--batch-eval", type=int, default=20, help="evaluation (and generation) batch size")
    parser.add_argument("--output", default="tuned", help="results file name in benchmarks/results (compare)")
    args = parser.parse_args()
    if not SHARED_DATA.is_dir():
        sys.exit(f"the shared math data ({SHARED_DATA}) is absent")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    every_train = load_examples(str(SHARED_DATA / "gsm8k" / "train.jsonl"), fields="gsm8k")
    train_examples, held_out = every_train[:-VALIDATION_PROBLEMS], every_train[-VALIDATION_PROBLEMS:]
    _, tokenizer = load_base_model(EMBEDDED_DEFAULT)
    if args.mode == "sweep":
        sweep(args, tokenizer, train_examples, held_out[: args.validation])
        return
    test_problems = max(args.ppl, args.gen)
    data = {
        "test": load_examples(str(SHARED_DATA / "gsm8k" / "test.jsonl"), fields="gsm8k", limit=test_problems),
        "math500": load_examples(str(SHARED_DATA / "math500" / "test.jsonl"), fields="math500", limit=args.math500),
    }
    compare(args, tokenizer, train_examples, data)


if __name__ == "__main__":
    main()
