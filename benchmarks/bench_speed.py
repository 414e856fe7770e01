"""Training-step and generation speed of the head's modes against LoRA, output-head fine-tuning and the base.

    python benchmarks/bench_speed.py --base smollm2 --batch 8 --length 256 --rounds 5
    python benchmarks/bench_speed.py --base tiny-gpt2 --batch 8 --length 256 --rounds 7
    python benchmarks/bench_speed.py --base smollm2 --only scored --batch 8 --rounds 4   # real GSM8K batches

Training: one optimiser step (forward with the LM loss, backward, AdamW) per method and round, methods alternating;
the floor is the frozen base's no-grad forward. Scored training (smollm2 only): real GSM8K batches as the Trainer
builds them (chat prompts masked, right padding), each method once with the full forward and once with the output
layer run only on the trained positions (workbench.scored_positions, what train_head does); throughput is counted in
trained (target) tokens per second. Generation: greedy decoding with a KV cache, bare base against
unmerged and merged heads. Prints medians, tokens/s and ratios, with the FLOP floors from peft_backattn.costs, and
writes benchmarks/results/speed-<base>.json.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import (
    HEAD_MODES,
    SHARED_DATA,
    alternate,
    attach,
    load_base,
    markdown_table,
    median,
    random_batch,
    save_result,
    trainable_parameters,
)

from peft_backattn import BackAttnConfig
from peft_backattn.costs import base_forward_flops, head_backward_flops, head_forward_flops
from peft_backattn.workbench.base_models import EMBEDDED_DEFAULT, load_base_model
from peft_backattn.workbench.data import PaddingCollator, load_examples, tokenize_examples
from peft_backattn.workbench.scored_positions import only_trained_positions, scored_positions_loss, trained_positions

TRAINED = [*HEAD_MODES, "lora r=8", "output head"]


def flop_ratios(base, config: BackAttnConfig, context: int) -> tuple[float, float]:
    """(training step, evaluation forward) of a head against the base's no-grad forward, from the cost model."""
    emb = base.get_input_embeddings().weight
    out = base.get_output_embeddings().weight
    vocab, hidden, width = out.shape[0], out.shape[1], emb.shape[1]
    skipped = {id(emb), id(out)}
    non_embedding = sum(p.numel() for n, p in base.named_parameters() if id(p) not in skipped and "wpe" not in n)
    layers = base.config.num_hidden_layers
    base_flops = base_forward_flops(non_embedding, vocab, hidden, layers, context, base.config.hidden_size)
    step = base_flops - 2 * vocab * hidden
    step += head_forward_flops(config, vocab, hidden, width, collapsed=False).total
    step += head_backward_flops(config, vocab, hidden, width)
    evaluation = base_flops - 2 * vocab * hidden
    evaluation += head_forward_flops(config, vocab, hidden, width, collapsed=config.is_linear).total
    return step / base_flops, evaluation / base_flops


def training_speed(base, args) -> dict:
    ids = random_batch(base.config.vocab_size, args.batch, args.length)
    tokens = ids.numel()
    models = {name: attach(base, name, r=args.r) for name in TRAINED}
    tasks = {}

    def forward_floor() -> None:
        with torch.no_grad():
            base(input_ids=ids)

    tasks["frozen base, no-grad forward"] = forward_floor
    for name, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, optimizer=optimizer) -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        tasks[name] = step
    logits = torch.randn(args.batch * (args.length - 1), base.config.vocab_size, requires_grad=True)
    targets = ids[:, 1:].reshape(-1)

    def lm_loss() -> None:  # what every method pays on top of its forward: log-softmax over V, forward and backward
        F.cross_entropy(logits, targets).backward()
        logits.grad = None

    tasks["LM loss alone (fwd+bwd)"] = lm_loss
    times = alternate(tasks, rounds=args.rounds)
    floor = median(times["frozen base, no-grad forward"])
    loss = median(times["LM loss alone (fwd+bwd)"])
    lora = median(times["lora r=8"])
    rows = []
    for name, samples in times.items():
        seconds = median(samples)
        row = {
            "method": name,
            "median_s": seconds,
            "tokens_per_s": tokens / seconds,
            "x_base_forward": seconds / floor,
            "lora_speedup": lora / seconds,
            "trainable": trainable_parameters(models[name]) if name in models else 0,
            "samples": samples,
        }
        if name in HEAD_MODES:
            step_ratio, _ = flop_ratios(base, BackAttnConfig(r=args.r, **HEAD_MODES[name]), args.length)
            row["flop_floor_x"] = step_ratio
            row["floor_s"] = step_ratio * floor + loss
            row["x_floor"] = seconds / row["floor_s"]
        rows.append(row)
    header = ["method", "trainable", "median s", "tokens/s", "x base fwd", "FLOP floor x", "x (floor + loss)",
              "LoRA time / this"]  # fmt: skip
    table = [
        [r["method"], r["trainable"], r["median_s"], r["tokens_per_s"], r["x_base_forward"],
         r.get("flop_floor_x", "-"), r.get("x_floor", "-"), r["lora_speedup"]]
        for r in rows
    ]  # fmt: skip
    print(f"\nTraining step, batch {args.batch} x {args.length} tokens, medians of {args.rounds} rounds")
    print(markdown_table(header, table))
    return {"batch": args.batch, "length": args.length, "rounds": args.rounds, "rows": rows}


GENERATION_HEADS = ("backattn raw residual", "backattn softmax residual", "backattn raw replace (original)")
CONTEXT_HEADS = ("backattn softmax residual", "backattn contextual", "backattn contextual taps only")


def generation_speed(base, args, heads: tuple[str, ...] = GENERATION_HEADS, merged: bool = True) -> dict:
    prompts = random_batch(base.config.vocab_size, args.gen_batch, args.gen_prompt, seed=1)
    new_tokens = args.gen_batch * args.gen_new
    variants = {"bare base": base}
    for name in heads:
        model = attach(base, name, r=args.r).eval()
        _perturb(model)
        variants[f"{name}, unmerged"] = model
    if merged:
        model = attach(base, "backattn raw residual", r=args.r).eval()
        _perturb(model)
        variants["backattn raw residual, merged"] = model.merge_and_unload()

    def generate(model) -> None:
        with torch.no_grad():
            model.generate(
                input_ids=prompts, max_new_tokens=args.gen_new, min_new_tokens=args.gen_new, do_sample=False,
                pad_token_id=0,
            )  # fmt: skip

    tasks = {name: (lambda model=model: generate(model)) for name, model in variants.items()}
    times = alternate(tasks, rounds=args.gen_rounds)
    bare = median(times["bare base"])
    context = args.gen_prompt + args.gen_new // 2
    rows = []
    for name, samples in times.items():
        seconds = median(samples)
        row = {"variant": name, "median_s": seconds, "tokens_per_s": new_tokens / seconds,
               "x_bare_tokens_per_s": bare / seconds, "samples": samples}  # fmt: skip
        mode = name.split(",")[0]
        if mode in HEAD_MODES and not HEAD_MODES[mode].get("context"):  # costs.py counts the seed's head only
            config = BackAttnConfig(r=args.r, **HEAD_MODES[mode])
            merged = name.endswith(", merged")
            row["flop_floor_x_tokens_per_s"] = 1.0 if merged else 1 / flop_ratios(base, config, context)[1]
        rows.append(row)
    header = ["variant", "median s", "tokens/s", "x bare tokens/s", "FLOP floor"]
    table = [[r["variant"], r["median_s"], r["tokens_per_s"], r["x_bare_tokens_per_s"],
              r.get("flop_floor_x_tokens_per_s", "-")] for r in rows]  # fmt: skip
    print(f"\nGreedy generation, batch {args.gen_batch}, prompt {args.gen_prompt}, {args.gen_new} new tokens, "
          f"medians of {args.gen_rounds} rounds")  # fmt: skip
    print(markdown_table(header, table))
    return {"batch": args.gen_batch, "prompt": args.gen_prompt, "new_tokens": args.gen_new, "rows": rows}


SCORED_METHODS = ["backattn softmax residual", "backattn raw residual", "lora r=8"]
CONTEXT_METHODS = ["backattn contextual", "backattn contextual taps only", "backattn softmax residual", "lora r=8",
                   "lora r=8 top3"]  # fmt: skip


def scored_training_speed(base, tokenizer, args, methods: list[str] = SCORED_METHODS, full_forward: bool = True):
    """Training steps on real GSM8K batches: full forward against the output layer on trained positions only."""
    examples = load_examples(str(SHARED_DATA / "gsm8k" / "train.jsonl"), limit=args.batch * args.scored_batches)
    dataset, _ = tokenize_examples(examples, tokenizer, args.length)
    collate = PaddingCollator.from_tokenizer(tokenizer)
    batches = [
        collate([dataset[i] for i in range(start, start + args.batch)])
        for start in range(0, args.batch * args.scored_batches, args.batch)
    ]
    trained = [int(trained_positions(b["labels"]).sum()) for b in batches]
    positions = [b["input_ids"].numel() for b in batches]
    cycle = {"index": 0}

    def next_batch() -> dict:  # every task sees the same sequence of batches, one per round
        return batches[cycle["index"] % len(batches)]

    tasks = {}

    def forward_floor() -> None:
        with torch.no_grad():
            batch = next_batch()
            base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    tasks["frozen base, no-grad forward"] = forward_floor
    for method in methods:
        model = attach(base, method, r=args.r)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def full(model=model, optimizer=optimizer) -> None:
            model(**next_batch()).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def scored(model=model, optimizer=optimizer) -> None:
            batch = next_batch()
            with only_trained_positions(model.get_output_embeddings(), batch["labels"]):
                outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            scored_positions_loss(outputs, batch["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if full_forward:
            tasks[f"{method}, full forward"] = full
        tasks[f"{method}, trained positions only"] = scored

    def advance() -> None:
        cycle["index"] += 1

    times = alternate(tasks, rounds=args.rounds, after_round=advance)
    floor = median(times["frozen base, no-grad forward"])
    lora = median(times["lora r=8, trained positions only"])
    trained_per_step = sum(trained) / len(trained)
    rows = []
    for name, samples in times.items():
        seconds = median(samples)
        rows.append({
            "method": name, "median_s": seconds, "trained_tokens_per_s": trained_per_step / seconds,
            "x_base_forward": seconds / floor, "x_lora_trained_tokens_per_s": lora / seconds, "samples": samples,
        })  # fmt: skip
    header = ["method", "median s", "trained tokens/s", "x base fwd", "trained tokens/s x LoRA (scored)"]
    table = [[r["method"], r["median_s"], r["trained_tokens_per_s"], r["x_base_forward"],
              r["x_lora_trained_tokens_per_s"]] for r in rows]  # fmt: skip
    print(
        f"\nTraining step on real GSM8K batches of {args.batch} (max {args.length} tokens): {trained_per_step:.0f} "
        f"trained of {sum(positions) / len(positions):.0f} positions per batch, medians of {args.rounds} rounds"
    )
    print(markdown_table(header, table))
    return {"batch": args.batch, "max_length": args.length, "rounds": args.rounds, "trained_per_batch": trained,
            "positions_per_batch": positions, "rows": rows}  # fmt: skip


def _perturb(model) -> None:
    """Non-zero head weights (an untrained residual head has W_Q = 0), so that no product is trivially zero."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".backattn_heads." in name:
                param.add_(0.01 * torch.randn(param.shape, generator=generator))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2", choices=("smollm2", "tiny-gpt2"), help="base model")
    parser.add_argument("--r", type=int, default=64, help="latent size of the heads")
    parser.add_argument("--batch", type=int, default=8, help="training batch size")
    parser.add_argument("--length", type=int, default=256, help="training sequence length")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per method (after one warm-up)")
    parser.add_argument("--gen-batch", type=int, default=4, help="generation batch size")
    parser.add_argument("--gen-prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--gen-new", type=int, default=32, help="generated tokens")
    parser.add_argument("--gen-rounds", type=int, default=5, help="timed generation rounds")
    parser.add_argument("--scored-batches", type=int, default=4, help="distinct GSM8K batches for scored training")
    parser.add_argument(
        "--only",
        choices=("training", "generation", "scored", "contextual"),
        help="run one part (default: all but contextual, which times the contextual head's scored training and "
        "generation against the seed's head, LoRA and LoRA on the top 3 layers)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"base": args.base, "r": args.r}
    if args.base == "smollm2":
        base, tokenizer = load_base_model(EMBEDDED_DEFAULT)
    else:
        base, tokenizer = load_base(args.base), None
    if args.only in (None, "training"):
        result["training"] = training_speed(base, args)
    if args.only in (None, "generation"):
        result["generation"] = generation_speed(base, args)
    if args.only in (None, "scored") and tokenizer is not None:
        result["scored_training"] = scored_training_speed(base, tokenizer, args)
    if args.only == "contextual" and tokenizer is not None:
        result["scored_training"] = scored_training_speed(base, tokenizer, args, CONTEXT_METHODS, full_forward=False)
        result["generation"] = generation_speed(base, args, CONTEXT_HEADS, merged=False)
    save_result(f"speed-{args.base}" + (f"-{args.only}" if args.only else ""), result)


if __name__ == "__main__":
    main()
