"""FLOPs per token of each head mode against the base's forward pass, from peft_backattn.costs.

    python benchmarks/flops.py --context 256 --r 64

Prints one table per base (GPT-2 small and SmolLM2-135M, built on the meta device from their configs, so nothing
is downloaded) with the head's forward FLOPs in evaluation and training, and the ratios to the base forward.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from peft_backattn import BackAttnConfig
from peft_backattn.costs import base_forward_flops, head_backward_flops, head_forward_flops, trainable_parameters

BASES = {
    "gpt2 (124M)": GPT2Config(),
    "SmolLM2-135M": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
    ),
}  # fmt: skip

MODES = {
    "raw, residual": dict(logit_weighting="raw", combine="residual"),
    "raw, replace (original)": dict(logit_weighting="raw", combine="replace"),
    "softmax, residual": dict(logit_weighting="softmax", combine="residual"),
    "softmax, replace": dict(logit_weighting="softmax", combine="replace"),
    "raw, residual, 4 heads": dict(logit_weighting="raw", combine="residual", num_heads=4),
    "softmax, residual, 4 heads": dict(logit_weighting="softmax", combine="residual", num_heads=4),
    "softmax, residual, gelu": dict(logit_weighting="softmax", combine="residual", query_activation="gelu"),
}


def base_shape(config) -> dict:
    """Parameter counts and widths of a base, from its config (weights on the meta device)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings().weight
    skipped = {id(embedding), id(output)}
    skipped |= {id(m.weight) for n, m in model.named_modules() if n.endswith(("wpe", "embed_positions"))}
    non_embedding = sum(p.numel() for p in model.parameters() if id(p) not in skipped)
    return {
        "non_embedding": non_embedding,
        "vocab": output.shape[0],
        "hidden": output.shape[1],
        "embedding": embedding.shape[1],
        "layers": config.num_hidden_layers,
        "width": config.hidden_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=256, help="tokens of context for the attention term")
    parser.add_argument("--r", type=int, default=64, help="latent size of the head")
    args = parser.parse_args()

    for base_name, config in BASES.items():
        shape = base_shape(config)
        v, d, e = shape["vocab"], shape["hidden"], shape["embedding"]
        base = base_forward_flops(shape["non_embedding"], v, d, shape["layers"], args.context, shape["width"])
        print(f"\n## {base_name}: V={v}, d={d}, base forward {base / 1e6:.1f} MFLOP/token (context {args.context})")
        print("| mode | head params | head MFLOP/token (eval) | eval forward x base | training step x base forward |")
        print("|---|---|---|---|---|")
        for mode_name, kwargs in MODES.items():
            head = BackAttnConfig(r=args.r, **kwargs)
            forward = head_forward_flops(head, v, d, e, collapsed=head.is_linear)
            # The head replaces the base's output product (2 V d) with its own forward.
            evaluation = base - 2 * v * d + forward.total
            train_forward = head_forward_flops(head, v, d, e, collapsed=False)
            train = base - 2 * v * d + train_forward.total + head_backward_flops(head, v, d, e)
            print(
                f"| {mode_name} | {trainable_parameters(head, e) / 1e3:.0f} k | {forward.total / 1e6:.1f} "
                f"| {evaluation / base:.3f} | {train / base:.3f} |"
            )


if __name__ == "__main__":
    main()
