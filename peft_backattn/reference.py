"""The head computed literally as the design states it: Ê, K and V materialised, one step per line.

This is the specification the fast paths in `head.py` and `layer.py` are tested against. It is slow (three
vocabulary-sized matrices per head) and meant for tests, docs and small inputs only.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import QUERY_ACTIVATIONS
from .head import BackAttnHead


def reference_logits(
    hidden: torch.Tensor, output_layer: nn.Module, embedding: torch.Tensor, head: BackAttnHead
) -> torch.Tensor:
    """Logits of `head` for hidden states (..., d_in), in float64, from the five steps of the design."""
    config = head.config
    z = output_layer(hidden).double()  # (..., V) base logits
    vocab = z.shape[-1]
    e = embedding.double()
    g = head.norm_scale.double()

    # 1. Ê = RMSNorm(E), row-wise, with the trainable scale g.
    e_hat = e / torch.sqrt(e.pow(2).mean(dim=-1, keepdim=True) + config.rms_norm_eps) * g  # (V, d_e)

    # Weights on the values: the raw logits (divided by |V| below) or the base probabilities.
    weights = z / vocab if config.logit_weighting == "raw" else torch.softmax(z, dim=-1)  # (..., V)

    per_head_scores, per_head_queries = [], []
    for h in range(config.num_heads):
        # 2. K = Ê W_K, V = Ê W_V.
        keys = e_hat @ head.key_proj[h].double()  # (V, r)
        values = e_hat @ head.value_proj[h].double()  # (V, r)
        # 3. dot = sum_v w_v V_v.
        dot = weights @ values  # (..., r)
        # 4. Q = act(dot W_Q).
        query = dot @ head.query_proj[h].double()  # (..., r)
        if config.query_activation is not None:
            query = QUERY_ACTIVATIONS[config.query_activation](query)
        # 5. scores = Q K^T (scaled).
        per_head_scores.append(config.attention_scale * query @ keys.T)  # (..., V)
        per_head_queries.append(query)

    residual = config.combine == "residual"
    if config.num_heads == 1:
        return z + per_head_scores[0] if residual else per_head_scores[0]

    # Mixture of softmaxes, in probability space: p = sum_h pi_h softmax(scores_h (+ z)).
    gate_logits = torch.stack([q @ head.gate[h].double() for h, q in enumerate(per_head_queries)], dim=-1)  # (..., H)
    pi = torch.softmax(gate_logits, dim=-1)
    probs = sum(
        pi[..., h : h + 1] * torch.softmax(s + z if residual else s, dim=-1) for h, s in enumerate(per_head_scores)
    )
    log_probs = torch.log(probs)
    return log_probs + torch.logsumexp(z, dim=-1, keepdim=True) if residual else log_probs
