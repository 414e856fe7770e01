"""One `generate` call, a different head per sample: `adapter_names=[...]`, with "__base__" for the base alone.

Trains two small heads (worked solutions, and answers only) or takes saved heads from `--heads`, loads them on one
frozen base, and answers a batch of problems in one `model.generate(..., adapter_names=[...])` call. Each row is
then checked against the same prompts generated with only that row's head active (or with the heads disabled).

    python examples/mixed_head_batch.py                          # trains two heads on the embedded SmolLM2
    python examples/mixed_head_batch.py --heads runs/math_head runs/short_head
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import PeftModel

from peft_backattn import BackAttnConfig
from peft_backattn.workbench.base_models import EMBEDDED_DEFAULT, load_base_model
from peft_backattn.workbench.data import format_prompt
from peft_backattn.workbench.problems import MathExample
from peft_backattn.workbench.synthetic import generate_examples
from peft_backattn.workbench.training import TrainingOptions, attach_head, train_head

BASE = "__base__"  # in adapter_names: that sample goes through the base output layer alone


def train_two_heads(model_name: str, output: Path, steps: int) -> list[Path]:
    """A 'math' head on worked solutions and a 'short' head on answers alone, trained in turn on one base."""
    base, tokenizer = load_base_model(model_name)
    solutions = generate_examples(4 * steps, split="train")
    answers = [MathExample(e.problem, f"#### {e.answer}", e.answer) for e in solutions]
    model = attach_head(base, BackAttnConfig(), adapter_name="math")
    model.add_adapter("short", BackAttnConfig())
    for name, examples in (("math", solutions), ("short", answers)):
        model.set_adapter(name)  # the active head is the one that trains and is saved
        options = TrainingOptions(str(output / name), max_steps=steps, batch_size=4, progress_bar=False)
        train_head(model, tokenizer, examples, options)
    return [output / "math", output / "short"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_DEFAULT, help="base model: a folder, a hub name or the default")
    parser.add_argument("--heads", nargs=2, type=Path, help="two saved head folders (default: train two)")
    parser.add_argument("--steps", type=int, default=30, help="training steps of each head when training")
    parser.add_argument("--max-new-tokens", type=int, default=60, help="tokens generated per answer")
    parser.add_argument("--output", type=Path, default=Path("runs/mixed_heads"), help="where trained heads go")
    args = parser.parse_args()

    first, second = args.heads or train_two_heads(args.model, args.output, args.steps)
    heads = [first.resolve().name, second.resolve().name]  # heads are named after their folders
    if heads[0] == heads[1]:
        parser.error(f"give the two head folders different names, got {heads}")
    base, tokenizer = load_base_model(args.model)
    model = PeftModel.from_pretrained(base, str(first), adapter_name=heads[0])
    model.load_adapter(str(second), adapter_name=heads[1])
    model.eval()

    names = [BASE, heads[0], heads[1], heads[0]]  # one per sample
    print(f"adapter_names={names}")
    problems = [e.problem for e in generate_examples(len(names), split="test")]
    tokenizer.padding_side = "left"  # decoder-only generation: prompts end where generation starts
    texts = [format_prompt(p, tokenizer) for p in problems]  # the chat template writes its own special tokens
    prompts = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        mixed = model.generate(**prompts, adapter_names=names, **settings)
        for row, name in enumerate(names):
            if name == BASE:
                with model.disable_adapter():
                    alone = model.generate(**prompts, **settings)
            else:
                model.set_adapter(name)
                alone = model.generate(**prompts, **settings)
            answer = tokenizer.decode(mixed[row, prompts["input_ids"].shape[1] :], skip_special_tokens=True)
            same = torch.equal(mixed[row], alone[row])
            print(f"--- row {row}, head {name!r}: equals that head alone: {same}\n{answer.strip()}")


if __name__ == "__main__":
    main()
