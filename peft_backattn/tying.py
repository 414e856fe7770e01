"""transformers' tie mappings while a head layer wraps the output layer: retargeted to the wrapped weight, held while
a merged head gives the layer its own matrix, and pruned after `merge_and_unload`."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

# transformers' tie mappings, {target: source} parameter names: the class's declared one (read by tie_weights()) and
# the expanded one each (sub)model keeps (read by tie_weights(recompute_mapping=False) and by save/load).
TIE_MAPPINGS = ("_tied_weights_keys", "all_tied_weights_keys")
HeldTie = tuple[str, str, str, str]  # (module prefix, mapping attribute, target, source)


def retarget_tied_weights(model: nn.Module, layer_name: str, wrapped: bool) -> None:
    """Point transformers' tie mappings at `<layer>.base_layer.weight` while the layer is wrapped, and back after.

    transformers re-ties (`tie_weights()`, also inside `resize_token_embeddings`) by setting each target of the
    mapping on its parent module. For `lm_head.weight` that parent is the wrapper, whose `weight` is a read-only
    property (KeyError "attribute 'weight' already exists"); the wrapped layer's own weight is the one to keep tied.
    """
    plain, inner = f"{layer_name}.weight", f"{layer_name}.base_layer.weight"
    old, new = (plain, inner) if wrapped else (inner, plain)
    for prefix, module, attribute, mapping in _tie_mappings(model, old):
        relative_old, relative_new = _relative(old, prefix), _relative(new, prefix)
        if relative_old in mapping or relative_old in mapping.values():
            _set_mapping(
                module,
                attribute,
                {
                    (relative_new if key == relative_old else key): (relative_new if value == relative_old else value)
                    for key, value in mapping.items()
                },
            )


def hold_ties(model: nn.Module, weight_name: str) -> list[HeldTie]:
    """Take the tie entries of `weight_name` out of the mappings (a merged head's layer has its own matrix, which
    `tie_weights()` would otherwise overwrite with the embeddings); `restore_ties` puts them back."""
    held = []
    for prefix, module, attribute, mapping in _tie_mappings(model, weight_name):
        name = _relative(weight_name, prefix)
        entries = {key: value for key, value in mapping.items() if name in (key, value)}
        if entries:
            _set_mapping(module, attribute, {key: value for key, value in mapping.items() if key not in entries})
            held.extend((prefix, attribute, key, value) for key, value in entries.items())
    return held


def restore_ties(model: nn.Module, held: list[HeldTie]) -> None:
    for prefix, attribute, key, value in held:
        module = model.get_submodule(prefix)
        _set_mapping(module, attribute, {**(getattr(module, attribute, None) or {}), key: value})


def forget_broken_ties(model: nn.Module, weight_name: str) -> None:
    """Drop the expanded tie entries of `weight_name` that no longer hold (after merge_and_unload the output layer
    has its own matrix), as transformers does for a checkpoint whose tied weights differ."""
    for prefix, module, attribute, mapping in _tie_mappings(model, weight_name):
        name = _relative(weight_name, prefix)
        if attribute == "all_tied_weights_keys":
            kept = {
                key: value
                for key, value in mapping.items()
                if name not in (key, value) or _same_parameter(module, key, value)
            }
            if kept != mapping:
                _set_mapping(module, attribute, kept)


def _tie_mappings(model: nn.Module, weight_name: str) -> Iterator[tuple[str, nn.Module, str, dict]]:
    """(prefix, module, attribute, mapping) for each tie mapping of the model and of its submodels above `weight_name`
    (mapping keys are relative to their module)."""
    for prefix, module in list(model.named_modules()):
        if prefix and not weight_name.startswith(prefix + "."):
            continue
        for attribute in TIE_MAPPINGS:
            mapping = getattr(module, attribute, None)
            if isinstance(mapping, dict):
                yield prefix, module, attribute, mapping


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :] if prefix else name


def _set_mapping(module: nn.Module, attribute: str, mapping: dict) -> None:
    if mapping == getattr(type(module), attribute, None):
        module.__dict__.pop(attribute, None)  # the class's own mapping again
    else:
        setattr(module, attribute, mapping)


def _same_parameter(module: nn.Module, first: str, second: str) -> bool:
    try:
        return module.get_parameter(first) is module.get_parameter(second)
    except AttributeError:
        return False
