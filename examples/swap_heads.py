"""Two heads on one frozen base: switch between them with `set_adapter`, and check each equals that head alone.

Trains two small heads (worked solutions, and answers only), or takes saved heads from `--heads`. It then loads
each head alone on a fresh base, loads all heads on one base, switches between them, and prints the largest logit
difference from the head loaded alone (0: swapping changes nothing but the head) and how long `set_adapter` took.

    python examples/swap_heads.py                                # trains two heads on the embedded SmolLM2
    python examples/swap_heads.py --heads runs/math_head runs/short_head
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from peft import PeftModel

from peft_backattn import BackAttnConfig
from peft_backattn.workbench.base_models import EMBEDDED_DEFAULT, load_base_model
from peft_backattn.workbench.problems import MathExample
from peft_backattn.workbench.synthetic import generate_examples
from peft_backattn.workbench.training import TrainingOptions, attach_head, train_head


def train_two_heads(model_name: str, output: Path, steps: int, r: int) -> list[Path]:
    """A 'math' head on worked solutions and a 'short' head on answers alone, trained in turn on one base."""
    base, tokenizer = load_base_model(model_name)
    solutions = generate_examples(4 * steps, split="train")
    answers = [MathExample(e.problem, f"#### {e.answer}", e.answer) for e in solutions]
    model = attach_head(base, BackAttnConfig(r=r), adapter_name="math")
    model.add_adapter("short", BackAttnConfig(r=r))
    folders = []
    for name, examples in (("math", solutions), ("short", answers)):
        model.set_adapter(name)  # the active head is the one that trains and is saved
        options = TrainingOptions(str(output / f"{name}_head"), max_steps=steps, batch_size=4, progress_bar=False)
        folders.append(Path(train_head(model, tokenizer, examples, options).head_dir))
    return folders


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_DEFAULT, help="base model: a folder, a hub name or the default")
    parser.add_argument("--heads", nargs="+", type=Path, help="saved head folders (default: train two)")
    parser.add_argument("--steps", type=int, default=30, help="training steps of each head when training")
    parser.add_argument("--r", type=int, default=64, help="latent size of the heads when training")
    parser.add_argument("--output", type=Path, default=Path("runs/swap_heads"), help="where trained heads go")
    args = parser.parse_args()

    folders = args.heads or train_two_heads(args.model, args.output, args.steps, args.r)
    names = [folder.resolve().name for folder in folders]  # heads are named after their folders
    if len(names) < 2 or len(set(names)) != len(names):
        parser.error(f"give two or more head folders with different names, got {names}")
    _, tokenizer = load_base_model(args.model)
    probe = tokenizer([e.problem for e in generate_examples(4, split="test")], return_tensors="pt", padding=True)

    alone = {}  # each head on a base of its own
    for name, folder in zip(names, folders, strict=True):
        model = PeftModel.from_pretrained(load_base_model(args.model)[0], str(folder)).eval()
        alone[name] = logits(model, probe)
        del model
    between = (alone[names[0]] - alone[names[-1]]).abs().max().item()
    print(f"max |logit difference| between {names[0]} and {names[-1]}, each alone: {between:g}")

    model = PeftModel.from_pretrained(load_base_model(args.model)[0], str(folders[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:], strict=True):
        model.load_adapter(str(folder), adapter_name=name)
    model.eval()
    for name in [*names, names[0]]:
        started = time.perf_counter()
        model.set_adapter(name)
        milliseconds = 1e3 * (time.perf_counter() - started)
        difference = (logits(model, probe) - alone[name]).abs().max().item()
        print(f"set_adapter({name!r}): {milliseconds:.2f} ms; max |logit difference| vs {name} alone: {difference:g}")


if __name__ == "__main__":
    main()
