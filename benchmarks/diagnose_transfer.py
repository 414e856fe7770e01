"""Why does a head trained on GSM8K make MATH-500 perplexity worse? Token by token, against the base (issue 20).

    python diagnose_transfer.py --snapshot /tmp/bench_tuned_snapshots/contextual-head-seed0-4min.safetensors \\
        --method "contextual head" --name contextual-4min

Loads the embedded base with the method's head, the trained weights from a `bench_tuned.py compare` snapshot, and
scores the first --math500 MATH-500 solutions (and as many GSM8K test ones) with the head and without it
(`disable_adapter`). Each target token's NLL change is put in a class (digits, LaTeX and symbols, whitespace,
words) and the script reports where the change goes: the summed NLL change per class, the tokens whose summed
change is largest, and the mean KL(base ‖ head) per class. Writes benchmarks/results/transfer-<name>.json.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
import torch.nn.functional as F
from bench_tuned import ATTACH, KL_TO_BASE  # noqa: F401  (the methods bench_tuned trains)
from common import SHARED_DATA, attach, load_base, save_result
from safetensors.torch import load_file

from peft_backattn.workbench.base_models import EMBEDDED_DEFAULT, load_base_model
from peft_backattn.workbench.data import IGNORE_INDEX, PaddingCollator, load_examples, tokenize_examples


def token_class(text: str) -> str:
    stripped = text.strip()
    if not stripped:
        return "whitespace"
    if re.fullmatch(r"[0-9.,]+", stripped):
        return "digits"
    if re.fullmatch(r"[A-Za-z]+", stripped):
        return "words"
    return "LaTeX and symbols"


@torch.no_grad()
def per_token(model, tokenizer, examples, max_length: int, batch_size: int = 8):
    """(token id, base NLL, head NLL, KL(base || head)) for every target token."""
    dataset, _ = tokenize_examples(examples, tokenizer, max_length)
    collate = PaddingCollator.from_tokenizer(tokenizer)
    rows = []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        head = model(**inputs).logits[:, :-1].float()
        with model.disable_adapter():
            base = model(**inputs).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        kept = labels != IGNORE_INDEX
        targets = labels[kept]
        head_logp, base_logp = F.log_softmax(head[kept], -1), F.log_softmax(base[kept], -1)
        kl = (base_logp.exp() * (base_logp - head_logp)).sum(-1)
        head_nll = -head_logp.gather(1, targets[:, None])[:, 0]
        base_nll = -base_logp.gather(1, targets[:, None])[:, 0]
        rows += list(zip(targets.tolist(), base_nll.tolist(), head_nll.tolist(), kl.tolist(), strict=True))
    return rows


def summarise(rows, tokenizer, top: int = 15) -> dict:
    by_class = defaultdict(lambda: {"tokens": 0, "nll_change": 0.0, "kl": 0.0})
    by_token = defaultdict(lambda: {"count": 0, "nll_change": 0.0})
    for token, base_nll, head_nll, kl in rows:
        text = tokenizer.decode([token])
        group = by_class[token_class(text)]
        group["tokens"] += 1
        group["nll_change"] += head_nll - base_nll
        group["kl"] += kl
        by_token[text]["count"] += 1
        by_token[text]["nll_change"] += head_nll - base_nll
    count = len(rows)
    total = sum(head - base for _, base, head, _ in rows)
    classes = {
        name: {"tokens": g["tokens"], "nll_change_per_token": g["nll_change"] / count, "share_of_change":
               g["nll_change"] / total if total else 0.0, "mean_kl": g["kl"] / g["tokens"]}
        for name, g in sorted(by_class.items())
    }  # fmt: skip
    worst = sorted(by_token.items(), key=lambda item: -item[1]["nll_change"])[:top]
    best = sorted(by_token.items(), key=lambda item: item[1]["nll_change"])[:top]
    return {
        "tokens": count,
        "base_nll_per_token": sum(b for _, b, _, _ in rows) / count,
        "head_nll_per_token": sum(h for _, _, h, _ in rows) / count,
        "mean_kl": sum(k for *_, k in rows) / count,
        "classes": classes,
        "worst_tokens": [{"token": t, **v} for t, v in worst],
        "best_tokens": [{"token": t, **v} for t, v in best],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--snapshot", required=True, help="a bench_tuned.py compare snapshot (.safetensors)")
    parser.add_argument("--method", required=True, choices=list(ATTACH), help="the method the snapshot trained")
    parser.add_argument("--name", required=True, help="results/transfer-<name>.json")
    parser.add_argument("--math500", type=int, default=100)
    parser.add_argument("--gsm8k", type=int, default=100)
    args = parser.parse_args()
    _, tokenizer = load_base_model(EMBEDDED_DEFAULT)
    model = attach(load_base("smollm2"), ATTACH[args.method]).eval()
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(args.snapshot).items():
            parameters[name].copy_(value)
    data = {
        "math500": load_examples(str(SHARED_DATA / "math500" / "test.jsonl"), fields="math500", limit=args.math500),
        "gsm8k": load_examples(str(SHARED_DATA / "gsm8k" / "test.jsonl"), fields="gsm8k", limit=args.gsm8k),
    }
    result = {"snapshot": args.snapshot.rsplit("/", 1)[-1], "method": args.method}
    for name, examples in data.items():
        result[name] = summary = summarise(per_token(model, tokenizer, examples, max_length=512), tokenizer)
        print(f"\n{name}: {summary['tokens']} tokens, NLL/token base {summary['base_nll_per_token']:.4f} -> head "
              f"{summary['head_nll_per_token']:.4f}, mean KL(base ‖ head) {summary['mean_kl']:.4f}")  # fmt: skip
        for group, values in summary["classes"].items():
            print(f"  {group:18s} {values['tokens']:6d} tokens  NLL change/token (of all) "
                  f"{values['nll_change_per_token']:+.4f}  share {values['share_of_change']:+.2f}  "
                  f"mean KL {values['mean_kl']:.4f}")  # fmt: skip
        worst = summary["worst_tokens"]
        print("  worst tokens: " + ", ".join(f"{w['token']!r} {w['nll_change']:+.1f}" for w in worst))
    save_result(f"transfer-{args.name}", result)


if __name__ == "__main__":
    main()
