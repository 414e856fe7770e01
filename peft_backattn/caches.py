"""The head layer's caches of what it reads from the frozen base, and the readers of weights accelerate offloads.

The caches hold N (the row-normalised input embeddings), raw mode's C = W_out^T N / |V| and each linear head's
collapsed map (M, m0). Each is checked against exact copies of the weights it was built from before each use, so
that no change of those weights goes unseen (docs/design.md, "Caches and when they are rebuilt"). The two counters
below, which number the builds and the `_weights_fixed()` blocks, are the caches' only module-level state.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import NamedTuple

import torch
from peft.utils.integrations import dequantize_module_weight
from torch import nn

from .config import BackAttnConfig
from .head import FrozenTensors

ROWS_PER_VOCAB_CHUNK = 8192  # rows of E processed at once when precomputing frozen tensors
_BUILDS = itertools.count(1)  # numbers each build of frozen tensors; a collapsed map records the one it came from
_BLOCKS = itertools.count(1)  # numbers each `_weights_fixed()` block


class _CollapsedMap(NamedTuple):
    """A linear head's cached (M, m0), with what it was built from."""

    weights: tuple[torch.Tensor, ...]  # exact copies of the head's weights
    value: tuple[torch.Tensor, torch.Tensor | None]  # (M, m0)
    build: int  # the FrozenTensors.build it was built from
    checked_in: int  # the `_weights_fixed()` block it was last checked in (0: none)


class CheckedCaches:
    """The caches of a head layer (mixed into `BackAttnLayer`): the frozen tensors, the collapsed maps, and the
    `_weights_fixed()` blocks within which they are checked once.

    It reads its host's `embedding_weight`, `_input_embeddings`, `get_base_layer()` and `backattn_heads`.
    """

    def __init__(self) -> None:
        super().__init__()
        # Caches, each used only while what it was built from is unchanged (see `frozen_tensors`).
        self._frozen_cache: dict[tuple, FrozenTensors] = {}  # (rms_norm_eps, raw) -> N (and C, c)
        self._base_copies: dict[str, torch.Tensor | None] = {}  # exact copies of the base tensors they came from
        self._base_checked_in = 0  # the `_weights_fixed()` block the copies were last checked in (0: none)
        self._collapsed_cache: dict[str, _CollapsedMap] = {}  # adapter name -> a linear head's (M, m0)
        self._block = 0  # the `_weights_fixed()` block being run (0: none)

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
            readable(self._input_embeddings.module, "input embeddings"),
            readable(base, "output layer's weights") if with_output else nullcontext(),
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
        with building(*live.values()):
            for name, tensor in live.items():
                if name in self._base_copies:
                    continue
                twin = next((other for other in self._base_copies if _same_view(live[other], tensor)), None)
                self._base_copies[name] = self._base_copies[twin] if twin is not None else _copy(tensor)

    def _build_frozen_tensors(self, config: BackAttnConfig, live: dict[str, torch.Tensor | None]) -> FrozenTensors:
        emb = live["embedding"]
        with building(*live.values()):
            # N = diag(1 / rms(E_v)) E, row chunk by row chunk in fp32, stored in E's dtype.
            normalized = torch.cat(
                [
                    (
                        rows.float()
                        * torch.rsqrt(rows.float().pow(2).mean(dim=-1, keepdim=True) + config.rms_norm_eps)
                    ).to(emb.dtype)
                    for rows in emb.split(ROWS_PER_VOCAB_CHUNK)
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
        for start in range(0, vocab, ROWS_PER_VOCAB_CHUNK):
            stop = start + ROWS_PER_VOCAB_CHUNK
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
        with readable(head, f"weights of head {adapter_name!r}"):
            weights = tuple(head.parameters())
            if not (current and all(map(_same_contents, weights, cached.weights))):
                with building(*weights):
                    copies = tuple(_copy(weight) for weight in weights)
                    cached = _CollapsedMap(copies, head.collapsed_map(frozen), frozen.build, 0)
        self._collapsed_cache[adapter_name] = cached._replace(checked_in=self._block)
        return cached.value


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
def building(*tensors: torch.Tensor | None) -> Iterator[None]:
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
def readable(module: nn.Module, what: str) -> Iterator[None]:
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
