"""The PEFT layer around the output module: `BackAttnLayer` holds one `BackAttnHead` (head.py) per adapter name,
runs the active one or one per sample of a mixed batch, and merges a linear head into the output matrix.

What it reads from the frozen base is cached, and checked before each use, by the `CheckedCaches` it inherits
(caches.py).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.integrations import dequantize_module_weight
from torch import nn

from .caches import ROWS_PER_VOCAB_CHUNK, CheckedCaches, building, offload_device, readable
from .config import BackAttnConfig
from .head import BackAttnHead

BASE_ADAPTER_NAME = "__base__"  # in `adapter_names`: run that sample through the base output layer alone


class _Reference:
    """Holds a module without registering it as a child, so that its weights are never saved with the head."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module


class BackAttnLayer(CheckedCaches, nn.Module, BaseTunerLayer):
    """Wraps the output layer of a causal LM; holds one `BackAttnHead` per adapter name.

    The frozen input embeddings are referenced, not owned, so that saving writes only head weights. The caches
    (`frozen_tensors`, `clear_caches`, `_weights_fixed`) come from `CheckedCaches`.
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

    def weighted_embedding(self, adapter_name: str, hidden: torch.Tensor) -> torch.Tensor:
        """The base's w N for hidden rows (n, d_in), as head `adapter_name` weighs it: (n, d_e), in the head's dtype.

        It depends on the frozen base (and the head's `logit_weighting` and `rms_norm_eps`) alone, so a caller may
        compute it once and pass it to `head_forward(..., weighted=...)` (softmax heads), as cached features do.
        """
        head = self.backattn_heads[adapter_name]
        return head.weighted_embedding(hidden, None, self.frozen_tensors(head.config), self.base_layer)

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
            readable(head, f"weights of head {adapter_name!r}"),
            readable(base, "output layer's weights"),
            building(frozen.normalized),
        ):
            hidden_to_key, bias_to_key = head.collapsed_map(frozen)
            # scores = h M N^T + m0 N^T, so the weight is N M^T and the bias N m0, built in vocabulary chunks.
            rows = frozen.normalized.split(ROWS_PER_VOCAB_CHUNK)
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
