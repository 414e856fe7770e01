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
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .caches import ROWS_PER_VOCAB_CHUNK, CheckedCaches, building, offload_device, readable
from .config import BackAttnConfig
from .context import TAP_DTYPE, rotary_positions
from .head import BackAttnHead
from .taps import ForwardRecord, LayerTaps

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
        self._taps = _Reference(None)  # the model's LayerTaps, set by BackAttnModel once a head is contextual
        self._context_slots: dict[str, int] = {}  # contextual head -> its slot among the decoding cache's layers
        self._next_context_slot = 0
        self._context_updates: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
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
        if config.context and config.context_attention and adapter_name not in self._context_slots:
            # Slots are never reused: a cache written by a deleted head is never read as another head's.
            self._context_slots[adapter_name] = self._next_context_slot
            self._next_context_slot += 1
        # An offloaded base layer is on meta between forwards: the head goes where its hook runs it instead.
        self._move_adapter_to_device_of_base_layer(adapter_name, device=offload_device(self.get_base_layer()))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._collapsed_cache.pop(adapter_name, None)
        self._context_slots.pop(adapter_name, None)

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
        """The active head's logits, or one head per sample with `adapter_names=[...]`.

        `kept_positions` (B, T) bool, from a caller that kept only some positions' hidden states (training on
        scored positions): x is then (n, d_in), the True positions in row-major order; a contextual head, which
        reads every position of the tapped layers, picks its context vectors by it.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        kept_positions = kwargs.pop("kept_positions", None)
        self._context_updates.clear()
        try:
            logits = self._forward(x, adapter_names, kept_positions, *args, **kwargs)
            self._write_context_cache(x)
        finally:
            self._context_updates.clear()
        return logits

    def _forward(
        self, x: torch.Tensor, adapter_names: list[str] | None, kept_positions: torch.Tensor | None, *args, **kwargs
    ) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            if kept_positions is not None:
                raise ValueError("adapter_names is for inference, kept_positions for training; pass one of them.")
            return self._mixed_batch_forward(x, adapter_names)
        if self.merged or not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        if len(self.active_adapters) != 1:
            raise ValueError(
                f"A backattn layer runs one head at a time, but {self.active_adapters} are active; "
                "call set_adapter('<name>'), or pass adapter_names=[...] to run one head per sample."
            )
        return self.head_forward(self.active_adapters[0], x, kept_positions=kept_positions)

    def head_forward(
        self,
        adapter_name: str,
        x: torch.Tensor,
        weighted: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        samples: torch.Tensor | None = None,
        kept_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of head `adapter_name` for hidden states x (..., d_in), with bounded extra memory.

        A single residual head adds its scores into the base logits of every position, which are the output
        buffer. Vocabulary-sized intermediates (softmax weights, a mixture's per-head scores and base logits) are
        formed `chunk_size` positions at a time. The logits come back in the hidden states' dtype. `weighted`
        (n, d_e), for a softmax head: the base's w N of these rows, precomputed (see `BackAttnHead.forward`).

        A contextual head takes its context vectors (..., d_c) as `context`, else reads them from the forward in
        progress (`live_context`): `samples`, the batch rows x holds (a mixed batch's group), `kept_positions` as
        in `forward`.
        """
        head = self.backattn_heads[adapter_name]
        config = head.config
        if head.context is not None and context is None:
            context = self.live_context(adapter_name, x, samples, kept_positions)
        if context is not None:
            context = context.reshape(-1, context.shape[-1])  # (n, d_c)
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
            logits = head(
                rows, base_logits, frozen, base_output=self.base_layer.__call__, weighted=weighted, context=context
            )
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
                result = self.head_forward(members[0], sub, samples=index)
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
        if config.num_heads != 1 or config.logit_weighting != "softmax" or config.context:
            return None
        if getattr(head, "_hf_hook", None):
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

    # -- the contextual head's inputs and decoding cache --------------------------------------------------------

    def set_taps(self, taps: LayerTaps | None) -> None:
        self._taps = _Reference(taps)

    def context_states(
        self,
        adapter_name: str,
        taps: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Context vectors (B, T, d_c) of head `adapter_name` for tapped layer outputs `taps` (B, T, L, d_t).

        `attention_mask` (B, P + T): 1 at real tokens, over the P positions of `past` (cached keys and values of the
        context attention, (B, H_c, P, d_h) each) and the T new ones; None: all real. Also returns the new positions'
        keys and values (None for a head without context attention). Cached features call it without `past`.
        """
        head = self.backattn_heads[adapter_name]
        batch, length = taps.shape[:2]
        cached = 0 if past is None else past[0].shape[-2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, cached + length, dtype=torch.long, device=taps.device)
        key_mask = attention_mask.to(taps.device).bool()
        return head.context(taps, key_mask, rotary_positions(key_mask, length), past)

    def recorded_taps(self, adapter_name: str) -> tuple[torch.Tensor, ForwardRecord]:
        """The outputs of head `adapter_name`'s tapped layers in the model forward in progress, stacked in
        `context_layers` order: (B, T, L, d_t), and the forward's record. Only while the model's forward runs (the
        output layer, or a hook on it): the cache pass of `workbench.features` stores them from there."""
        config = self.backattn_heads[adapter_name].config
        taps: LayerTaps | None = self._taps.module
        record = taps.current_record() if taps is not None else None
        missing = [] if record is None else [i for i in config.context_layers if i not in record.outputs]
        if record is None or missing:
            raise ValueError(
                f"Head {adapter_name!r} reads the base's layers {config.context_layers} (context_layers), but no "
                "model forward recorded them; call the whole model (or generate), not its output layer alone; for "
                "cached features pass the model their taps (cached_taps)."
            )
        taps = torch.stack([record.outputs[i].to(TAP_DTYPE) for i in config.context_layers], dim=2)
        return taps, record  # read in bf16, as the context path reads them

    def live_context(
        self,
        adapter_name: str,
        x: torch.Tensor,
        samples: torch.Tensor | None = None,
        kept_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Context vectors of head `adapter_name` for the hidden states x this layer got in the model forward in
        progress, from the layers the hooks recorded (and the head's keys in the decoding cache): (..., d_c) in x's
        layout. `samples`: which rows of the batch x holds; `kept_positions`: see `forward`."""
        tapped, record = self.recorded_taps(adapter_name)  # (B, T, L, d_t)
        if isinstance(record.logits_to_keep, torch.Tensor):
            raise ValueError(
                f"Head {adapter_name!r} is contextual and needs logits_to_keep as a number of last positions, not a "
                "tensor of indices."
            )
        batch, length = tapped.shape[:2]
        mask, past = self._context_past(adapter_name, record, batch, length)
        if samples is not None:
            tapped, mask = (
                tapped.index_select(0, samples.to(tapped.device)),
                mask.index_select(0, samples.to(mask.device)),
            )
            if past is not None:
                past = tuple(t.index_select(0, samples.to(t.device)) for t in past)
        states, new = self.context_states(adapter_name, tapped, mask, past)  # (b, T, d_c)
        if new is not None and record.cache is not None:
            self._context_updates[adapter_name] = (new[0].detach(), new[1].detach(), samples)
        if kept_positions is not None:
            return states[kept_positions.to(states.device)]  # (n, d_c)
        kept = x.shape[-2] if x.dim() == 3 else None
        if kept is None or x.shape[0] != states.shape[0] or kept > length:
            raise ValueError(
                f"Head {adapter_name!r} got hidden states of shape {tuple(x.shape)} for a forward over "
                f"{batch} x {length} positions; a contextual head needs the last positions of each sample."
            )
        return states[:, length - kept :]  # the kept last positions (logits_to_keep)

    def _context_past(
        self, adapter_name: str, record: ForwardRecord, batch: int, length: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The attention mask over cached and new positions (B, P + T), and the head's cached keys and values."""
        cache, slot = record.cache, self._context_slots.get(adapter_name)
        total = cache.get_seq_length() if cache is not None else length  # the base has added the new positions
        cached = total - length
        mask = record.attention_mask
        if mask is None:
            mask = torch.ones(batch, total, dtype=torch.long)
        if mask.dim() != 2 or mask.shape != (batch, total):
            raise ValueError(
                f"Head {adapter_name!r} is contextual and needs a 2-D attention_mask of shape (batch, cached + new "
                f"positions) = {(batch, total)}, got {tuple(mask.shape)}."
            )
        if slot is None or cached == 0:
            return mask, None
        layer = self._context_cache_layer(cache, slot)
        have = 0 if layer is None or not layer.is_initialized else layer.get_seq_length()
        if have != cached:
            raise ValueError(
                f"Head {adapter_name!r} keeps its context in the decoding cache, but this cache holds its keys for "
                f"{have} of the {cached} earlier positions; decode with the cache that a forward with this head made "
                "(start generation with it)."
            )
        return mask, (layer.keys, layer.values)

    def _context_cache_layer(self, cache: Cache, slot: int) -> DynamicLayer | None:
        index = len(self._taps.module.layers) + slot
        return cache.layers[index] if index < len(cache.layers) else None

    def _write_context_cache(self, x: torch.Tensor) -> None:
        """Append this forward's context keys and values to the decoding cache, one cache layer per contextual head,
        after the base's own layers. Each slot holds every sample of the batch (zeros where another head ran), so
        that the cache's own batch operations (beam reordering, dropping and merging rows) keep it aligned."""
        taps: LayerTaps | None = self._taps.module
        record = taps.current_record() if taps is not None else None
        if not self._context_slots or record is None or record.cache is None or not record.outputs:
            return
        cache = record.cache
        if not isinstance(cache, DynamicCache):
            raise ValueError(
                f"Contextual heads keep their keys in a DynamicCache, got {type(cache).__name__}; generate with the "
                "default cache (no cache_implementation)."
            )
        batch, length = next(iter(record.outputs.values())).shape[:2]  # any tapped layer's (B, T, d)
        cached = cache.get_seq_length() - length
        for name, slot in self._context_slots.items():
            update = self._context_updates.get(name)
            layer = self._context_cache_layer(cache, slot)
            if update is None and (layer is None or not layer.is_initialized):
                continue  # this head never ran on this cache
            config = self.backattn_heads[name].config
            shape = (batch, config.context_heads, length, config.context_dim // config.context_heads)
            dtype = self.backattn_heads[name].context.tap_proj.dtype
            keys = torch.zeros(shape, dtype=dtype, device=x.device)
            values = torch.zeros_like(keys)
            if update is not None:
                new_keys, new_values, samples = update
                if samples is None:
                    keys, values = new_keys.to(dtype), new_values.to(dtype)
                else:
                    keys.index_copy_(0, samples.to(x.device), new_keys.to(dtype))
                    values.index_copy_(0, samples.to(x.device), new_values.to(dtype))
            while len(cache.layers) <= len(taps.layers) + slot:
                cache.layers.append(DynamicLayer())
            index = len(taps.layers) + slot
            if cache.layers[index].get_seq_length() != cached:
                # A slot left behind while its head did not run (or never written): none of its rows is this head's.
                cache.layers[index] = DynamicLayer()
                past = torch.zeros((*shape[:2], cached, shape[3]), dtype=dtype, device=x.device)
                cache.layers[index].update(past, torch.zeros_like(past))
            cache.layers[index].update(keys, values)

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
    if config.context:
        reasons.append("context=True: it reads the base's layers and earlier positions")
    raise ValueError(
        f"Head {adapter_name!r} cannot be merged: it is not linear ({', '.join(reasons)}). Merging needs "
        "logit_weighting='raw', query_activation=None, num_heads=1 and no context; keep the head unmerged, or "
        "unload() it."
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
