"""Floating-point operations per token of the head and of the base, from the formulas in docs/design.md.

Matrix products count 2 m n k; element-wise passes over the vocabulary (softmax, scaling, adding) are counted as
`vocab_passes` separately, since on a CPU they cost memory traffic more than arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import BackAttnConfig


@dataclass(frozen=True)
class HeadCost:
    """FLOPs per token of one head, on top of nothing (the base output product is listed on its own)."""

    base_output_product: int  # 2 V d_in, when the head needs the base logits
    head_products: int  # the head's own matrix products
    vocab_passes: int  # element-wise passes over V-sized vectors

    @property
    def total(self) -> int:
        return self.base_output_product + self.head_products


def head_forward_flops(config: BackAttnConfig, vocab: int, hidden: int, embedding: int, collapsed: bool) -> HeadCost:
    """Forward FLOPs per token of the output layer with this head (step by step, or the collapsed linear form)."""
    heads, r = config.num_heads, config.r
    needs_base = config.combine == "residual" or config.logit_weighting == "softmax"
    base = 2 * vocab * hidden if needs_base else 0
    if collapsed:
        if not config.is_linear:
            raise ValueError("only a linear head (raw, no activation, one head) has a collapsed form")
        # q̃ = h M + m0, then q̃ N^T (fused with the residual add).
        return HeadCost(base, 2 * hidden * embedding + 2 * vocab * embedding, 0)
    if config.logit_weighting == "raw":
        weighting, passes = 2 * hidden * embedding, 0  # h (W_out^T N / |V|)
    else:
        weighting, passes = 2 * vocab * embedding, 3  # softmax(z) (max, exp-sum, divide), then p N
    chain = heads * (2 * embedding * r + 2 * r * r + 2 * r * embedding)  # W_V, W_Q, W_K
    scores = heads * 2 * vocab * embedding  # q̃ N^T per head (a single head adds z in the same product)
    gate = 2 * heads * r if heads > 1 else 0  # mixture weights from the queries
    if heads > 1:
        passes += 9 * heads + 2  # per head: z + s, log-softmax, + log pi, log-add-exp; then + logsumexp(z)
    return HeadCost(base, weighting + chain + scores + gate, passes)


def head_backward_flops(config: BackAttnConfig, vocab: int, hidden: int, embedding: int) -> int:
    """Extra matrix-product FLOPs per token of the backward pass through the head (the base gets no gradient).

    Each product of the chain W_V, W_Q, W_K costs two products backward (input and weight gradients); the
    expensive term is the gradient of the scores with respect to q̃, one (V x d_e) product per head. The weighting
    w N needs no gradient (it depends on the frozen base only). A mixture recomputes its scores in backward.
    """
    heads, r = config.num_heads, config.r
    scores_grad = heads * 2 * vocab * embedding
    chain_grads = heads * 2 * (2 * embedding * r + 2 * r * r + 2 * r * embedding)
    if heads > 1:
        chain_grads += 2 * (2 * heads * r)  # the gate
    # A mixture recomputes each chunk's scores and gate (not the small chain before them) during backward.
    recompute = heads * 2 * vocab * embedding + 2 * heads * r if heads > 1 else 0
    return scores_grad + chain_grads + recompute


def base_forward_flops(
    non_embedding_params: int, vocab: int, hidden: int, layers: int, context: int, width: int
) -> int:
    """Forward FLOPs per token of a decoder-only base (Kaplan et al. 2020, eq. 2.2), output product included.

    2 N for the weights outside the input embeddings and the output layer, 2 V d for the output layer, and
    2 n_layer n_ctx d_attn for attention over the context.
    """
    return 2 * non_embedding_params + 2 * vocab * hidden + 2 * layers * context * width


def trainable_parameters(config: BackAttnConfig, embedding: int) -> int:
    """Parameters of one head: g, W_V, W_K, W_Q and, for a mixture, the gate."""
    heads, r = config.num_heads, config.r
    gate = heads * r if heads > 1 else 0
    return embedding + heads * (2 * embedding * r + r * r) + gate
