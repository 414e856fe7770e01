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
    hidden: torch.Tensor,
    output_layer: nn.Module,
    embedding: torch.Tensor,
    head: BackAttnHead,
    context: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of `head` for hidden states (..., d_in), in float64, from the five steps of the design; a contextual
    head also takes its context vectors (..., d_c), e.g. from `reference_context`."""
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
        if context is not None:  # the contextual head's query: + c W_S
            query = query + context.double() @ head.context_to_query[h].double()
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


def reference_context(taps: torch.Tensor, attention_mask: torch.Tensor | None, head: BackAttnHead) -> torch.Tensor:
    """Context vectors of a contextual head, in float64, one position and one attention head at a time.

    taps (B, T, L, d_t): the tapped layers' outputs, read rounded to bf16; attention_mask (B, T): 1 at real tokens
    (None: all). A position attends to the real tokens at or before it (and to itself), within the window, with
    rotary positions counted over real tokens. Returns (B, T, d_c).
    """
    encoder, config = head.context, head.config
    eps = config.rms_norm_eps
    batch, length = taps.shape[:2]
    mask = torch.ones(batch, length) if attention_mask is None else attention_mask.double()

    def rms(x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)

    def rotated(x: torch.Tensor, position: float) -> torch.Tensor:  # one vector (d_h,) at one position
        half = x.shape[-1] // 2
        angle = position * 10_000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
        return torch.cat(
            [x[:half] * angle.cos() - x[half:] * angle.sin(), x[:half] * angle.sin() + x[half:] * angle.cos()]
        )

    # u_t = sum_l rms(x_l,t) P_l, (B, T, d_c)
    taps = taps.to(torch.bfloat16).double()  # the taps are read in bf16
    u = sum(rms(taps[:, :, tap]) @ encoder.tap_proj[tap].double() for tap in range(taps.shape[2]))
    if config.context_attention:
        width, heads = config.context_dim, config.context_heads
        d_h = width // heads
        a = rms(u) * encoder.attention_norm.double()
        w_q, w_k, w_v = encoder.qkv_proj.double().split(width, dim=-1)
        attended = torch.zeros_like(u)
        for b in range(batch):
            positions = (mask[b].cumsum(0) - 1).clamp(min=0)
            for t in range(length):
                out = []
                for h in range(heads):
                    cols = slice(h * d_h, (h + 1) * d_h)
                    q = rotated((a[b, t] @ w_q)[cols], positions[t].item())
                    seen = [
                        j
                        for j in range(t + 1)
                        if (mask[b, j] > 0 or j == t)
                        and (config.context_window is None or t - j < config.context_window)
                    ]
                    keys = torch.stack([rotated((a[b, j] @ w_k)[cols], positions[j].item()) for j in seen])
                    values = torch.stack([(a[b, j] @ w_v)[cols] for j in seen])
                    weights = torch.softmax(keys @ q / d_h**0.5, dim=0)
                    out.append(weights @ values)
                attended[b, t] = torch.cat(out) @ encoder.out_proj.double()
        u = u + attended
    u = (
        u
        + torch.nn.functional.gelu(rms(u) * encoder.mlp_norm.double() @ encoder.mlp_in.double())
        @ encoder.mlp_out.double()
    )
    return rms(u) * encoder.final_norm.double()
