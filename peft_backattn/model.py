"""`BackAttnModel`: the PEFT tuner that attaches backward-attention heads to a causal LM's output layer."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers import GenerationConfig
from transformers.modeling_outputs import CausalLMOutput

from ._files import check_head_tensor
from ._peft_type import PREFIX
from .caches import offload_device
from .config import BackAttnConfig
from .context import default_context_layers
from .layer import (
    BASE_ADAPTER_NAME,
    BackAttnLayer,
    check_adapter_names,
    check_mergeable,
    expand_adapter_names,
    output_layer_shape,
)
from .taps import LayerTaps, decoder_output_width, find_decoder_layers
from .tying import forget_broken_ties, hold_ties, restore_ties, retarget_tied_weights


class BackAttnModel(BaseTuner):
    """Wraps the module returned by `get_output_embeddings()` (or `config.head_module`) in a `BackAttnLayer`.

    Use it through PEFT: `get_peft_model(model, BackAttnConfig())`. Everything but the heads stays frozen, tied
    input/output embeddings stay tied, and `save_pretrained` writes only the heads' weights.
    """

    prefix: str = PREFIX
    tuner_layer_cls = BackAttnLayer
    target_module_mapping: dict[str, list[str]] = {}
    # The adapter_names of the forward()/generate() call in progress (a class default: BaseTuner forwards unknown
    # attribute names to the wrapped model).
    _adapter_names_call: _AdapterNamesCall | None = None

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Attach head `adapter_name` from a copy of its config: the object the caller passed is never written to."""
        self.peft_config[adapter_name] = copy.deepcopy(self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _prepare_adapter_config(self, peft_config: BackAttnConfig, model_config: dict) -> BackAttnConfig:
        """Resolve the output module and check (or record) the base shapes, before anything is changed."""
        if peft_config.head_module is None:
            peft_config.head_module = find_output_module_name(self.model)
        check_base_compatibility(peft_config, self.model)
        return peft_config

    def _layer_taps(self) -> LayerTaps:
        """The hooks that record what contextual heads read (taps.py): one set per model, made at first need."""
        taps = self.__dict__.get("_taps")
        if taps is None:
            taps = self.__dict__["_taps"] = LayerTaps(self.model, find_decoder_layers(self.model))
        return taps

    def _update_taps(self) -> None:
        """Record exactly the layers the contextual heads read; with none, no hook stays registered."""
        wanted = {i for config in self.peft_config.values() if config.context for i in config.context_layers}
        if not wanted and "_taps" not in self.__dict__:
            return
        taps = self._layer_taps()
        taps.record_layers(wanted)
        for layer in self._backattn_layers():
            layer.set_taps(taps if wanted else None)

    @staticmethod
    def _check_target_module_exists(peft_config: BackAttnConfig, key: str) -> bool:
        return key == peft_config.head_module

    def _create_and_replace(
        self,
        peft_config: BackAttnConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, BackAttnLayer):
            target.update_layer(adapter_name, peft_config)
        else:
            new_module = BackAttnLayer(target, input_embeddings_of(self.model), adapter_name, peft_config)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
            retarget_tied_weights(self.model, current_key, wrapped=True)
        self._update_taps()

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        super().merge_adapter(*args, **kwargs)
        self._sync_ties()

    def unmerge_adapter(self, *args: Any, **kwargs: Any) -> None:
        super().unmerge_adapter(*args, **kwargs)
        self._sync_ties()

    def _sync_ties(self) -> None:
        """A merged layer has its own output matrix: hold its tie entries until it is unmerged."""
        held = self.__dict__.setdefault("_held_ties", {})
        for name, layer in self._wrapped_layers():
            if layer.merged and name not in held:
                held[name] = hold_ties(self.model, f"{name}.base_layer.weight")
            elif not layer.merged and name in held:
                restore_ties(self.model, held.pop(name))

    def _wrapped_layers(self) -> list[tuple[str, BackAttnLayer]]:
        return [(name, module) for name, module in self.model.named_modules() if isinstance(module, BackAttnLayer)]

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Unwrap the output layer and give transformers' tie mappings their own keys back; after a merge the output
        layer has its own matrix and stays untied (PEFT sets `tie_word_embeddings=False`)."""
        wrapped = [name for name, _ in self._wrapped_layers()]
        if "_taps" in self.__dict__:
            self.__dict__.pop("_taps").remove_hooks()
        for name in wrapped:
            restore_ties(self.model, self.__dict__.get("_held_ties", {}).pop(name, []))
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        for name in wrapped:
            retarget_tied_weights(model, name, wrapped=False)
            forget_broken_ties(model, f"{name}.weight")
        return model

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, *args: Any, **kwargs: Any
    ) -> nn.Module:
        """Refuse a new vocabulary size: a head scores the vocabulary it was built for (a same-size call passes)."""
        vocab = input_embeddings_of(self.model).weight.shape[0]
        target = vocab if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            target = math.ceil(target / pad_to_multiple_of) * pad_to_multiple_of
        if target != vocab:
            raise ValueError(
                f"resize_token_embeddings would change the vocabulary of {vocab} tokens that head(s) "
                f"{sorted(self.peft_config)} score; resize the base model before attaching or loading a head."
            )
        return self.model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, *args, **kwargs)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """PEFT then moves the new head to the device of the output layer's weight. Where accelerate offloads that
        layer, that is `meta` (no values): the head stays where `update_layer` put it, on the hook's device."""
        if offload_device(child) is None:
            super()._replace_module(parent, child_name, new_module, child)
        else:
            setattr(parent, child_name, new_module)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """PEFT's tuner-level switch accepts any name; refuse unknown ones before anything changes."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_known_heads(names)
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known_heads([adapter_name])
        super().delete_adapter(adapter_name)
        self._update_taps()

    def forward(
        self,
        *args: Any,
        cached_hidden: torch.Tensor | None = None,
        cached_weighted: torch.Tensor | None = None,
        cached_taps: torch.Tensor | None = None,
        cached_attention_mask: torch.Tensor | None = None,
        cached_kept: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward; given `cached_hidden`, the output layer alone on hidden states computed earlier.

        `cached_hidden` (n, d_in): what the base fed the output layer at n positions (cached features, see
        `workbench.features`); the output layer (with its active head) runs on them alone and the logits (n, V) come
        back as `CausalLMOutput(logits=...)`, without a base forward. `cached_weighted` (n, d_e): a softmax head's
        `w N` of those rows, computed earlier too. `PeftModel.forward` hands them all here, so a call on the PeftModel
        (or on DDP wrapping it) works: `peft_model(cached_hidden=hidden)`.

        A contextual head also needs what its context path reads, for whole sequences: `cached_taps` (B, T, L, d_t),
        the outputs of its `context_layers` at every position; `cached_attention_mask` (B, T), 1 at real tokens (None:
        all real); `cached_kept` (B, T) bool, the n positions whose hidden states `cached_hidden` holds, in row-major
        order. The head computes the context vectors of every position (`BackAttnLayer.context_states`) and reads
        those of the kept ones.
        """
        context_inputs = (("cached_taps", cached_taps), ("cached_attention_mask", cached_attention_mask))
        given_context = [name for name, value in (*context_inputs, ("cached_kept", cached_kept)) if value is not None]
        if cached_hidden is None:
            if cached_weighted is not None:
                raise ValueError("cached_weighted are the softmax weights of cached_hidden's rows; pass both.")
            if given_context:
                raise ValueError(
                    f"{given_context[0]} is part of a contextual head's cached inputs; pass it with cached_hidden."
                )
            return super().forward(*args, **kwargs)
        given = sorted(name for name, value in kwargs.items() if value is not None and name != "num_items_in_batch")
        if args or given:
            inputs = ", ".join(given) if given else "positional inputs"
            raise ValueError(f"cached_hidden runs the output layer alone; it takes no {inputs}.")
        layers = self._backattn_layers()
        if len(layers) != 1:
            raise ValueError(f"cached_hidden needs a model with one backattn layer; this one has {len(layers)}.")
        layer = layers[0]
        one_head = not (layer.disable_adapters or layer.merged) and len(layer.active_adapters) == 1
        name = layer.active_adapters[0] if one_head else None
        context = None
        if one_head and layer.backattn_heads[name].context is not None:
            context = _cached_context(layer, name, cached_hidden, cached_taps, cached_attention_mask, cached_kept)
        elif one_head and given_context:
            raise ValueError(
                f"{given_context[0]} is a contextual head's input, but head {name!r} has no context; leave it out."
            )
        if one_head and (cached_weighted is not None or context is not None):
            logits = layer.head_forward(name, cached_hidden, weighted=cached_weighted, context=context)
        else:  # the layer's own forward: its active head, the base layer (disabled or merged), or its refusal
            logits = layer(cached_hidden)
        return CausalLMOutput(logits=logits)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base's generate(), with each head checking its caches against the weights once per call, not per token,
        and the `adapter_names` hooks told how often generate repeats each input sequence (beams, return sequences).

        `PeftModel.generate` lands here. Nothing changes the weights between the steps of one call.
        """
        call = self._adapter_names_call
        if call is not None:
            call.repeat = generation_repeat(self.model, args, kwargs)
        with self.weights_fixed():
            return self.model.generate(*args, **kwargs)

    @contextmanager
    def weights_fixed(self) -> Iterator[None]:
        """Inside, each head checks its caches against the base weights once, at first use, not at every forward.

        For a caller that runs many forwards without changing a weight in between: a decoding loop, a server
        (`peft-backattn serve` holds it between two loads or unloads of heads). `generate()` opens it itself.
        """
        with ExitStack() as stack:
            for layer in self._backattn_layers():
                stack.enter_context(layer._weights_fixed())
            yield

    def clear_caches(self) -> None:
        """Free every head layer's cached tensors (`BackAttnLayer.clear_caches`); also `PeftModel.clear_caches()`."""
        for layer in self._backattn_layers():
            layer.clear_caches()

    def _backattn_layers(self) -> list[BackAttnLayer]:
        return [module for module in self.model.modules() if isinstance(module, BackAttnLayer)]

    def _check_known_heads(self, names: list[str]) -> None:
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            known = sorted(self.peft_config)
            raise ValueError(f"Unknown head {unknown[0]!r}; known heads: {known}.")

    def _check_merge_allowed(self) -> None:
        """Merging folds a linear head into a new output matrix (untying it on purpose); others cannot merge."""
        for name in self.active_adapters:
            check_mergeable(name, self.peft_config[name])

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Route `adapter_names=[...]` (one head per sample) from forward()/generate() to the head layers."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        check_adapter_names(adapter_names)
        if self.training:
            raise ValueError("adapter_names runs several heads for inference only; call model.eval() first.")
        known = sorted(self.peft_config)
        unknown = sorted({name for name in adapter_names if name != BASE_ADAPTER_NAME} - set(known))
        if unknown:
            raise ValueError(
                f"Unknown head(s) {unknown} in adapter_names; known heads: {known} "
                f"(or {BASE_ADAPTER_NAME!r} for the base model alone)."
            )
        layers = [module for module in self.model.modules() if isinstance(module, BackAttnLayer)]
        if any(layer.merged for layer in layers):
            raise ValueError("adapter_names cannot be used while a head is merged; call unmerge_adapter() first.")
        # One name per sample; generate() (below) sets how often it repeats each sample before the first forward.
        call = _AdapterNamesCall(list(adapter_names))
        handles = [
            layer.register_forward_pre_hook(partial(_pass_adapter_names, call=call), with_kwargs=True)
            for layer in layers
        ]
        self._adapter_names_call = call
        try:
            yield
        finally:
            self._adapter_names_call = None
            for handle in handles:
                handle.remove()

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """`...backattn_heads.<name>.<param>` -> `...backattn_heads.<param>`, at any depth: PEFT's default finds the
        name only last or second to last, and a contextual head's context path nests one level deeper."""
        marker = f".backattn_heads.{adapter_name}."
        if marker in key:
            return key.replace(marker, ".backattn_heads.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: BackAttnConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Refuse a state dict that would leave head weights unset or of the wrong shape."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = {
            key: param for key, param in model.state_dict().items() if f".backattn_heads.{adapter_name}." in key
        }
        missing = sorted(key for key in expected if key not in remapped)
        if missing:
            raise ValueError(f"The checkpoint of head {adapter_name!r} lacks {missing}; it is not a complete head.")
        for key, param in expected.items():
            if remapped[key].shape != param.shape:
                raise ValueError(
                    f"Weight {key} has shape {tuple(remapped[key].shape)} in the checkpoint but "
                    f"{tuple(param.shape)} in the model."
                )
            check_head_tensor(f"The checkpoint's {key}", remapped[key])
        return remapped


class _AdapterNamesCall:
    """The `adapter_names` of one forward() or generate() call, and how often generate() repeats each sample."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.repeat = 1


def _pass_adapter_names(module: nn.Module, args: tuple, kwargs: dict, call: _AdapterNamesCall) -> tuple:
    hidden = args[0] if args else kwargs["x"]
    kwargs["adapter_names"] = expand_adapter_names(call.names, hidden.shape[0], repeat=call.repeat)
    return args, kwargs


def generation_repeat(model: nn.Module, args: tuple, kwargs: dict) -> int:
    """Rows generate() makes of each input sequence: max(num_beams, num_return_sequences), as transformers does.

    Each setting comes from the call's keyword, else the `generation_config` passed in, else the model's own.
    """
    passed = [a for a in (kwargs.get("generation_config"), *args) if isinstance(a, GenerationConfig)]
    configs = [*passed, getattr(model, "generation_config", None)]

    def setting(name: str) -> int:
        value = kwargs.get(name)
        for config in configs:
            if value is not None:
                break
            value = getattr(config, name, None)
        return value or 1

    return max(setting("num_beams"), setting("num_return_sequences"))


def _cached_context(
    layer: BackAttnLayer,
    name: str,
    hidden: torch.Tensor,
    taps: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    kept: torch.Tensor | None,
) -> torch.Tensor:
    """The context vectors (n, d_c) of contextual head `name` at the n kept positions of cached sequences."""
    if taps is None or kept is None:
        raise ValueError(
            f"Head {name!r} is contextual: cached_hidden needs its sequences' tapped layers too (cached_taps, "
            "cached_kept and cached_attention_mask; workbench.features caches them for such a head)."
        )
    config = layer.backattn_heads[name].config
    expected = (len(config.context_layers), config.base_context_width)
    if taps.dim() != 4 or tuple(taps.shape[2:]) != expected:
        raise ValueError(
            f"cached_taps has shape {tuple(taps.shape)}, but head {name!r} reads (batch, positions, "
            f"{expected[0]}, {expected[1]}): the outputs of its context_layers {config.context_layers}."
        )
    for label, mask in (("cached_kept", kept), ("cached_attention_mask", attention_mask)):
        if mask is not None and tuple(mask.shape) != tuple(taps.shape[:2]):
            raise ValueError(
                f"{label} has shape {tuple(mask.shape)}; it marks the (batch, positions) = {tuple(taps.shape[:2])} "
                "of cached_taps."
            )
    kept = kept.to(device=taps.device, dtype=torch.bool)
    if int(kept.sum()) != hidden.shape[0]:
        raise ValueError(
            f"cached_kept marks {int(kept.sum())} positions but cached_hidden holds {hidden.shape[0]} rows; it marks "
            "the rows' positions, in row-major order."
        )
    states, _ = layer.context_states(name, taps, attention_mask)  # (B, T, d_c)
    return states[kept]  # (n, d_c)


def find_output_module_name(model: nn.Module) -> str:
    """The qualified name of `model.get_output_embeddings()`, with a clear error where there is none."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if get_output is not None else None
    if output is None:
        raise ValueError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() returned nothing); "
            "pass BackAttnConfig(head_module='<name of its output linear layer>')."
        )
    for name, module in model.named_modules():
        if module is output:
            return name
    raise ValueError(f"The output embeddings of {type(model).__name__} are not a submodule of it.")


def input_embeddings_of(model: nn.Module) -> nn.Module:
    get_input = getattr(model, "get_input_embeddings", None)
    embeddings = get_input() if get_input is not None else None
    if embeddings is None or getattr(embeddings, "weight", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no input-embedding matrix (get_input_embeddings()); "
            "the backattn head attends over it."
        )
    return embeddings


def check_base_compatibility(config: BackAttnConfig, model: nn.Module) -> None:
    """Check the head's recorded base shapes against `model` (or record them); raises before any change."""
    try:
        output = model.get_submodule(config.head_module)
    except AttributeError:
        raise ValueError(
            f"BackAttnConfig.head_module={config.head_module!r} is not a module of {type(model).__name__}."
        ) from None
    if isinstance(output, BackAttnLayer):
        output = output.get_base_layer()
    if not isinstance(output, nn.Linear):  # bitsandbytes' quantised linear layers are nn.Linear too
        raise ValueError(
            f"BackAttnConfig.head_module={config.head_module!r} is a {type(output).__name__}, not a linear output "
            "layer (nn.Linear from hidden states to vocabulary logits); name the output layer, e.g. 'lm_head', or "
            "leave head_module=None."
        )
    hidden_size, vocab_size = output_layer_shape(output)
    vocab_rows, embedding_dim = input_embeddings_of(model).weight.shape
    if vocab_rows != vocab_size:
        raise ValueError(
            f"The output layer {config.head_module!r} scores {vocab_size} tokens but the input embeddings have "
            f"{vocab_rows} rows; the backattn head needs one vocabulary for both."
        )
    recorded = (config.base_vocab_size, config.base_hidden_size, config.base_embedding_dim)
    actual = (vocab_size, hidden_size, embedding_dim)
    if any(r is not None and r != a for r, a in zip(recorded, actual, strict=True)):
        trained_on = f" ({config.base_model_name_or_path})" if config.base_model_name_or_path else ""
        raise ValueError(
            f"This head was built for a base{trained_on} with vocabulary {recorded[0]}, hidden size {recorded[1]} "
            f"and embedding size {recorded[2]}, but this model has vocabulary {actual[0]}, hidden size {actual[1]} "
            f"and embedding size {actual[2]}; load it onto the base it was trained on."
        )
    config.base_vocab_size, config.base_hidden_size, config.base_embedding_dim = actual
    if config.context:
        check_context_layers(config, model)


def check_context_layers(config: BackAttnConfig, model: nn.Module) -> None:
    """Find the decoder layers a contextual head reads and resolve `context_layers` to non-negative indices (or check
    the recorded ones); raises before any change."""
    layers = find_decoder_layers(model)
    if layers is None:
        raise ValueError(
            f"BackAttnConfig.context_layers: found no stack of decoder layers in {type(model).__name__} (an "
            "nn.ModuleList with config.num_hidden_layers entries) to read; use context=False with this model."
        )
    count, width = len(layers), decoder_output_width(model)
    if config.base_num_layers is not None and (config.base_num_layers, config.base_context_width) != (count, width):
        raise ValueError(
            f"This contextual head reads {config.base_num_layers} decoder layers of width "
            f"{config.base_context_width}, but this model has {count} of width {width}; load it onto the base it "
            "was trained on."
        )
    chosen = config.context_layers if config.context_layers is not None else default_context_layers(count)
    bad = [i for i in chosen if not -count <= i < count]
    if bad:
        raise ValueError(
            f"BackAttnConfig.context_layers={chosen} names layer {bad[0]}, but the model has {count} decoder layers "
            f"(indices 0 to {count - 1}, or -1 to -{count})."
        )
    resolved = [i % count for i in chosen]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"BackAttnConfig.context_layers={chosen} names one layer twice ({resolved}).")
    config.context_layers, config.base_num_layers, config.base_context_width = resolved, count, width
