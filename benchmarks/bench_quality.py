"""Quality for the same wall-clock budget: the head's modes against PEFT LoRA and output-head fine-tuning.

    python benchmarks/bench_quality.py --minutes 5 --seeds 0 1

On the embedded SmolLM2-135M-Instruct base, each method trains for the same number of minutes on GSM8K train
(../shared/data, the same data order for every method: the Trainer's seed and data seed), then is evaluated on fixed
held-out subsets: GSM8K test perplexity (first --ppl problems), greedy exact match, RMSE and token F1 (first --gen
problems), and MATH-500 solution perplexity (first --math500 problems) as a transfer check. The sampling test: each
head sampled at temperature 1 against the base sampled over a small temperature / top-k grid. Results are
appended to benchmarks/results/quality.json after every run, so a long run can be read while it goes on, and a
run that stopped continues where it stopped.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time

import torch
from common import RESULTS, SHARED_DATA, attach, load_base, save_result, trainable_parameters
from transformers import set_seed

from peft_backattn.workbench.base_models import EMBEDDED_DEFAULT, load_base_model
from peft_backattn.workbench.data import load_examples
from peft_backattn.workbench.evaluation import evaluate, generate_solutions, target_nll
from peft_backattn.workbench.metrics import exact_match, extract_answer, numeric_errors, perplexity
from peft_backattn.workbench.training import TrainingOptions, train_head

# name -> (method in common.attach, head latent size, learning rate)
METHODS = {
    "backattn softmax residual r=64": ("backattn softmax residual", 64, 1e-3),
    "backattn raw residual r=64": ("backattn raw residual", 64, 1e-3),
    "backattn raw replace r=64 (original)": ("backattn raw replace (original)", 64, 1e-3),
    "backattn mixture x4 r=64": ("backattn mixture x4", 64, 1e-3),
    "backattn softmax residual r=576": ("backattn softmax residual", 576, 1e-3),
    "lora r=8 q,k,v,o": ("lora r=8", 0, 1e-3),
    "output head (full V x d)": ("output head", 0, 1e-4),
}
TEMPERATURE_GRID = [(0.3, 0), (0.7, 0), (1.0, 0), (0.3, 40), (0.7, 40), (1.0, 40)]  # (temperature, top_k; 0 = off)


def evaluate_all(model, tokenizer, data: dict, args, progress: bool = True) -> dict:
    """GSM8K metrics on data['gsm8k_ppl'] (generation on the first args.gen) and MATH-500 solution perplexity."""
    result = evaluate(
        model, tokenizer, data["gsm8k_ppl"], max_new_tokens=args.max_new_tokens, batch_size=args.batch_eval,
        max_length=512, generation_limit=args.gen, progress=progress,
    ).to_dict()  # fmt: skip
    nll, tokens, _ = target_nll(model, tokenizer, data["math500"], max_length=768, batch_size=4, progress=progress)
    result["math500_perplexity"] = perplexity(nll, tokens)
    result["math500_tokens"] = tokens
    return result


def sampled_scores(model, tokenizer, examples, temperature: float, top_k: int, args, seed: int) -> dict:
    torch.manual_seed(seed)
    kwargs = {"do_sample": True, "temperature": temperature, "top_k": top_k or None}
    solutions = generate_solutions(
        model, tokenizer, [e.problem for e in examples], max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_eval, **kwargs,
    )  # fmt: skip
    answers = [extract_answer(s) for s in solutions]
    references = [e.answer for e in examples]
    errors = numeric_errors(answers, references)
    return {"temperature": temperature, "top_k": top_k, "exact_match": exact_match(answers, references),
            "rmse": errors.rmse, "numeric_pairs": errors.n}  # fmt: skip


def train_for_budget(name: str, seed: int, tokenizer, data: dict, args):
    """A fresh base with `name` attached, trained for the wall-clock budget; returns (model, training report)."""
    method, r, lr = METHODS[name]
    set_seed(seed)
    model = attach(load_base("smollm2"), method, r=r or 64)
    with tempfile.TemporaryDirectory() as work:
        options = TrainingOptions(
            output_dir=work, max_steps=100_000, batch_size=8, learning_rate=lr, max_length=256, seed=seed,
            logging_steps=1, save_steps=100_000, time_budget_seconds=60 * args.minutes, progress_bar=False,
            save_final=False,
        )  # fmt: skip
        report = train_head(model, tokenizer, data["train"], options)
    return model.eval(), report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget per method")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (head init, data order)")
    parser.add_argument("--train-limit", type=int, default=4000, help="GSM8K training problems to draw from")
    parser.add_argument("--ppl", type=int, default=150, help="GSM8K test problems for perplexity")
    parser.add_argument("--gen", type=int, default=30, help="GSM8K test problems answered by generation")
    parser.add_argument("--math500", type=int, default=50, help="MATH-500 problems for solution perplexity")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="generation length")
    parser.add_argument("--batch-eval", type=int, default=10, help="evaluation batch size")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="subset of the methods")
    parser.add_argument("--skip-sampling", action="store_true", help="skip the temperature test")
    parser.add_argument("--output", default="quality", help="results file name in benchmarks/results")
    args = parser.parse_args()
    if not SHARED_DATA.is_dir():
        sys.exit(f"the shared math data ({SHARED_DATA}) is absent")

    data = {
        "train": load_examples(str(SHARED_DATA / "gsm8k" / "train.jsonl"), fields="gsm8k", limit=args.train_limit),
        "gsm8k_ppl": load_examples(str(SHARED_DATA / "gsm8k" / "test.jsonl"), fields="gsm8k", limit=args.ppl),
        "math500": load_examples(str(SHARED_DATA / "math500" / "test.jsonl"), fields="math500", limit=args.math500),
    }
    path = RESULTS / f"{args.output}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["settings"] = vars(args) | {"base": EMBEDDED_DEFAULT, "train_file": "gsm8k/train.jsonl"}
    runs = results.setdefault("runs", [])
    _, tokenizer = load_base_model(EMBEDDED_DEFAULT)
    sampling_examples = data["gsm8k_ppl"][: args.gen]

    if not any(run["method"] == "base" for run in runs):
        base = load_base("smollm2")
        start = time.monotonic()
        runs.append({"method": "base", "seed": None, **evaluate_all(base, tokenizer, data, args),
                     "eval_seconds": time.monotonic() - start})  # fmt: skip
        if not args.skip_sampling:
            results["sampling_base_grid"] = [
                sampled_scores(base, tokenizer, sampling_examples, t, k, args, seed=0) for t, k in TEMPERATURE_GRID
            ]
        save_result(args.output, results)
        del base

    for seed in args.seeds:
        for name in args.methods:
            if any(run["method"] == name and run["seed"] == seed for run in runs):
                continue
            print(f"== {name}, seed {seed}", file=sys.stderr, flush=True)
            model, report = train_for_budget(name, seed, tokenizer, data, args)
            start = time.monotonic()
            metrics = evaluate_all(model, tokenizer, data, args)
            run = {
                "method": name, "seed": seed, "trainable": trainable_parameters(model),
                "learning_rate": METHODS[name][2], "steps": report.steps, "train_seconds": report.seconds,
                "losses": report.losses, "eval_seconds": time.monotonic() - start, **metrics,
            }  # fmt: skip
            if name.startswith("backattn") and not args.skip_sampling:
                run["sampled_at_temperature_1"] = sampled_scores(model, tokenizer, sampling_examples, 1.0, 0, args, 0)
            runs.append(run)
            save_result(args.output, results)
            del model
            gc.collect()


if __name__ == "__main__":
    main()
