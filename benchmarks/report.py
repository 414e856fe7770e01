"""Turn benchmarks/results/*.json into the tables and plots of docs/results.md and docs/history.md.

    python benchmarks/report.py

The pages hold the prose; each table sits between `<!-- generated: NAME -->` and `<!-- end -->` markers and is
rewritten from the result files, so every number in it comes from a benchmark run. results.md shows the present
runs, history.md the superseded ones. Plots go to docs/img/. Nothing is trained or timed here.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from common import RESULTS, markdown_table

from peft_backattn.workbench.metrics import wilson_interval

DOCS = Path(__file__).resolve().parents[1] / "docs"
IMAGES = DOCS / "img"
PAGES = (DOCS / "results.md", DOCS / "history.md")
# One generated block: its marker, its body (the table and a newline; empty in a fresh block), its end marker.
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end -->)", re.DOTALL)


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def speed_training_table(result: dict) -> str:
    header = ["method", "trainable params", "step (s)", "tokens/s", "x base no-grad forward", "FLOP floor x",
              "x (FLOP floor + LM loss)", "x LoRA's tokens/s"]  # fmt: skip
    rows = []
    for row in result["training"]["rows"]:
        rows.append([
            row["method"], f"{row['trainable']:,}" if row["trainable"] else "-", row["median_s"],
            round(row["tokens_per_s"]), row["x_base_forward"], row.get("flop_floor_x", "-"),
            row.get("x_floor", "-"), row["lora_speedup"],
        ])  # fmt: skip
    training = result["training"]
    return (f"Batch {training['batch']} x {training['length']} tokens, median of {training['rounds']} rounds; "
            f"`{result['command']}`\n\n" + markdown_table(header, rows))  # fmt: skip


def speed_generation_table(result: dict) -> str:
    generation = result["generation"]
    header = ["variant", "time (s)", "new tokens/s", "x bare base", "FLOP floor"]
    rows = [[r["variant"], r["median_s"], round(r["tokens_per_s"], 1), r["x_bare_tokens_per_s"],
             r.get("flop_floor_x_tokens_per_s", "-")] for r in generation["rows"]]  # fmt: skip
    caption = (f"Greedy, batch {generation['batch']}, prompt {generation['prompt']} tokens, "
               f"{generation['new_tokens']} new tokens; `{result['command']}`")  # fmt: skip
    return caption + "\n\n" + markdown_table(header, rows)


def _memory_methods(rows: list[dict]) -> list[str]:
    """The method columns of a memory result (every key but the row's own coordinates)."""
    return [key for key in rows[0] if key not in ("mode", "length", "logits_mb")]


def memory_table(result: dict, mode: str) -> str:
    methods = _memory_methods(result["rows"])
    header = ["sequence length", "one fp32 logits tensor (MB)", *methods]
    rows = [[r["length"], round(r["logits_mb"]), *(round(r[m]) if r[m] is not None else "-" for m in methods)]
            for r in result["rows"] if r["mode"] == mode]  # fmt: skip
    return f"Peak MB above the loaded model, batch 1; `{result['command']}`\n\n" + markdown_table(header, rows)


def swap_table(result: dict) -> str:
    header = ["method", "set_adapter (ms)", "load_adapter (ms)", "first forward after a swap (ms)",
              "next forward (ms)", "file (kB)", "file / base weights"]  # fmt: skip
    rows = [[r["method"], r["set_adapter_ms"], r["load_adapter_ms"], r["first_forward_after_swap_ms"],
             r["next_forward_ms"], round(r["file_bytes"] / 1e3, 1), f"{100 * r['file_fraction_of_base']:.3f} %"]
            for r in result["rows"]]  # fmt: skip
    return (f"Base weights {result['base_bytes'] / 1e6:.0f} MB; `{result['command']}`\n\n"
            + markdown_table(header, rows))  # fmt: skip


def _spread(values: list[float], form: str = ".3g") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{form}}"
    return f"{statistics.mean(values):{form}} ({min(values):{form}}-{max(values):{form}})"


def quality_groups(result: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for run in result["runs"]:
        groups.setdefault(run["method"], []).append(run)
    return groups


def _quality_command(settings: dict) -> str:
    """The bench_quality.py flags shared by every run (seeds and methods vary per invocation)."""
    return (f"python bench_quality.py --minutes {settings['minutes']:g} --ppl {settings['ppl']} "
            f"--gen {settings['gen']} --math500 {settings['math500']} "
            f"--max-new-tokens {settings['max_new_tokens']}")  # fmt: skip


def quality_table(result: dict) -> str:
    settings = result["settings"]
    gen = settings["gen"]
    header = ["method", "trainable params", "seeds", "steps in budget", "GSM8K test perplexity",
              f"exact match (of {gen})", "RMSE", "token F1", "MATH-500 perplexity"]  # fmt: skip
    rows = []
    for name, runs in quality_groups(result).items():
        trained = runs[0]["seed"] is not None
        rows.append([
            name, f"{runs[0]['trainable']:,}" if runs[0].get("trainable") else "-",
            ", ".join(str(r["seed"]) for r in runs) if trained else "-",
            _spread([r.get("steps") for r in runs]) if trained else "-",
            _spread([r["perplexity"] for r in runs]), _spread([round(r["exact_match"] * gen) for r in runs]),
            _spread([r["rmse"] for r in runs]), _spread([r["f1"] for r in runs]),
            _spread([r["math500_perplexity"] for r in runs]),
        ])  # fmt: skip
    return (f"{settings['minutes']:g} minutes of training per method and seed on GSM8K train, then greedy answers to "
            f"{gen} GSM8K test problems; mean (min-max) over seeds; `{_quality_command(settings)} --seeds ...`\n\n"
            + markdown_table(header, rows))  # fmt: skip


def sampling_table(result: dict) -> str:
    gen = result["settings"]["gen"]
    rows = []
    for entry in result.get("sampling_base_grid", []):
        label = f"base, temperature {entry['temperature']}, top-k {entry['top_k'] or 'off'}"
        rows.append([label, round(entry["exact_match"] * gen), entry["rmse"] if entry["rmse"] is not None else "-"])
    for name, runs in quality_groups(result).items():
        for run in runs:
            sampled = run.get("sampled_at_temperature_1")
            if sampled:
                label = f"{name} (seed {run['seed']}), temperature 1, top-k off"
                rmse = sampled["rmse"] if sampled["rmse"] is not None else "-"
                rows.append([label, round(sampled["exact_match"] * gen), rmse])
    header = ["sampling", f"exact match (of {gen})", "RMSE"]
    return markdown_table(header, rows)


def plots(speed: dict | None, memory: dict | None, quality: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMAGES.mkdir(exist_ok=True)
    if quality:
        figure, axis = plt.subplots(figsize=(8, 4.5))
        for name, runs in quality_groups(quality).items():
            run = runs[0]
            if not run.get("losses"):
                continue
            axis.plot(*_loss_curve(run), label=name)
        axis.set_xlabel("training time (minutes, 2 CPU cores)")
        axis.set_ylabel("training loss (moving average of 5 steps, log scale)")
        axis.set_yscale("log")
        axis.set_title("Training loss on GSM8K, SmolLM2-135M frozen, seed 0")
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(IMAGES / "loss_curves.png", dpi=120)
        plt.close(figure)

        groups = list(quality_groups(quality).items())
        figure, axes = plt.subplots(1, 2, figsize=(10, 4.5))
        for axis, key, title in ((axes[0], "perplexity", "GSM8K test perplexity"),
                                 (axes[1], "math500_perplexity", "MATH-500 solution perplexity")):  # fmt: skip
            # Runs above twice the base (the original replace mode) would flatten the rest: cut them, label them.
            base_value = groups[0][1][0][key]
            all_values = [r[key] for _, runs in groups for r in runs]
            low = min(all_values)
            top = 1.03 * max(v for v in all_values if v <= 2 * base_value)
            for index, (_name, runs) in enumerate(groups):
                values = [r[key] for r in runs]
                mean = statistics.mean(values)
                axis.scatter([index] * len(values), [min(v, top) for v in values], color="tab:blue")
                axis.bar(index, min(mean, top), alpha=0.3, color="tab:blue")
                if mean > top:
                    axis.annotate(f"{mean:,.0f}\n(off scale)", (index, top), ha="center", va="top", fontsize=7)
            axis.axhline(base_value, color="gray", linestyle="--", linewidth=0.8)
            axis.set_xticks(range(len(groups)), [name for name, _ in groups], rotation=60, ha="right", fontsize=7)
            axis.set_title(title + " (lower is better)")
            axis.set_ylim(0.95 * low, top)
        figure.tight_layout()
        figure.savefig(IMAGES / "quality.png", dpi=120)
        plt.close(figure)
    if speed:
        rows = [r for r in speed["training"]["rows"] if r["method"] != "LM loss alone (fwd+bwd)"]
        figure, axis = plt.subplots(figsize=(8, 4.5))
        axis.barh([r["method"] for r in rows], [r["x_base_forward"] for r in rows], color="tab:orange",
                  label="measured")  # fmt: skip
        floors = [(i, r["floor_s"] / base_forward_seconds(speed)) for i, r in enumerate(rows) if "floor_s" in r]
        axis.scatter([f for _, f in floors], [i for i, _ in floors], color="black", marker="|", s=300,
                     label="FLOP floor + LM loss", zorder=3)  # fmt: skip
        axis.set_xlabel("training step time / frozen base no-grad forward (SmolLM2-135M, 8 x 256 tokens)")
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(IMAGES / "cost_ratios.png", dpi=120)
        plt.close(figure)
    if memory:
        figure, axes = plt.subplots(1, 2, figsize=(10, 4))
        for axis, mode in zip(axes, ("inference", "train"), strict=True):
            rows = [r for r in memory["rows"] if r["mode"] == mode]
            for method in _memory_methods(rows):
                if rows[0][method] is None:
                    continue
                axis.plot([r["length"] for r in rows], [r[method] for r in rows], marker="o", label=method)
            axis.plot([r["length"] for r in rows], [r["logits_mb"] for r in rows], "k--", label="one logits tensor")
            axis.set_xscale("log", base=2)
            axis.set_xlabel("sequence length (batch 1)")
            axis.set_ylabel("peak MB above the loaded model")
            axis.set_title(mode)
            axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(IMAGES / "memory.png", dpi=120)
        plt.close(figure)


def sweep_table(result: dict) -> str:
    """Each grid point of `bench_tuned.py sweep`, best of each method in bold."""
    best = {}
    for run in result["runs"]:
        if run["method"] not in best or run["validation_perplexity"] < best[run["method"]]["validation_perplexity"]:
            best[run["method"]] = run
    rows = []
    for run in result["runs"]:
        mark = "**" if best[run["method"]] is run else ""
        losses = f"{run['losses'][0]:.3f} -> {_tail(run['losses']):.3f}"
        rows.append([run["method"], f"{run['lr']:g}", run["init_std"] if run["init_std"] is not None else "-",
                     run["steps"], losses,
                     f"{mark}{run['validation_perplexity']:.3f}{mark}"])  # fmt: skip
    header = ["method", "learning rate", "init_std", "steps", "loss (first -> mean of last 10)",
              f"validation perplexity ({result['settings']['validation']} held-out train problems)"]  # fmt: skip
    base = result.get("base_validation_perplexity")
    reference = f"; the base without training: {base:.3f}" if base else ""
    return f"`python bench_tuned.py sweep`{reference}\n\n" + markdown_table(header, rows)


def _tail(losses: list[float], last: int = 10) -> float:
    return statistics.mean(losses[-last:])


def tuned_table(result: dict) -> str:
    """`bench_tuned.py compare`: mean (min-max) over seeds per method and budget; exact match per answered run and
    the Wilson interval of their pooled count (runs scored without answers show in `seeds` only)."""
    settings = result["settings"]
    groups: dict[tuple, list[dict]] = {}
    for run in sorted(result["runs"], key=lambda r: (r.get("minutes") or 0, r["method"])):
        groups.setdefault((run["method"], run.get("minutes")), []).append(run)
    rows = []
    for (method, minutes), runs in groups.items():
        trained = minutes is not None
        answered = [r for r in runs if r["n"]]
        if answered:
            solved, scored = sum(r["solved"] for r in answered), sum(r["n"] for r in answered)
            low, high = wilson_interval(solved, scored)
            per_run = " + ".join(str(r["solved"]) for r in answered)
            each = " each" if len(answered) > 1 else ""
            exact = f"{per_run} of {answered[0]['n']}{each}: {solved / scored:.3f} [{low:.3f}, {high:.3f}]"
            lines = _spread([r["answer_lines"] for r in answered], ".2f")
        else:
            exact = lines = "not answered"
        rows.append([
            method, f"{minutes:g}" if trained else "-", len(runs) if trained else "-",
            f"{runs[0]['lr']:g}" if trained else "-", _spread([r["steps"] for r in runs]) if trained else "-",
            _spread([r["perplexity"] for r in runs], ".3f"), exact, lines,
            _spread([r["math500_perplexity"] for r in runs], ".3f"),
        ])  # fmt: skip
    header = ["method", "minutes", "seeds", "lr", "steps", f"GSM8K test perplexity ({settings['ppl']} problems)",
              "exact match: solved per seed, pooled [Wilson 95 %]", "answers in a `#### N` line",
              f"MATH-500 perplexity ({settings['math500']})"]  # fmt: skip
    return "Mean (min-max) over seeds; the commands are above the table.\n\n" + markdown_table(header, rows)


def tuned_plot(result: dict) -> None:
    """GSM8K test perplexity against training minutes (every seed; the base at 0) and seed 0's training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMAGES.mkdir(exist_ok=True)
    base = next(r["perplexity"] for r in result["runs"] if r["method"] == "base")
    figure, (curve, loss) = plt.subplots(1, 2, figsize=(11, 4.5))
    methods = sorted({r["method"] for r in result["runs"] if r["method"] != "base"})
    for color, method in zip(("tab:blue", "tab:orange"), methods, strict=False):
        runs = [r for r in result["runs"] if r["method"] == method]
        for seed in sorted({r["seed"] for r in runs}):
            points = sorted((r["minutes"], r["perplexity"]) for r in runs if r["seed"] == seed)
            style = "-o" if len(points) > 1 else "o"
            label = f"{method}, seed {seed}"
            curve.plot([0] + [m for m, _ in points], [base] + [p for _, p in points], style, color=color,
                       alpha=1.0 if seed == 0 else 0.5, label=label)  # fmt: skip
        longest = max((r for r in runs if r["seed"] == 0), key=lambda r: r["minutes"])
        loss.plot(*_loss_curve(longest, window=10), color=color, label=method)
    curve.axhline(base, color="gray", linestyle="--", linewidth=0.8, label="base, untrained")
    curve.set_xlabel("training minutes (2 quiet CPU cores)")
    curve.set_ylabel("GSM8K test perplexity (lower is better)")
    curve.set_title("Equal wall clock, each method at its tuned rate")
    curve.legend(fontsize=7)
    loss.set_xlabel("training minutes (steps spread evenly over the run)")
    loss.set_ylabel("training loss, moving average of 10 steps")
    loss.set_title("Seed 0, the longest run")
    loss.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(IMAGES / "tuned_curves.png", dpi=120)
    plt.close(figure)


def scored_speed_table(result: dict) -> str:
    """`bench_speed.py --only scored`: real GSM8K batches, each method with the full forward and trained positions
    only."""
    scored = result["scored_training"]
    trained = statistics.mean(scored["trained_per_batch"])
    positions = statistics.mean(scored["positions_per_batch"])
    header = ["method", "step (s)", "trained tokens/s", "x base no-grad forward",
              "x LoRA's trained tokens/s (trained positions only)"]  # fmt: skip
    rows = [[r["method"], r["median_s"], r["trained_tokens_per_s"], r["x_base_forward"],
             r["x_lora_trained_tokens_per_s"]] for r in scored["rows"]]  # fmt: skip
    return (f"Batches of {scored['batch']} GSM8K train problems (up to {scored['max_length']} tokens): "
            f"{trained:,.0f} of {positions:,.0f} positions trained per batch on average; median of "
            f"{scored['rounds']} rounds; `{result['command']}`\n\n" + markdown_table(header, rows))  # fmt: skip


CACHED_EPOCHS = {
    "feature pass": "feature pass (once)",
    "head, cached features": "one epoch of the head on the cached features",
    "head, ordinary epoch": "one ordinary epoch of the head",
    "lora r=8, ordinary epoch": "one ordinary epoch of LoRA r=8 (q, k, v, o)",
}


def cached_speed_table(result: dict) -> str:
    """`bench_cached.py`: whole epochs per trained token, against LoRA's ordinary epoch and the cached epoch."""
    epochs, data = result["epochs"], result["data"]
    lora = epochs["lora r=8, ordinary epoch"]["ms_per_trained_token"]
    rows = []
    for key, label in CACHED_EPOCHS.items():
        epoch = epochs[key]
        versus_lora = lora / epoch["ms_per_trained_token"] if key != "feature pass" else "-"
        rows.append([label, epoch["epoch_s"], epoch["ms_per_trained_token"], round(epoch["trained_tokens_per_s"]),
                     versus_lora, epoch["x_cached_epoch"]])  # fmt: skip
    header = ["", "seconds", "ms per trained token", "trained tokens/s", "x LoRA's trained tokens/s",
              "x a cached epoch"]  # fmt: skip
    settings = result["settings"]
    return (f"Head `{settings['head']}`, the first {data['examples']} GSM8K train problems "
            f"({data['trained_tokens']:,} trained tokens of {data['positions']:,} positions), batch "
            f"{settings['batch']}, lr {settings['lr']:g}, one after another in one process; `{result['command']}`\n\n"
            + markdown_table(header, rows))  # fmt: skip


def cached_quality_table(result: dict) -> str:
    """`bench_cached.py --quality`: GSM8K test perplexity after the timed epochs and after several cached ones."""
    quality = result["quality"]
    labels = {
        "head, ordinary epoch": "head, one ordinary epoch",
        "lora r=8, ordinary epoch": "LoRA r=8, one ordinary epoch",
        "head, 5 cached epochs": f"head, feature pass + {result['settings']['quality_epochs']:g} cached epochs",
    }
    rows = [[labels.get(name, name), round(row["train_s"]) if row["train_s"] else "-", f"{row['perplexity']:.3f}"]
            for name, row in quality["rows"].items()]  # fmt: skip
    header = ["training", "wall clock (s)", f"GSM8K test perplexity ({quality['test_problems']} problems)"]
    return f"`{result['command']}`\n\n" + markdown_table(header, rows)


def serve_table(result: dict) -> str:
    """`bench_serve.py`: throughput and latency with requests spread over more heads, and the correctness run."""
    settings, check = result["settings"], result["check"]
    rows = [[name, r["tokens_per_s"], r["p50_latency_s"], r["p95_latency_s"], r["vs_one_head"]]
            for name, r in result["speed"].items()]  # fmt: skip
    header = ["requests spread over", "output tokens/s", "p50 latency (s)", "p95 latency (s)", "x one head"]
    return (f"{settings['clients']} concurrent clients, {settings['tokens']} greedy output tokens per request, "
            f"{settings['requests']} requests per setting and round, {settings['rounds']} rounds; a loaded head holds "
            f"{result['memory']['head_tensor_bytes'] / 1e3:.1f} kB. Correctness run: {check['answered']:,} of "
            f"{check['requests']:,} requests over {check['heads_used']} heads answered ({settings['check_tokens']} "
            f"tokens each, {settings['check_clients']} clients), {check['matched']} of {check['sampled']} sampled "
            f"ones equal to `generate` with their head alone; `{result['command']}`\n\n"
            + markdown_table(header, rows))  # fmt: skip


def serve_vllm_table(result: dict) -> str:
    """`bench_serve.py --vllm`: bare vLLM, vLLM with the heads' processor, and `peft-backattn serve`, same requests."""
    settings = result["settings"]

    def share(entry: dict, key: str) -> str:
        return f"{100 * entry[key]:.0f} %" if key in entry else "-"

    rows = [[name, s["tokens_per_s"], s["p50_latency_s"], s["p95_latency_s"], s["vs_bare_vllm"],
             share(s, "processor_share_of_step"), share(s, "extra_share_of_step")]
            for name, s in result["speed"].items()]  # fmt: skip
    header = ["server: requests spread over", "output tokens/s", "p50 latency (s)", "p95 latency (s)",
              "x bare vLLM", "processor alone, share of the step", "step's growth over bare vLLM"]  # fmt: skip
    flops = result["flops"]
    return (f"{settings['clients']} concurrent clients, {settings['tokens']} greedy output tokens per request, "
            f"{settings['requests']} requests per setting and round, {settings['rounds']} rounds, one server at a "
            f"time. The two vocabulary products: "
            f"{flops['two_vocabulary_products_per_token'] / 1e6:.1f} MFLOP a token, the base's forward "
            f"{flops['base_forward_per_token_context_256'] / 1e6:.1f} MFLOP (context 256); `{result['command']}`\n\n"
            + markdown_table(header, rows))  # fmt: skip


def lmeval_table(runs: list[dict]) -> str:
    """lm-eval's own results files: exact match under both filters, with its standard error and the count."""
    rows = []
    for run in runs:
        task = next(iter(run["results"]))
        scores, n = run["results"][task], run["n-samples"][task]["effective"]
        peft = run["config"]["model_args"].get("peft")
        cells = []
        for metric in ("flexible-extract", "strict-match"):
            rate = scores[f"exact_match,{metric}"]
            cells.append(f"{rate:.3f} ± {scores[f'exact_match_stderr,{metric}']:.3f} ({round(rate * n)} of {n})")
        low, high = wilson_interval(round(scores["exact_match,flexible-extract"] * n), n)
        rows.append([f"base + head `{peft}`" if peft else "base", *cells, f"[{low:.3f}, {high:.3f}]"])
    header = ["model", "exact match, `flexible-extract`", "exact match, `strict-match`",
              "Wilson 95 % interval (flexible)"]  # fmt: skip
    task = next(iter(runs[0]["results"]))
    return (f"lm-eval task `{task}` version {runs[0]['versions'][task]:g}, {runs[0]['n-shot'][task]}-shot, the "
            f"first {runs[0]['n-samples'][task]['effective']} test problems; ± is lm-eval's standard error\n\n"
            + markdown_table(header, rows))  # fmt: skip


def _met(condition: bool) -> str:
    return "yes" if condition else "no"


def _x_lora(cached: dict) -> tuple[float, float]:
    """`bench_cached.py`: the head's trained tokens/s against LoRA's, in an ordinary epoch and on cached features."""
    epochs = cached["epochs"]
    lora_ms = epochs["lora r=8, ordinary epoch"]["ms_per_trained_token"]
    ordinary = epochs["head, ordinary epoch"]["ms_per_trained_token"]
    on_cache = epochs["head, cached features"]["ms_per_trained_token"]
    return lora_ms / ordinary, lora_ms / on_cache


def goals_table(speed: dict, cached: dict, tuned: dict, swap: dict, serve: dict) -> str:
    """The project's goals, each with the present measurement that answers it and whether it is met."""
    ordinary, on_cache = _x_lora(cached)
    rows = [[
        "the head trains at least 2x LoRA's trained tokens/s on real GSM8K batches",
        f"{ordinary:.3g}x (whole epochs on {cached['data']['examples']} problems); {on_cache:.3g}x for epochs on "
        "cached features, after the feature pass",
        _met(ordinary >= 2) + ("" if ordinary >= 2 else f" ({_met(on_cache >= 2)} on cached features)"),
    ]]  # fmt: skip

    runs = tuned["runs"]
    base = next(r for r in runs if r["method"] == "base")
    curve = {m: sorted((r["minutes"], r["perplexity"]) for r in runs if r["method"] == m and r["seed"] == 0)
             for m in ("head (default config)", "lora r=8 q,k,v,o")}  # fmt: skip
    head, lora = curve["head (default config)"], curve["lora r=8 q,k,v,o"]
    rows.append([
        "the head at or below LoRA's GSM8K test perplexity at equal wall clock, at one budget at least",
        " / ".join(f"{p:.3f}" for _, p in head) + " against LoRA's " + " / ".join(f"{p:.3f}" for _, p in lora)
        + " at " + " / ".join(f"{m:g}" for m, _ in head) + " minutes (seed 0)",
        _met(any(mine <= theirs for (_, mine), (_, theirs) in zip(head, lora, strict=True))),
    ])  # fmt: skip

    answered = [r for r in runs if r["method"] == "head (default config)" and r["n"]]
    best = max(answered, key=lambda r: (r["solved"], r["minutes"]))
    base_low, base_high = wilson_interval(base["solved"], base["n"])
    low, high = wilson_interval(best["solved"], best["n"])
    rows.append([
        "the best head's GSM8K exact match above the base's Wilson interval",
        f"{best['solved']} of {best['n']} [{low:.3f}, {high:.3f}] after {best['minutes']:g} minutes, against the "
        f"base's {base['solved']} of {base['n']} [{base_low:.3f}, {base_high:.3f}]",
        _met(best["solved"] / best["n"] > base_high),
    ])  # fmt: skip

    training = {r["method"]: r for r in speed["training"]["rows"]}
    floors = {name: training[f"backattn {name} residual"]["x_floor"] for name in ("raw", "softmax")}
    rows.append([
        "a head's training step within 10 % of its FLOP floor + LM loss (every position trained)",
        ", ".join(f"{x:.3g}x ({name})" for name, x in floors.items()),
        _met(max(floors.values()) <= 1.1),
    ])  # fmt: skip
    generation = {r["variant"]: r for r in speed["generation"]["rows"]}
    unmerged = generation["backattn raw residual, unmerged"]
    rows.append([
        "unmerged generation within 10 % of its FLOP floor (raw residual)",
        f"{unmerged['x_bare_tokens_per_s']:.3g}x the bare base's tokens/s, floor "
        f"{unmerged['flop_floor_x_tokens_per_s']:.3g}x",
        _met(unmerged["x_bare_tokens_per_s"] >= 0.9 * unmerged["flop_floor_x_tokens_per_s"]),
    ])  # fmt: skip
    merged = generation["backattn raw residual, merged"]["x_bare_tokens_per_s"]
    rows.append(["merged generation at least 0.97x the bare base", f"{merged:.3g}x", _met(merged >= 0.97)])

    swaps = {r["method"]: r for r in swap["rows"]}
    default = swaps["backattn softmax residual"]
    rows.append([
        "a head's file at most 1 % of the base's weights",
        f"{100 * default['file_fraction_of_base']:.3f} % ({default['file_bytes'] / 1e3:.0f} kB of "
        f"{swap['base_bytes'] / 1e6:.0f} MB)",
        _met(default["file_fraction_of_base"] <= 0.01),
    ])  # fmt: skip
    heads = {name: swaps[f"backattn {name} residual"]["set_adapter_ms"] for name in ("raw", "softmax")}
    rows.append([
        "`set_adapter` under 1 ms",
        ", ".join(f"{ms:.3g} ms ({name})" for name, ms in heads.items()),
        _met(max(heads.values()) < 1),
    ])  # fmt: skip
    spread = serve["speed"]["100 heads"]["vs_one_head"]
    rows.append([
        "requests over 100 heads served at 0.9x one head's throughput or better",
        f"{spread:.3g}x",
        _met(spread >= 0.9),
    ])  # fmt: skip
    return markdown_table(["goal", "measured", "met?"], rows)


def base_forward_seconds(speed: dict) -> float:
    """The frozen base's median no-grad forward: the unit every training-step ratio is measured in."""
    return next(r["median_s"] for r in speed["training"]["rows"] if r["method"] == "frozen base, no-grad forward")


def _smooth(values: list[float], window: int = 5) -> list[float]:
    return [statistics.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def _loss_curve(run: dict, window: int = 5) -> tuple[list[float], list[float]]:
    """A run's logged losses (moving average of `window`) against minutes, its steps spread evenly over its time."""
    minutes_per_step = run["train_seconds"] / max(1, run["steps"]) / 60
    return [minutes_per_step * (i + 1) for i in range(len(run["losses"]))], _smooth(run["losses"], window)


def tables() -> dict[str, str]:
    """Every generated block of the pages, by name, from the stored results; no plots, no training."""
    blocks = {}
    for base in ("smollm2", "tiny-gpt2"):
        speed = load(f"speed-{base}")
        if speed:
            blocks[f"speed-training-{base}"] = speed_training_table(speed)
            blocks[f"speed-generation-{base}"] = speed_generation_table(speed)
        memory = load(f"memory-{base}")
        if memory:
            blocks[f"memory-inference-{base}"] = memory_table(memory, "inference")
            blocks[f"memory-train-{base}"] = memory_table(memory, "train")
    swap = load("swap-smollm2")
    if swap:
        blocks["swap-smollm2"] = swap_table(swap)
    quality = load("quality")
    if quality:
        blocks["quality"] = quality_table(quality)
        blocks["sampling"] = sampling_table(quality)
    sweep = load("sweep")
    if sweep:
        blocks["sweep"] = sweep_table(sweep)
    tuned = load("tuned")
    if tuned:
        blocks["tuned"] = tuned_table(tuned)
    scored = load("speed-smollm2-scored")
    if scored:
        blocks["speed-scored-smollm2"] = scored_speed_table(scored)
    cached = load("cached-smollm2")
    if cached:
        blocks["cached-speed"] = cached_speed_table(cached)
        blocks["cached-quality"] = cached_quality_table(cached)
    serve = load("serve-smollm2")
    if serve:
        blocks["serve"] = serve_table(serve)
    for path in sorted(RESULTS.glob("serve-vllm-*.json")):
        blocks[path.stem] = serve_vllm_table(load(path.stem))
    lmeval = [run for run in (load("lmeval-gsm8k-base"), load("lmeval-gsm8k-head")) if run]
    if lmeval:
        blocks["lmeval-gsm8k"] = lmeval_table(lmeval)
    context_sweep = load("context_sweep")
    if context_sweep:
        blocks["context-sweep"] = sweep_table(context_sweep).replace(
            "`python bench_tuned.py sweep`", "`python bench_tuned.py sweep --sweep-output context_sweep --methods ...`"
        )
    context_tuned = load("context_tuned")
    if context_tuned:
        blocks["context-tuned"] = tuned_table(context_tuned)
    context_speed = load("speed-smollm2-contextual")
    if context_speed:
        blocks["context-speed-scored"] = scored_speed_table(context_speed)
        blocks["context-speed-generation"] = speed_generation_table(context_speed)
    transfer = [load(path.stem) for path in sorted(RESULTS.glob("transfer-*.json"))]
    if transfer:
        blocks["context-transfer"] = transfer_table(transfer)
    context_cached = load("cached-smollm2-contextual")
    if context_cached:
        blocks["context-cached-speed"] = cached_speed_table(context_cached)
        blocks["context-cached-quality"] = cached_quality_table(context_cached)
    if tuned and context_tuned:
        blocks["context-goals"] = context_goals_table(tuned, context_tuned, context_speed, context_cached)
    speed = load("speed-smollm2")
    if speed and cached and tuned and swap and serve:
        blocks["goals"] = goals_table(speed, cached, tuned, swap, serve)
    return blocks


def context_goals_table(tuned: dict, context: dict, speed: dict | None, cached: dict | None) -> str:
    """Issue 20's goals for the contextual head: each with its measurement (seed 0) and whether it is met."""
    runs = [*tuned["runs"], *context["runs"]]
    base = next(r for r in tuned["runs"] if r["method"] == "base")

    def point(method: str, minutes: float) -> dict | None:
        found = [r for r in runs if r["method"] == method and r.get("minutes") == minutes and r["seed"] == 0]
        return found[-1] if found else None

    rows = []
    ctx, lora = point("contextual head", 15.0), point("lora r=8 q,k,v,o", 15.0)
    if ctx and lora:
        rows.append([
            "the contextual head at or below LoRA's GSM8K test perplexity at 15 minutes, MATH-500 no worse than the "
            "base's",
            f"{ctx['perplexity']:.3f} against LoRA's {lora['perplexity']:.3f}; MATH-500 "
            f"{ctx['math500_perplexity']:.3f} against the base's {base['math500_perplexity']:.3f}",
            _met(ctx["perplexity"] <= lora["perplexity"] and ctx["math500_perplexity"] <= base["math500_perplexity"]),
        ])  # fmt: skip
        rows.append([
            "at least halfway: the contextual head at or below 3.0 at 15 minutes",
            f"{ctx['perplexity']:.3f}",
            _met(ctx["perplexity"] <= 3.0),
        ])  # fmt: skip
    if speed:
        scored = {r["method"]: r for r in speed["scored_training"]["rows"]}
        live = scored.get("backattn contextual, trained positions only")
        if live:
            rows.append([
                "the contextual head trains at least 1.5x LoRA's trained tokens/s (live)",
                f"{live['x_lora_trained_tokens_per_s']:.3g}x",
                _met(live["x_lora_trained_tokens_per_s"] >= 1.5),
            ])  # fmt: skip
        generation = {r["variant"]: r for r in speed["generation"]["rows"]}
        unmerged = generation.get("backattn contextual, unmerged")
        if unmerged:
            rows.append([
                "unmerged generation at least 0.8x the bare base",
                f"{unmerged['x_bare_tokens_per_s']:.3g}x the bare base's tokens/s",
                _met(unmerged["x_bare_tokens_per_s"] >= 0.8),
            ])  # fmt: skip
    if cached:
        ordinary, on_cache = _x_lora(cached)
        rows.append([
            "the contextual head trains at least 5x LoRA's trained tokens/s on cached features",
            f"{on_cache:.3g}x in epochs on cached features, after the feature pass ({ordinary:.3g}x in an ordinary "
            "epoch; `bench_cached.py`, whole epochs)",
            _met(on_cache >= 5),
        ])  # fmt: skip
    return markdown_table(["goal", "measured", "met?"], rows)


def _token_cell(token: str) -> str:
    """A token as a table cell: its repr (whitespace shows), backticks and pipes made harmless."""
    return "`" + repr(token).replace("`", "'").replace("|", "\\|") + "`"


def transfer_table(results: list[dict]) -> str:
    """`diagnose_transfer.py`: where a trained head's NLL change goes on MATH-500 and GSM8K, by token class."""
    rows = []
    for result in results:
        for data in ("math500", "gsm8k"):
            summary = result[data]
            for group, values in summary["classes"].items():
                rows.append([result["method"], data, group, values["tokens"], f"{values['nll_change_per_token']:+.4f}",
                             f"{values['mean_kl']:.4f}"])  # fmt: skip
            worst = ", ".join(_token_cell(w["token"]) for w in summary["worst_tokens"][:5])
            rows.append([result["method"], data, f"all (worst tokens: {worst})", summary["tokens"],
                         f"{summary['head_nll_per_token'] - summary['base_nll_per_token']:+.4f}",
                         f"{summary['mean_kl']:.4f}"])  # fmt: skip
    header = ["head (4 minutes)", "data", "target tokens", "count", "NLL change per target token (of all)",
              "mean KL(base ‖ head)"]  # fmt: skip
    commands = "; ".join(f"`{r['command']}`" for r in results)
    return f"{commands}\n\n" + markdown_table(header, rows)


def fill(text: str, blocks: dict[str, str]) -> tuple[str, set[str]]:
    """`text` with each of its generated blocks rewritten, and the names of the blocks it holds."""
    found = set()

    def rewrite(match: re.Match) -> str:
        name = match["name"]
        found.add(name)
        if name not in blocks:
            return match[0]
        return match[1] + blocks[name] + "\n" + match[4]

    return BLOCK.sub(rewrite, text), found


def main() -> None:
    blocks = tables()
    placed = set()
    for path in PAGES:
        text, found = fill(path.read_text(), blocks)
        for name in sorted(found - set(blocks)):
            print(f"{path}: no result file for the block {name}; left as it was")
        placed |= found
        path.write_text(text)
    for name in sorted(set(blocks) - placed):
        print(f"no block for {name} in {', '.join(str(p) for p in PAGES)}")
    tuned = load("tuned")
    if tuned:
        tuned_plot(tuned)
    plots(load("speed-smollm2"), load("memory-smollm2"), load("quality"))
    print(f"updated {', '.join(str(p) for p in PAGES)} ({len(blocks)} tables) and {IMAGES}")


if __name__ == "__main__":
    main()
