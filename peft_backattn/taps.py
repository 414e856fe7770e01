"""Reading the base's layers for contextual heads: hooks that record, during one forward of the base, what such a
head needs besides the final hidden state.

That is the outputs of the tapped decoder layers (every position of the forward), the 2-D attention mask the model
was called with (padding, and the length of the cached past), and the decoding cache (`transformers.Cache`) that
the head keeps its own keys and values in. The hooks only keep references to tensors the base computes anyway: no
extra base compute, and the record is dropped when the model's forward returns. Without a contextual head no hook
is registered at all.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache


@dataclass
class ForwardRecord:
    """What the hooks saw during the model forward in progress."""

    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer index -> (B, T, d_t)
    attention_mask: torch.Tensor | None = None  # (B, P + T) as the model got it, or None
    cache: Cache | None = None  # the decoding cache the decoder layers were given, or None
    logits_to_keep: Any = None


def find_decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of decoder layers: the outermost `nn.ModuleList` with one entry per hidden layer."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config(decoder=True) if config is not None else None
    count = getattr(text_config, "num_hidden_layers", None)
    if count is None:
        return None
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    return None


def decoder_output_width(model: nn.Module) -> int:
    """Width of the decoder layers' outputs: the text config's hidden size."""
    return int(model.config.get_text_config(decoder=True).hidden_size)


class LayerTaps:
    """The hooks of one model and the record of its forward in progress.

    `record_layers(indices)` records exactly those decoder layers (an empty set removes every hook);
    `current_record()` is what the current forward has recorded so far, for the output layer, which runs last.
    """

    def __init__(self, model: nn.Module, layers: nn.ModuleList) -> None:
        self.model = model
        self.layers = layers
        self.watched: frozenset[int] = frozenset()
        self._record: ForwardRecord | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._signature = inspect.signature(model.forward)

    def record_layers(self, indices: set[int] | frozenset[int]) -> None:
        indices = frozenset(indices)
        if indices == self.watched:
            return
        self.remove_hooks()
        self.watched = indices
        if not indices:
            return
        handles = [
            self.model.register_forward_pre_hook(self._start, with_kwargs=True),
            self.model.register_forward_hook(self._finish, always_call=True),
        ]
        for index in sorted(indices):
            layer = self.layers[index]
            handles.append(layer.register_forward_pre_hook(self._find_cache, with_kwargs=True))
            handles.append(layer.register_forward_hook(self._keep_output(index)))
        self._handles = handles

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.watched, self._record = [], frozenset(), None

    def current_record(self) -> ForwardRecord | None:
        return self._record

    # -- the hooks ----------------------------------------------------------------------------------------------

    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        cache = bound.get("cache", bound.get("past_key_values"))  # transformers 5.x renames past_key_values
        self._record = ForwardRecord(
            attention_mask=bound.get("attention_mask"),
            cache=cache if isinstance(cache, Cache) else None,
            logits_to_keep=bound.get("logits_to_keep"),
        )

    def _finish(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._record = None

    def _find_cache(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A model that makes its cache itself (no past_key_values passed) hands it to every decoder layer."""
        record = self._record
        if record is not None and record.cache is None:
            record.cache = next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)

    def _keep_output(self, index: int):
        def keep(module: nn.Module, args: tuple, output: Any) -> None:
            if self._record is not None:
                self._record.outputs[index] = output[0] if isinstance(output, tuple) else output

        return keep
