"""The backward-attention head: its math (`BackAttnHead`) and the PEFT layer around the output module.

Notation (docs/design.md has the derivation and the cost of each mode). For one token position:

    h     (d_in)      hidden state entering the output layer
    z     (V)         base logits, z = h W_out^T + b
    E     (V, d_e)    frozen input-embedding matrix; N = RMS-normalised rows of E; Ê = N diag(g)
    K, V  (V, r)      K = Ê W_K, V = Ê W_V           (never materialised)
    dot   (r)         dot = w V, with w = z / |V| ('raw') or softmax(z) ('softmax')
    Q     (r)         Q = act(dot W_Q)
    s     (V)         s = scale * Q K^T               (the head's scores)

The cheap association used everywhere: w V = ((w N) ⊙ g) W_V and Q K^T = (((Q W_K^T) ⊙ g) N^T), so that the only
vocabulary-sized products are with E itself. In 'raw' mode w N = h (W_out^T N) / |V| + b N / |V|, and W_out^T N is
a frozen d_in x d_e matrix: the head then costs one vocabulary product per token, and with no activation it is an
affine map of h that collapses to q̃ = h M + m0 (cached in evaluation) and merges into the output matrix.

Caches (N, C, the collapsed maps) are checked against exact copies of the weights they were built from before each
use, so that no change of those weights goes unseen (docs/design.md, "Caches and when they are rebuilt").
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.integrations import dequantize_module_weight
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import QUERY_ACTIVATIONS, BackAttnConfig

BASE_ADAPTER_NAME = "__base__"  # in `adapter_names`: run that sample through the base output layer alone

_ROWS_PER_VOCAB_CHUNK = 8192  # rows of E processed at once when precomputing frozen tensors
_BUILDS = itertools.count(1)  # numbers each build of frozen tensors; a collapsed map records the one it came from
_BLOCKS = itertools.count(1)  # numbers each `_weights_fixed()` block


class FrozenTensors(NamedTuple):
    """What the head needs from the frozen base; depends only on base weights, so it is cached."""

    normalized: torch.Tensor  # N = diag(1 / rms(E_v)) E, (V, d_e), in E's dtype: one extra copy of E
    hidden_to_values: torch.Tensor | None  # raw mode: W_out^T N / |V|, (d_in, d_e) fp32
    bias_to_values: torch.Tensor | None  # raw mode with an output bias: b N / |V|, (d_e,) fp32
    build: int  # unique to this build


class _CollapsedMap(NamedTuple):
    """A linear head's cached (M, m0), with what it was built from."""

    weights: tuple[torch.Tensor, ...]  # exact copies of the head's weights
    value: tuple[torch.Tensor, torch.Tensor | None]  # (M, m0)
    build: int  # the FrozenTensors.build it was built from
    checked_in: int  # the `_weights_fixed()` block it was last checked in (0: none)


class _Reference:
    """Holds a module without registering it as a child, so that its weights are never saved with the head."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module


class BackAttnHead(nn.Module):
    """One backward-attention head: its trainable weights and its math, step by step.

    Parameters (H = num_heads): norm_scale g (d_e), value_proj W_V (H, d_e, r), key_proj W_K (H, d_e, r),
    query_proj W_Q (H, r, r) and, for H > 1, gate (H, r), which scores each head's query for the mixture weights.
    """

    def __init__(self, config: BackAttnConfig, embedding_dim: int) -> None:
        super().__init__()
        self.config = config
        heads, r = config.num_heads, config.r
        self.norm_scale = nn.Parameter(torch.ones(embedding_dim))
        self.value_proj = nn.Parameter(torch.empty(heads, embedding_dim, r))
        self.key_proj = nn.Parameter(torch.empty(heads, embedding_dim, r))
        self.query_proj = nn.Parameter(torch.empty(heads, r, r))
        self.gate = nn.Parameter(torch.empty(heads, r)) if heads > 1 else None
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

    def query(self, mixed: torch.Tensor) -> torch.Tensor:
        """Steps 2-4 on the value side: dot = (w N ⊙ g) W_V, Q = act(dot W_Q). Returns (n, H, r)."""
        dot = torch.einsum("nd,hdr->nhr", mixed * self.norm_scale, self.value_proj)  # (n, H, r)
        q = torch.einsum("nhr,hrs->nhs", dot, self.query_proj)  # (n, H, r)
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

    def forward(
        self,
        hidden: torch.Tensor,
        base_logits: torch.Tensor | None,
        frozen: FrozenTensors,
        base_output: Callable[[torch.Tensor], torch.Tensor] | None = None,
        weighted: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(n, d_in) hidden states -> (n, V) logits.

        A single residual head needs `base_logits` (n, V) and adds into them in place. Where they are not given,
        the base logits are formed chunk by chunk by `base_output` as needed (softmax weights, residual mixtures).
        `weighted` (n, d_e) is `weighted_embedding`'s result for these rows, when the caller has it already (cached
        features, softmax weighting): it depends on the frozen base alone, so it may be computed once.
        """
        if weighted is None:
            weighted = self.weighted_embedding(hidden, base_logits, frozen, base_output)
        elif self.config.logit_weighting != "softmax":
            raise ValueError("Precomputed weighted embeddings are for logit_weighting='softmax' heads only.")
        q = self.query(weighted.to(self.norm_scale.dtype))  # (n, H, r)
        q_emb = self.query_in_embedding_space(q)  # (n, H, d_e)
        if self.gate is None:
            return self.single_head_logits(q_emb[:, 0], base_logits, frozen)
        return self.mixture_logits(hidden, q_emb, q, base_logits, frozen, base_output)

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


class BackAttnLayer(nn.Module, BaseTunerLayer):
    """Wraps the output layer of a causal LM; holds one `BackAttnHead` per adapter name.

    The frozen input embeddings are referenced, not owned, so that saving writes only head weights.
    """

    adapter_layer_names = ("backattn_heads",)
    other_param_names = ()

    def __init__(
        self, base_layer: nn.Module, input_embeddings: nn.Module, adapter_name: str, config: BackAttnConfig
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.backattn_heads = nn.ModuleDict({})
        self._input_embeddings = _Reference(input_embeddings)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._unmerged_params: tuple[nn.Parameter, nn.Parameter | None] | None = None
        # Caches, each used only while what it was built from is unchanged (see `frozen_tensors`).
        self._frozen_cache: dict[tuple, FrozenTensors] = {}  # (rms_norm_eps, raw) -> N (and C, c)
        self._base_copies: dict[str, torch.Tensor | None] = {}  # exact copies of the base tensors they came from
        self._base_checked_in = 0  # the `_weights_fixed()` block the copies were last checked in (0: none)
        self._collapsed_cache: dict[str, _CollapsedMap] = {}  # adapter name -> a linear head's (M, m0)
        self._block = 0  # the `_weights_fixed()` block being run (0: none)
        self.in_features, self.out_features = output_layer_shape(base_layer)
        self.update_layer(adapter_name, config)
        self.set_adapter(adapter_name, inference_mode=config.inference_mode)

    # -- adapters ---------------------------------------------------------------------------------------------

    @property
    def embedding_weight(self) -> torch.Tensor:
        return self._input_embeddings.module.weight

    def update_layer(self, adapter_name: str, config: BackAttnConfig) -> None:
        """Add a freshly initialised head called `adapter_name`, on the base layer's device."""
        head = BackAttnHead(config, embedding_dim=self.embedding_weight.shape[1])
        self.backattn_heads[adapter_name] = head
        # An offloaded base layer is on meta between forwards: the head goes where its hook runs it instead.
        self._move_adapter_to_device_of_base_layer(adapter_name, device=offload_device(self.get_base_layer()))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._collapsed_cache.pop(adapter_name, None)

    def enable_adapters(self, enabled: bool) -> None:
        if not enabled and self.merged:
            self.unmerge()
        super().enable_adapters(enabled)

    def train(self, mode: bool = True) -> BackAttnLayer:
        if mode:
            self._collapsed_cache.clear()  # training never uses the collapsed maps; free them
        return super().train(mode)

    # -- frozen tensors and caches ----------------------------------------------------------------------------

    def clear_caches(self) -> None:
        """Free the cached tensors (N, C, the copies they are checked against, the collapsed maps).

        Never needed for correct results: every cache is checked against the weights before it is used. It frees
        their memory (about two vocabulary-sized matrices) until the next forward rebuilds them.
        """
        self._frozen_cache.clear()
        self._base_copies.clear()
        self._collapsed_cache.clear()

    @contextmanager
    def _weights_fixed(self) -> Iterator[None]:
        """Within this block the caches are checked against the weights at their first use only.

        For generate(), which does not change the weights between the steps of one call (its KV cache relies on
        that too): one check per call instead of one per token. A weight written inside the block is not seen
        before the block ends. `BackAttnModel.generate` opens it.
        """
        outer, self._block = self._block, next(_BLOCKS)
        try:
            yield
        finally:
            self._block = outer

    def _checked_in_this_block(self, checked_in: int) -> bool:
        return self._block != 0 and checked_in == self._block

    def frozen_tensors(self, config: BackAttnConfig) -> FrozenTensors:
        """N, the row-normalised E (and, in raw mode, W_out^T N / |V|), rebuilt whenever a base weight changes.

        Whether a weight changed is decided by its contents: fused optimisers, `.data` writes and dtype round trips
        change a tensor without bumping its `_version` (or keep its address). So the layer keeps an exact copy of
        each base tensor these were built from, and compares it bit for bit before use: at every forward, or once
        per `_weights_fixed()` block.
        """
        raw = config.logit_weighting == "raw"
        key = (config.rms_norm_eps, raw)
        cached = self._frozen_cache.get(key)
        if cached is not None and self._checked_in_this_block(self._base_checked_in):
            return cached
        # W_out and b matter to raw heads only; they are read when a raw head needs them or has used them.
        with_output = raw or "output weight" in self._base_copies
        base = self.get_base_layer()
        with (
            _readable(self._input_embeddings.module, "input embeddings"),
            _readable(base, "output layer's weights") if with_output else nullcontext(),
        ):
            live = {"embedding": self.embedding_weight}
            if with_output:
                live.update({"output weight": base.weight, "output bias": getattr(base, "bias", None)})
            if not self._base_unchanged(live):
                self._frozen_cache.clear()
                self._base_copies.clear()
            self._base_checked_in = self._block
            cached = self._frozen_cache.get(key)
            if cached is None:
                cached = self._frozen_cache[key] = self._build_frozen_tensors(config, live)
                self._copy_base(live)
        return cached

    def _base_unchanged(self, live: dict[str, torch.Tensor | None]) -> bool:
        """Whether every base tensor with a copy still holds exactly that copy (a tied matrix is compared once)."""
        compared: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        for name, copy in self._base_copies.items():
            tensor = live[name]
            if any(copy is seen_copy and _same_view(tensor, seen) for seen, seen_copy in compared):
                continue
            if not _same_contents(tensor, copy):
                return False
            compared.append((tensor, copy))
        return True

    def _copy_base(self, live: dict[str, torch.Tensor | None]) -> None:
        """Keep an exact copy of each base tensor in `live` that has none yet; tied tensors share one copy."""
        with _building(*live.values()):
            for name, tensor in live.items():
                if name in self._base_copies:
                    continue
                twin = next((other for other in self._base_copies if _same_view(live[other], tensor)), None)
                self._base_copies[name] = self._base_copies[twin] if twin is not None else _copy(tensor)

    def _build_frozen_tensors(self, config: BackAttnConfig, live: dict[str, torch.Tensor | None]) -> FrozenTensors:
        emb = live["embedding"]
        with _building(*live.values()):
            # N = diag(1 / rms(E_v)) E, row chunk by row chunk in fp32, stored in E's dtype.
            normalized = torch.cat(
                [
                    (
                        rows.float()
                        * torch.rsqrt(rows.float().pow(2).mean(dim=-1, keepdim=True) + config.rms_norm_eps)
                    ).to(emb.dtype)
                    for rows in emb.split(_ROWS_PER_VOCAB_CHUNK)
                ]
            )
            hidden_to_values = bias_to_values = None
            if config.logit_weighting == "raw":
                hidden_to_values, bias_to_values = self._hidden_to_values(normalized)
        return FrozenTensors(normalized, hidden_to_values, bias_to_values, next(_BUILDS))

    def _hidden_to_values(self, normalized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W_out^T N / |V| (d_in, d_e) and b N / |V|, summed over vocabulary chunks in fp32."""
        base = self.get_base_layer()
        out_weight = dequantize_module_weight(base)  # (V, d_in); a plain tensor unless the layer is quantised
        vocab = normalized.shape[0]
        total = torch.zeros(out_weight.shape[1], normalized.shape[1], dtype=torch.float32, device=normalized.device)
        for start in range(0, vocab, _ROWS_PER_VOCAB_CHUNK):
            stop = start + _ROWS_PER_VOCAB_CHUNK
            total += out_weight[start:stop].float().T @ normalized[start:stop].float()
        bias = getattr(base, "bias", None)
        bias_term = None if bias is None else (bias.float() @ normalized.float()) / vocab
        return total / vocab, bias_term

    def _collapsed(self, adapter_name: str, frozen: FrozenTensors) -> tuple:
        """The collapsed map of a linear head, rebuilt whenever its weights or the frozen tensors change.

        Checked like the frozen tensors, against an exact copy of the head's weights (small next to E).
        """
        cached = self._collapsed_cache.get(adapter_name)
        current = cached is not None and cached.build == frozen.build
        if current and self._checked_in_this_block(cached.checked_in):
            return cached.value
        head = self.backattn_heads[adapter_name]
        with _readable(head, f"weights of head {adapter_name!r}"):
            weights = tuple(head.parameters())
            if not (current and all(map(_same_contents, weights, cached.weights))):
                with _building(*weights):
                    copies = tuple(_copy(weight) for weight in weights)
                    cached = _CollapsedMap(copies, head.collapsed_map(frozen), frozen.build, 0)
        self._collapsed_cache[adapter_name] = cached._replace(checked_in=self._block)
        return cached.value

    # -- forward ----------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names)
        if self.merged or not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        if len(self.active_adapters) != 1:
            raise ValueError(
                f"A backattn layer runs one head at a time, but {self.active_adapters} are active; "
                "call set_adapter('<name>'), or pass adapter_names=[...] to run one head per sample."
            )
        return self.head_forward(self.active_adapters[0], x)

    def head_forward(self, adapter_name: str, x: torch.Tensor, weighted: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of head `adapter_name` for hidden states x (..., d_in), with bounded extra memory.

        A single residual head adds its scores into the base logits of every position, which are the output
        buffer. Vocabulary-sized intermediates (softmax weights, a mixture's per-head scores and base logits) are
        formed `chunk_size` positions at a time. The logits come back in the hidden states' dtype. `weighted`
        (n, d_e), for a softmax head: the base's w N of these rows, precomputed (see `BackAttnHead.forward`).
        """
        head = self.backattn_heads[adapter_name]
        config = head.config
        frozen = self.frozen_tensors(config)
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in head.parameters())
        rows = x.reshape(-1, x.shape[-1])  # (n, d_in), n = batch * positions
        # A single residual head adds into the base logits (the output buffer). A softmax-weighted residual
        # mixture reads them twice (weights, then the mixture), so it keeps them rather than computing them twice.
        residual = config.combine == "residual"
        keep_base_logits = residual and (head.gate is None or config.logit_weighting == "softmax")
        base_logits = self.base_layer(rows) if keep_base_logits else None  # (n, V)
        if config.is_linear and not needs_grad and weighted is None:
            logits = head.collapsed_forward(rows, base_logits, self._collapsed(adapter_name, frozen), frozen)
        else:
            # The base layer goes in as a function: accelerate's offload hook on the head moves module arguments.
            logits = head(rows, base_logits, frozen, base_output=self.base_layer.__call__, weighted=weighted)
        return logits.to(x.dtype).reshape(*x.shape[:-1], logits.shape[-1])

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """Run head adapter_names[i] on sample i ('__base__': the base layer); equal to running each alone.

        Several single softmax heads of one kind in the batch share their vocabulary-sized work (`_shared_forward`),
        so that a batch of many different heads costs about what a batch of one head costs.
        """
        batch = x.shape[0]
        names = expand_adapter_names(adapter_names, batch)
        groups: dict[object, list[str]] = {}
        for name in dict.fromkeys(names):  # unique, in order of appearance
            groups.setdefault(self._sharing_key(name) or name, []).append(name)
        out = None
        for members in groups.values():
            index = torch.tensor([i for i, n in enumerate(names) if n in members], device=x.device)
            sub = x.index_select(0, index)
            if members == [BASE_ADAPTER_NAME]:
                result = self.base_layer(sub)
            elif len(members) == 1:
                result = self.head_forward(members[0], sub)
            else:
                result = self._shared_forward(members, [names[i] for i in index.tolist()], sub)
            if out is None:
                out = result.new_empty((batch, *result.shape[1:]))
            out.index_copy_(0, index, result.to(out.dtype))
        return out

    def _sharing_key(self, name: str) -> tuple | None:
        """Heads with equal keys can share their vocabulary-sized work in a mixed batch; None: this one cannot.

        That is a single head with softmax weighting (the default) whose weights need no gradient and are not
        offloaded: its weights w N and its product q̃ N^T depend on the frozen base alone, given rms_norm_eps.
        """
        if name == BASE_ADAPTER_NAME:
            return None
        head = self.backattn_heads[name]
        config = head.config
        if config.num_heads != 1 or config.logit_weighting != "softmax" or getattr(head, "_hf_hook", None):
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in head.parameters()):
            return None
        return ("shared softmax", config.combine, config.rms_norm_eps, config.chunk_size, head.norm_scale.dtype)

    def _shared_forward(self, members: list[str], row_names: list[str], x: torch.Tensor) -> torch.Tensor:
        """Logits of several single softmax heads, row i of x by head row_names[i], with one pass over the
        vocabulary for all rows: the base logits z, the weights w N and q̃ N^T are computed once for the whole
        group, and only the small per-head steps (g, W_V, W_Q, W_K: `query`, `query_in_embedding_space`) head by
        head. The same operations as `head_forward` on each row's head, batched."""
        first = self.backattn_heads[members[0]]
        frozen = self.frozen_tensors(first.config)
        rows = x.reshape(-1, x.shape[-1])  # (n, d_in), n = samples * positions
        per_sample = rows.shape[0] // max(x.shape[0], 1)
        row_heads = [name for name in row_names for _ in range(per_sample)]
        base_logits = self.base_layer(rows)  # (n, V)
        mixed = first.weighted_embedding(rows, base_logits, frozen)  # (n, d_e): the base's alone
        q_emb = None
        for name in members:
            index = torch.tensor([i for i, n in enumerate(row_heads) if n == name], device=rows.device)
            head = self.backattn_heads[name]
            part = head.query_in_embedding_space(head.query(mixed.index_select(0, index)))[:, 0]  # (rows, d_e)
            if q_emb is None:
                q_emb = part.new_empty((rows.shape[0], part.shape[-1]))
            q_emb.index_copy_(0, index, part)
        residual = first.config.combine == "residual"
        logits = first.single_head_logits(q_emb, base_logits if residual else None, frozen)
        return logits.to(x.dtype).reshape(*x.shape[:-1], logits.shape[-1])

    # -- merging ----------------------------------------------------------------------------------------------

    def merged_output_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (V, d_in) weight and bias of one linear layer whose logits equal head `adapter_name`'s."""
        head = self.backattn_heads[adapter_name]
        check_mergeable(adapter_name, head.config)
        frozen = self.frozen_tensors(head.config)
        base = self.get_base_layer()
        with (
            _readable(head, f"weights of head {adapter_name!r}"),
            _readable(base, "output layer's weights"),
            _building(frozen.normalized),
        ):
            hidden_to_key, bias_to_key = head.collapsed_map(frozen)
            # scores = h M N^T + m0 N^T, so the weight is N M^T and the bias N m0, built in vocabulary chunks.
            rows = frozen.normalized.split(_ROWS_PER_VOCAB_CHUNK)
            weight = torch.cat([chunk.float() @ hidden_to_key.T for chunk in rows])
            bias = None if bias_to_key is None else torch.cat([chunk.float() @ bias_to_key for chunk in rows])
            if head.config.combine == "residual":
                weight = weight + dequantize_module_weight(base).float()
                if base.bias is not None:
                    bias = base.bias.float() + (bias if bias is not None else 0)
        return weight, bias

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active head into a new, untied output matrix; `unmerge` restores the original one."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if len(adapter_names) > 1:
            raise ValueError(f"Only one backattn head can be merged at a time, got {adapter_names}.")
        if self.merged:
            warnings.warn(f"Already merged with {self.merged_adapters}; unmerging first.", stacklevel=2)
            self.unmerge()
        base = self.get_base_layer()
        weight, bias = self.merged_output_weights(adapter_names[0])
        if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(f"NaNs or infs in the merged weights of head {adapter_names[0]!r}; nothing was merged.")
        dtype = base.weight.dtype if base.weight.dtype.is_floating_point else self.embedding_weight.dtype
        self._unmerged_params = (base.weight, base.bias)
        base.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if bias is not None:
            base.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        self.merged_adapters.append(adapter_names[0])

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        base.weight, base.bias = self._unmerged_params
        self._unmerged_params = None
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "backattn." + super().__repr__()


def check_mergeable(adapter_name: str, config: BackAttnConfig) -> None:
    """Raise a clear error unless the head is an affine map of the hidden state."""
    if config.is_linear:
        return
    reasons = []
    if config.logit_weighting != "raw":
        reasons.append(f"logit_weighting={config.logit_weighting!r}")
    if config.query_activation is not None:
        reasons.append(f"query_activation={config.query_activation!r}")
    if config.num_heads != 1:
        reasons.append(f"num_heads={config.num_heads}")
    raise ValueError(
        f"Head {adapter_name!r} cannot be merged: it is not linear ({', '.join(reasons)}). Merging needs "
        "logit_weighting='raw', query_activation=None and num_heads=1; keep the head unmerged, or unload() it."
    )


def check_adapter_names(adapter_names: object) -> None:
    """Raise a one-line TypeError unless `adapter_names` is a list (or tuple) of head names."""
    if not isinstance(adapter_names, (list, tuple)):
        got = f"the string {adapter_names!r}" if isinstance(adapter_names, str) else type(adapter_names).__name__
        raise TypeError(f"adapter_names must be a list with one head name per sample, got {got}.")
    for index, name in enumerate(adapter_names):
        if not isinstance(name, str):
            raise TypeError(
                f"adapter_names[{index}] is {name!r} ({type(name).__name__}); adapter_names holds head names "
                f"(str), one per sample, {BASE_ADAPTER_NAME!r} for the base model alone."
            )


def expand_adapter_names(adapter_names: list[str], batch: int, repeat: int = 1) -> list[str]:
    """One name per sample of the batch. generate() repeats each sample `repeat` times in place (beams, returned
    sequences), and only it passes `repeat` > 1; any other length mismatch is refused, as PEFT's LoRA does."""
    check_adapter_names(adapter_names)
    count = len(adapter_names)
    if count * repeat != batch:
        if repeat == 1:
            raise ValueError(
                f"adapter_names has {count} entries but the batch has {batch} samples; pass one name per sample."
            )
        raise ValueError(
            f"adapter_names has {count} entries, repeated {repeat} times by generate(), but the batch has {batch} "
            "samples; pass one name per input sequence."
        )
    return [name for name in adapter_names for _ in range(repeat)]


def output_layer_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of the wrapped output layer."""
    in_features = getattr(module, "in_features", None)
    out_features = getattr(module, "out_features", None)
    if in_features is None or out_features is None:
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            raise ValueError(
                f"backattn wraps a linear output layer (weight of shape (vocab, hidden)); got {type(module).__name__}."
            )
        out_features, in_features = weight.shape
    return int(in_features), int(out_features)


_SAME_SIZE_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().clone().as_subclass(torch.Tensor)


def _same_contents(live: torch.Tensor | None, copy: torch.Tensor | None) -> bool:
    """Whether `live` holds exactly what `copy` was taken from: the same shape, dtype, device and bits."""
    if live is None or copy is None:
        return live is copy
    if (live.shape, live.dtype, live.device) != (copy.shape, copy.dtype, copy.device):
        return False
    live = live.detach().as_subclass(torch.Tensor)
    if live.is_floating_point():  # compare bits, not values: a NaN equals itself
        bits = _SAME_SIZE_INTEGER[live.element_size()]
        live, copy = live.view(bits), copy.view(bits)
    return torch.equal(live, copy)


def _same_view(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two tensors are the same memory seen the same way (tied weights), so hold the same values."""
    if a is None or b is None:
        return a is b
    return a is b or (a.numel() > 0 and _view_of(a) == _view_of(b))


def _view_of(tensor: torch.Tensor) -> tuple:
    return (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device)


@contextmanager
def _building(*tensors: torch.Tensor | None) -> Iterator[None]:
    """Build cached tensors as plain, full-precision tensors outside any graph, whatever the caller's context.

    Built under the caller's inference mode they would be inference tensors, which a later training step cannot
    save for backward; under its autocast, a bf16 map that a later fp32 forward cannot multiply.
    """
    device_types = {"cpu"} | {tensor.device.type for tensor in tensors if tensor is not None}
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.no_grad())
        for device_type in sorted(device_types):
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def offload_device(module: nn.Module) -> torch.device | None:
    """The device an accelerate offload hook loads `module`'s weights to, where they are offloaded; else None."""
    if not _own_tensors_on_meta(module):
        return None
    hook = getattr(module, "_hf_hook", None)
    for part in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        if getattr(part, "offload", False) and part.execution_device is not None:
            return torch.device(part.execution_device)
    return None


def _own_tensors_on_meta(module: nn.Module) -> bool:
    tensors = itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False))
    return any(tensor.is_meta for tensor in tensors)


@contextmanager
def _readable(module: nn.Module, what: str) -> Iterator[None]:
    """Inside, `module`'s own weights hold their values, also where accelerate offloads them.

    accelerate's offload (`cpu_offload`, a `device_map` with "cpu" or "disk" entries) keeps a module's weights on
    the meta device between its forwards, and its pre-forward hook loads them. The head reads the input embeddings
    (and the output layer's and its own weights) outside those forwards, so it runs the same hooks around its reads.
    """
    if not _own_tensors_on_meta(module):
        yield
        return
    hook = getattr(module, "_hf_hook", None)
    if hook is not None:
        hook.pre_forward(module)
    try:
        if _own_tensors_on_meta(module):
            raise RuntimeError(
                f"The {what} are on the meta device and no accelerate hook loads them; load the model's weights "
                "before running the backattn head."
            )
        yield
    finally:
        if hook is not None:
            hook.post_forward(module, None)
