"""Checks a saved head folder before PEFT changes the model, so a bad file never leaves a half-loaded head."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:  # for annotations only: the config imports this module to check folders it loads
    from .config import BackAttnConfig

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
_MODEL_PREFIX = "base_model.model."


def expected_head_shapes(config: BackAttnConfig) -> dict[str, tuple[int, ...]]:
    """The exact tensors a saved head holds: key (without the PeftModel prefix) -> shape."""
    heads, r, width = config.num_heads, config.r, config.base_embedding_dim
    stem = f"{config.head_module}.backattn_heads."
    shapes = {
        stem + "norm_scale": (width,),
        stem + "value_proj": (heads, width, r),
        stem + "key_proj": (heads, width, r),
        stem + "query_proj": (heads, r, r),
    }
    if heads > 1:
        shapes[stem + "gate"] = (heads, r)
    if config.context:
        taps, tap_width, width = len(config.context_layers), config.base_context_width, config.context_dim
        shapes[stem + "context_to_query"] = (heads, width, r)
        context = {"tap_proj": (taps, tap_width, width), "mlp_norm": (width,), "mlp_in": (width, 2 * width)}
        context |= {"mlp_out": (2 * width, width), "final_norm": (width,)}
        if config.context_attention:
            context |= {"attention_norm": (width,), "qkv_proj": (width, 3 * width), "out_proj": (width, width)}
        shapes |= {f"{stem}context.{name}": shape for name, shape in context.items()}
    return shapes


def validate_head_folder(folder: str, config: BackAttnConfig) -> None:
    """Raise a one-line ValueError unless `folder` holds an intact safetensors head matching `config`."""
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(folder, PICKLE_WEIGHTS_NAME)):
            raise ValueError(
                f"{folder} holds {PICKLE_WEIGHTS_NAME}, but backattn heads load from safetensors only; "
                "re-save the head with save_pretrained() (safe_serialization=True, the default)."
            )
        raise ValueError(f"No {WEIGHTS_NAME} in {folder}; a backattn head folder holds it beside adapter_config.json.")
    if config.base_embedding_dim is None or config.head_module is None:
        raise ValueError(f"{folder}/adapter_config.json lacks the base shapes recorded when the head was attached.")
    expected = expected_head_shapes(config)
    try:
        with safe_open(weights, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ValueError(f"{weights} is truncated or corrupted ({error}); nothing was loaded.") from None
    # PEFT loads a file into a PeftModel by these full keys: a key without the prefix would match no head weight.
    unprefixed = sorted(key for key in tensors if not key.startswith(_MODEL_PREFIX))
    if unprefixed:
        raise ValueError(
            f"{weights}: key {unprefixed[0]!r} lacks the {_MODEL_PREFIX!r} prefix that PEFT saves and loads head "
            "weights with; re-save the head with save_pretrained(). Nothing was loaded."
        )
    tensors = {key.removeprefix(_MODEL_PREFIX): tensor for key, tensor in tensors.items()}
    found = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    if set(found) != set(expected):
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        raise ValueError(
            f"{weights} does not hold the head its config describes (missing {missing}, unexpected {extra}); "
            "nothing was loaded."
        )
    for key, shape in expected.items():
        if found[key] != shape:
            raise ValueError(
                f"{weights}: {key} has shape {found[key]}, but the config describes {shape}; nothing was loaded."
            )
        check_head_tensor(f"{weights}: {key}", tensors[key])


def check_head_tensor(name: str, tensor: torch.Tensor) -> None:
    """Refuse a head weight that is not floating point (it would be cast silently) or not finite."""
    if not tensor.dtype.is_floating_point:
        raise ValueError(f"{name} has dtype {tensor.dtype}, but head weights are floating point; nothing was loaded.")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} holds NaN or infinite values; nothing was loaded.")
