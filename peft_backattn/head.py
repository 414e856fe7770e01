"""The backward-attention head's math: `BackAttnHead`, its weights and its five steps, read top to bottom.

Notation (docs/design.md has the derivation and the cost of each mode). For one token position:

    h     (d_in)      hidden state entering the output layer
    z     (V)         base logits, z = h W_out^T + b
    E     (V, d_e)    frozen input-embedding matrix; N = RMS-normalised rows of E; Ê = N diag(g)
    K, V  (V, r)      K = Ê W_K, V = Ê W_V           (never materialised)
    dot   (r)         dot = w V, with w = z / |V| ('raw') or softmax(z) ('softmax')
    Q     (r)         Q = act(dot W_Q)
    s     (V)         s = scale * Q K^T               (the head's scores)

A contextual head (`config.context`) adds to the query what its context path (context.py) read from the base's
layers at this and the earlier positions: Q = act(dot W_Q + c W_S), with c (d_c) the context vector and W_S
(H, d_c, r) starting at zero, so that an untrained contextual head returns what the seed's head returns.

The cheap association used everywhere: w V = ((w N) ⊙ g) W_V and Q K^T = (((Q W_K^T) ⊙ g) N^T), so that the only
vocabulary-sized products are with E itself. In 'raw' mode w N = h (W_out^T N) / |V| + b N / |V|, and W_out^T N is
a frozen d_in x d_e matrix: the head then costs one vocabulary product per token, and with no activation it is an
affine map of h that collapses to q̃ = h M + m0 (cached in evaluation) and merges into the output matrix.

The head reads the frozen base through `FrozenTensors` alone, which the caller builds and caches (caches.py); it
knows nothing of PEFT, caches or accelerate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import QUERY_ACTIVATIONS, BackAttnConfig
from .context import ContextEncoder


class FrozenTensors(NamedTuple):
    """What the head needs from the frozen base; depends only on base weights, so it is cached."""

    normalized: torch.Tensor  # N = diag(1 / rms(E_v)) E, (V, d_e), in E's dtype: one extra copy of E
    hidden_to_values: torch.Tensor | None  # raw mode: W_out^T N / |V|, (d_in, d_e) fp32
    bias_to_values: torch.Tensor | None  # raw mode with an output bias: b N / |V|, (d_e,) fp32
    build: int  # unique to this build


class BackAttnHead(nn.Module):
    """One backward-attention head: its trainable weights and its math, step by step.

    Parameters (H = num_heads): norm_scale g (d_e), value_proj W_V (H, d_e, r), key_proj W_K (H, d_e, r),
    query_proj W_Q (H, r, r) and, for H > 1, gate (H, r), which scores each head's query for the mixture weights.
    A contextual head also has `context` (its `ContextEncoder`) and context_to_query W_S (H, d_c, r).
    """

    def __init__(self, config: BackAttnConfig, embedding_dim: int) -> None:
        super().__init__()
        self.config = config
        heads, r = config.num_heads, config.r
        self.norm_scale = nn.Parameter(torch.ones(embedding_dim))  # g (d_e)
        self.value_proj = nn.Parameter(torch.empty(heads, embedding_dim, r))  # W_V (H, d_e, r)
        self.key_proj = nn.Parameter(torch.empty(heads, embedding_dim, r))  # W_K (H, d_e, r)
        self.query_proj = nn.Parameter(torch.empty(heads, r, r))  # W_Q (H, r, r)
        self.gate = nn.Parameter(torch.empty(heads, r)) if heads > 1 else None  # (H, r)
        self.context = self.context_to_query = None
        if config.context:
            if config.context_layers is None or config.base_context_width is None:
                raise ValueError("A contextual head is built once context_layers and base_context_width are known.")
            self.context = ContextEncoder(config, config.base_context_width, len(config.context_layers))
            self.context_to_query = nn.Parameter(torch.empty(heads, config.context_dim, r))  # W_S (H, d_c, r)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small random W_K, W_V (and gate); W_Q zero where the residual combine allows an identity start."""
        std = self.config.init_std
        nn.init.normal_(self.value_proj, std=std)
        nn.init.normal_(self.key_proj, std=std)
        if self.gate is not None:
            nn.init.normal_(self.gate, std=std)
        if self.config.init_weights and self.config.combine == "residual":
            nn.init.zeros_(self.query_proj)
        else:
            nn.init.normal_(self.query_proj, std=std)
        if self.context_to_query is not None:
            nn.init.zeros_(self.context_to_query)  # the context changes nothing until it is trained

    # -- the forward pass: the five steps below, in order ----------------------------------------------------

    def forward(
        self,
        hidden: torch.Tensor,
        base_logits: torch.Tensor | None,
        frozen: FrozenTensors,
        base_output: Callable[[torch.Tensor], torch.Tensor] | None = None,
        weighted: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(n, d_in) hidden states -> (n, V) logits.

        A single residual head needs `base_logits` (n, V) and adds into them in place. Where they are not given,
        the base logits are formed chunk by chunk by `base_output` as needed (softmax weights, residual mixtures).
        `weighted` (n, d_e) is `weighted_embedding`'s result for these rows, when the caller has it already (cached
        features, softmax weighting): it depends on the frozen base alone, so it may be computed once. `context`
        (n, d_c): a contextual head's context vectors of these rows (`ContextEncoder`), which it requires.
        """
        if weighted is None:
            weighted = self.weighted_embedding(hidden, base_logits, frozen, base_output)  # (n, d_e)
        elif self.config.logit_weighting != "softmax":
            raise ValueError("Precomputed weighted embeddings are for logit_weighting='softmax' heads only.")
        q = self.query(weighted.to(self.norm_scale.dtype), context)  # (n, H, r)
        q_emb = self.query_in_embedding_space(q)  # (n, H, d_e)
        if self.gate is None:
            return self.single_head_logits(q_emb[:, 0], base_logits, frozen)
        return self.mixture_logits(hidden, q_emb, q, base_logits, frozen, base_output)

    # -- the five steps, in the cheap association -------------------------------------------------------------

    def weighted_embedding(
        self,
        hidden: torch.Tensor,
        base_logits: torch.Tensor | None,
        frozen: FrozenTensors,
        base_output: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """w N for each row: the logit-weighted sum of normalised embeddings, (n, d_e), before g and W_V.

        It depends on the frozen base only, so it needs no gradient. In softmax mode the probabilities are
        vocabulary-sized, so they are formed `chunk_size` rows at a time (from `base_logits`, or from
        `base_output`, the base output layer as a function of hidden rows, when the caller keeps no base logits).
        """
        dtype = self.norm_scale.dtype
        if self.config.logit_weighting == "raw":
            # z N / |V| = h (W_out^T N) / |V| + b N / |V|: no vocabulary-sized product at all.
            mixed = hidden.to(dtype) @ frozen.hidden_to_values.to(dtype)  # (n, d_e)
            if frozen.bias_to_values is not None:
                mixed = mixed + frozen.bias_to_values.to(dtype)
            return mixed
        normalized = frozen.normalized
        parts = []
        with torch.no_grad():
            # At least one chunk, empty when there are no rows, so that (0, d_in) gives (0, d_e).
            for start in range(0, max(hidden.shape[0], 1), self.config.chunk_size):
                stop = start + self.config.chunk_size
                z = base_logits[start:stop] if base_logits is not None else base_output(hidden[start:stop])
                probs = torch.softmax(z.float(), dim=-1)  # (chunk, V)
                parts.append(probs.to(normalized.dtype) @ normalized)  # (chunk, d_e)
        return torch.cat(parts).to(dtype)

    def query(self, mixed: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Steps 2-4 on the value side: dot = (w N ⊙ g) W_V, Q = act(dot W_Q [+ c W_S]). Returns (n, H, r)."""
        dot = torch.einsum("nd,hdr->nhr", mixed * self.norm_scale, self.value_proj)  # (n, H, r)
        q = torch.einsum("nhr,hrs->nhs", dot, self.query_proj)  # (n, H, r)
        if (context is None) != (self.context is None):
            raise ValueError(
                "A contextual head needs its context vectors (and only it takes them); run it through the model, "
                "whose forward records the layers it reads."
            )
        if context is not None:
            q = q + torch.einsum("nc,hcr->nhr", context.to(q.dtype), self.context_to_query)  # + c W_S
        if self.config.query_activation is not None:
            q = QUERY_ACTIVATIONS[self.config.query_activation](q)
        return q

    def query_in_embedding_space(self, q: torch.Tensor) -> torch.Tensor:
        """Step 5, key side: q̃ = scale * (Q W_K^T) ⊙ g, so that scores = q̃ N^T. Returns (n, H, d_e)."""
        return torch.einsum("nhr,hdr->nhd", q, self.key_proj) * (self.norm_scale * self.config.attention_scale)

    @staticmethod
    def scores(q_emb: torch.Tensor, frozen: FrozenTensors) -> torch.Tensor:
        """The vocabulary-sized product s = q̃ N^T: (..., d_e) -> (..., V), in the embeddings' dtype."""
        normalized = frozen.normalized
        # One (rows x d_e) @ (d_e x V) product: a (n, H, d_e) @ (d_e, V) matmul would run as n tiny batched ones.
        flat = q_emb.reshape(-1, q_emb.shape[-1]).to(normalized.dtype)
        return (flat @ normalized.T).reshape(*q_emb.shape[:-1], normalized.shape[0])

    def single_head_logits(
        self, q_emb: torch.Tensor, base_logits: torch.Tensor | None, frozen: FrozenTensors
    ) -> torch.Tensor:
        """Logits of a one-head layer from q̃ (n, d_e): s = q̃ N^T, or z + s written into `base_logits` in place.

        Adding in place is safe: nothing keeps the base logits for backward, and it saves a logits-sized tensor.
        """
        if self.config.combine == "replace":
            return self.scores(q_emb, frozen)
        normalized = frozen.normalized
        if base_logits.dtype != normalized.dtype:
            return base_logits.add_(self.scores(q_emb, frozen).to(base_logits.dtype))
        return base_logits.addmm_(q_emb.to(normalized.dtype), normalized.T)  # z += q̃ N^T, one fused product

    def mixture_logits(
        self,
        hidden: torch.Tensor,
        q_emb: torch.Tensor,
        q: torch.Tensor,
        base_logits: torch.Tensor | None,
        frozen: FrozenTensors,
        base_output: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> torch.Tensor:
        """Log of the mixture of softmaxes sum_h pi_h softmax(.), chunk by chunk; fp32.

        A chunk holds chunk_size / H positions, so that its H vocabulary-sized score vectors per position stay
        within the same bound as one head's; residual mixtures take the chunk's base logits from `base_logits`, or
        compute them on the spot. In
        training each chunk is recomputed during backward instead of kept, and the chunks are concatenated; in
        evaluation they are written into one output buffer.
        """
        total = q.shape[0]
        recompute = torch.is_grad_enabled() and q.requires_grad
        rows_per_chunk = max(1, self.config.chunk_size // self.config.num_heads)
        pieces, out = [], None
        for start in range(0, max(total, 1), rows_per_chunk):  # one empty chunk when there are no rows
            rows = slice(start, start + rows_per_chunk)
            z = None
            if self.config.combine == "residual":
                z = base_logits[rows] if base_logits is not None else base_output(hidden[rows])
            args = (q_emb[rows], q[rows], z, frozen)
            if recompute:
                pieces.append(checkpoint(self._mixture_chunk, *args, use_reentrant=False))
                continue
            piece = self._mixture_chunk(*args)
            if rows_per_chunk >= total:
                return piece
            if out is None:
                out = piece.new_empty((total, piece.shape[-1]))
            out[rows] = piece
        return torch.cat(pieces) if recompute else out

    def _mixture_chunk(
        self, q_emb: torch.Tensor, q: torch.Tensor, base_logits: torch.Tensor | None, frozen: FrozenTensors
    ) -> torch.Tensor:
        """One chunk of the mixture, one head at a time: log p = logaddexp_h(log pi_h + log_softmax(s_h (+ z)))."""
        log_pi = torch.log_softmax(torch.einsum("nhr,hr->nh", q, self.gate), dim=-1)  # (chunk, H)
        z = None if base_logits is None else base_logits.float()
        log_p = None
        for h in range(self.config.num_heads):
            s = self.scores(q_emb[:, h], frozen).float()  # (chunk, V)
            if z is not None:
                s = s + z
            term = torch.log_softmax(s, dim=-1) + log_pi[:, h, None]
            log_p = term if log_p is None else torch.logaddexp(log_p, term)
        if z is None:
            return log_p
        # + logsumexp(z): the same distribution, but logits equal z exactly when all scores are zero.
        return log_p + torch.logsumexp(z, dim=-1, keepdim=True)

    # -- the collapsed form of a linear head ------------------------------------------------------------------

    def collapsed_map(self, frozen: FrozenTensors) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For a linear head (raw, no activation, one head): M (d_in, d_e) and m0 (d_e,) with q̃ = h M + m0."""
        if not self.config.is_linear:
            raise ValueError("collapsed_map needs logit_weighting='raw', query_activation=None and num_heads=1.")
        # value_to_key = diag(g) W_V W_Q W_K^T diag(g) * scale, (d_e, d_e): the whole chain from w N to q̃.
        g = self.norm_scale.float()
        chain = self.value_proj[0].float() @ self.query_proj[0].float() @ self.key_proj[0].float().T
        value_to_key = g[:, None] * chain * (g * self.config.attention_scale)
        hidden_to_key = frozen.hidden_to_values @ value_to_key  # (d_in, d_e)
        bias_to_key = None if frozen.bias_to_values is None else frozen.bias_to_values @ value_to_key
        return hidden_to_key, bias_to_key

    def collapsed_forward(
        self,
        hidden: torch.Tensor,
        base_logits: torch.Tensor | None,
        collapsed: tuple[torch.Tensor, torch.Tensor | None],
        frozen: FrozenTensors,
    ) -> torch.Tensor:
        """The same logits as `forward` for a linear head, from the cached collapsed map q̃ = h M + m0."""
        hidden_to_key, bias_to_key = collapsed
        q_emb = hidden.float() @ hidden_to_key  # (n, d_e)
        if bias_to_key is not None:
            q_emb = q_emb + bias_to_key
        return self.single_head_logits(q_emb, base_logits, frozen)
