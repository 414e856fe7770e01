"""The README.md model card that `save_pretrained` writes next to a backattn head.

PEFT writes a card on every `save_pretrained` (and so in every Trainer checkpoint): its blank template ("Model Card for
Model ID", every section a placeholder) with the hub's metadata for adapters (`library_name: peft`, `base_model`,
`pipeline_tag`, `tags`). For a folder that holds backattn heads, the wrappers here (applied by `_peft_patches`) make
that card say what the head is: the base model and its sizes, the head's config and size, how to load it, and the
training data, training run and metrics where they were recorded with `record_card_details` (`train_head` records its
run). The sections follow PEFT's template, so the hub shows the card as it shows any PEFT adapter's.

A README.md already in the folder is replaced only when it is this card or PEFT's blank template; a card of the
user's own is left to PEFT's update (which adds its metadata and keeps the text).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields
from typing import Any
from weakref import WeakKeyDictionary, WeakSet

from huggingface_hub import ModelCard
from peft import PeftConfig, PeftModel
from peft import __version__ as peft_version

from ._base_names import PublishedBase, published_base
from ._files import expected_head_shapes
from .config import BackAttnConfig
from .layer import BackAttnLayer

CARD_NAME = "README.md"
CARD_MARK = "<!-- peft-backattn model card: saving the head again rewrites it -->"
PEFT_TEMPLATE_MARK = "# Model Card for Model ID"  # the title of PEFT's blank template
TAGS = ("backattn", "peft", "peft-backattn")
# What the card needs to know about a model, kept here (weakly keyed: gone with the model), not in PEFT's objects.
_DETAILS: WeakKeyDictionary[PeftModel, dict[str, dict]] = WeakKeyDictionary()  # per-head facts
_SAVING: WeakKeyDictionary[PeftModel, list[str] | None] = WeakKeyDictionary()  # the heads of a save in progress
_AT_TOP: WeakSet[PeftModel] = WeakSet()  # while a caller moves a named head to the folder's top (`save_head`)
_INHERITED = {f.name for f in fields(PeftConfig)}


def record_card_details(
    model: PeftModel,
    adapter_name: str | None = None,
    *,
    training_data: str | None = None,
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> None:
    """Facts about head `adapter_name` (the active one by default) for the card of its next `save_pretrained`.

    `training_data` is a sentence or a name ("openai/gsm8k, split train, first 2000 rows"); `training` and `metrics`
    are name -> value tables (steps, learning rate, ...; exact match, perplexity, ...). Entries add to (and
    replace) what was recorded before for the same head.
    """
    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise ValueError(f"Unknown head {name!r}; known heads: {sorted(model.peft_config)}.")
    details = _DETAILS.setdefault(model, {}).setdefault(name, {"training": {}, "metrics": {}})
    if training_data is not None:
        details["training_data"] = str(training_data)
    details["training"].update(training or {})
    details["metrics"].update(metrics or {})


def card_details(model: PeftModel, adapter_name: str) -> dict[str, Any]:
    """What `record_card_details` holds for a head (empty tables when nothing was recorded)."""
    return _DETAILS.get(model, {}).get(adapter_name, {"training": {}, "metrics": {}})


@contextmanager
def heads_at_top(model: PeftModel) -> Iterator[None]:
    """Inside, the card tells to load a named head from the folder's top, not from PEFT's `<folder>/<name>/`: for a
    caller that moves the head's files up after `save_pretrained` (the workbench's `save_head` does)."""
    _AT_TOP.add(model)
    try:
        yield
    finally:
        _AT_TOP.discard(model)


def remember_selection(save_pretrained):
    """`PeftModel.save_pretrained` that tells the card writer which heads this save selected."""

    @functools.wraps(save_pretrained)
    def wrapper(self: PeftModel, save_directory: str, *args: Any, **kwargs: Any) -> Any:
        selected = kwargs.get("selected_adapters", args[1] if len(args) > 1 else None)
        _SAVING[self] = list(selected) if selected is not None else None
        try:
            return save_pretrained(self, save_directory, *args, **kwargs)
        finally:
            _SAVING.pop(self, None)

    return wrapper


def backattn_card(create_or_update):
    """`PeftModel.create_or_update_model_card` that writes this card for a folder of backattn heads."""

    @functools.wraps(create_or_update)
    def wrapper(self: PeftModel, output_dir: str) -> None:
        selected = _SAVING.get(self) or list(self.peft_config)
        heads = [name for name in selected if isinstance(self.peft_config.get(name), BackAttnConfig)]
        path = os.path.join(output_dir, CARD_NAME)
        existing = open(path, encoding="utf-8").read() if os.path.isfile(path) else None
        if not heads or (existing is not None and CARD_MARK not in existing and PEFT_TEMPLATE_MARK not in existing):
            return create_or_update(self, output_dir)  # another method's adapters, or the user's own card
        ModelCard("---\nlibrary_name: peft\n---\n\n" + model_card_text(self, heads)).save(path)
        create_or_update(self, output_dir)  # PEFT's metadata: library_name, base_model, pipeline_tag, tags
        card = ModelCard.load(path)
        # PEFT names the base by its path; the hub takes only a hub id (none for a base built in memory).
        base = _base_of(self, heads[0])
        tags = {tag for tag in card.data.tags or [] if not tag.startswith("base_model:")} | set(TAGS)
        if base.hub_id:
            card.data.base_model = base.name
            tags.add(f"base_model:adapter:{base.name}")
        else:
            card.data.pop("base_model", None)
        card.data.tags = sorted(tags)
        card.save(path)

    return wrapper


def _base_of(model: PeftModel, adapter_name: str) -> PublishedBase:
    """What head `adapter_name`'s card calls its base: the publishable name (`_base_names.published_base`) of the
    base it is attached to, as PEFT's card names it, else of the one its config records (a base built in memory has
    no name). Its adapter_config.json names the recorded base by the same rule (`BackAttnConfig.save_pretrained`)."""
    attached = getattr(model.get_base_model(), "name_or_path", "")
    return published_base(attached or model.peft_config[adapter_name].base_model_name_or_path)


def _layer(model: PeftModel) -> BackAttnLayer | None:
    return next((module for module in model.modules() if isinstance(module, BackAttnLayer)), None)


def head_parameters(model: PeftModel, adapter_name: str) -> tuple[int, int]:
    """A head's parameter count (from its config's shapes, so also right while DeepSpeed ZeRO-3 partitions the
    weights) and its size in bytes in the dtype it is held in."""
    count = sum(math.prod(shape) for shape in expected_head_shapes(model.peft_config[adapter_name]).values())
    layer = _layer(model)
    held = layer.backattn_heads[adapter_name] if layer is not None and adapter_name in layer.backattn_heads else None
    itemsize = next(held.parameters()).element_size() if held is not None else 4
    return count, count * itemsize


def _size(num_bytes: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} bytes"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "`None`" if value is None else f"`{value}`" if isinstance(value, (str, bool)) else str(value)


def _table(header: tuple[str, str], rows: Mapping[str, Any]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return lines + [f"| {key} | {_value(value)} |" for key, value in rows.items()]


def model_card_text(model: PeftModel, adapter_names: list[str]) -> str:
    """The card's text (without its metadata header) for the backattn heads `adapter_names` of `model`."""
    base = model.get_base_model()
    first = model.peft_config[adapter_names[0]]
    architecture = (getattr(base.config, "architectures", None) or [type(base).__name__])[0]
    published = _base_of(model, adapter_names[0])
    named = published.name
    title = named or f"a {architecture} base model"
    load_name = named or "BASE_MODEL"
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    which = "head" if len(adapter_names) == 1 else "heads"
    names = ", ".join(f"`{name}`" for name in adapter_names)
    shown = f"`{named}`" if named else title
    lines = [
        CARD_MARK,
        "",
        f"# backattn {which} {names} for {title}",
        "",
        f"A backward-attention output {which} (package `peft-backattn`, PEFT method `backattn`) for the frozen "
        f"causal language model {shown}. The head wraps the model's output layer: it reads the base model's "
        "logits, weights value vectors projected from the base's (RMS-normalised) input embeddings with them, and "
        "attends back over keys projected from the same embeddings to refine the next-token logits. Only the head "
        "is stored here; the base model's weights are needed to use it, and stay frozen.",
        "",
        "## Model Details",
        "",
        f"- **Base model:** {shown} ({architecture}; vocabulary {first.base_vocab_size}, hidden size "
        f"{first.base_hidden_size}, embedding width {first.base_embedding_dim}; output layer "
        f"`{first.head_module}`, {'tied to' if tied else 'separate from'} the input embeddings)",
        *([f"- **Where the base came from:** {published.note}"] if published.note else []),
        "- **Method:** backattn, a PEFT method registered by `import peft_backattn`",
    ]
    for name in adapter_names:
        count, num_bytes = head_parameters(model, name)
        lines.append(f"- **Size of head `{name}`:** {count:,} parameters ({_size(num_bytes)})")
    for name in adapter_names:
        config = model.peft_config[name]
        settings = {
            f.name: getattr(config, f.name)
            for f in fields(config)
            if f.name not in _INHERITED and f.name not in ("target_modules",)
        }
        lines += ["", f"### Configuration of head `{name}`", "", *_table(("field", "value"), settings)]
    example = adapter_names[0]
    subfolder = (
        []
        if example == "default" or model in _AT_TOP
        else [f'# PeftModel.save_pretrained puts head "{example}" in a sub-folder: add subfolder="{example}"']
    )
    lines += [
        "",
        "## How to Get Started with the Model",
        "",
        "```python",
        "import peft_backattn  # registers the backattn method with PEFT (pip install peft-backattn)",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        *([] if published.hub_id or not named else [f'# "{named}" was a local folder: give its path']),
        f'base = AutoModelForCausalLM.from_pretrained("{load_name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{load_name}")',
        *subfolder,
        f'model = PeftModel.from_pretrained(base, "HEAD_FOLDER_OR_REPO", adapter_name="{example}")  # this folder',
        "```",
        "",
        "## Training Details",
    ]
    for name in adapter_names:
        details = card_details(model, name)
        prefix = f" of head `{name}`" if len(adapter_names) > 1 else ""
        lines += ["", f"### Training Data{prefix}", "", details.get("training_data") or "Not recorded."]
        lines += ["", f"### Training Procedure{prefix}", ""]
        lines += _table(("setting", "value"), details["training"]) if details["training"] else ["Not recorded."]
    lines += ["", "## Evaluation"]
    for name in adapter_names:
        metrics = card_details(model, name)["metrics"]
        if len(adapter_names) > 1:
            lines += ["", f"### Head `{name}`"]
        lines += [""] + (_table(("metric", "value"), metrics) if metrics else ["No metrics recorded."])
    lines += ["", "### Framework versions", "", f"- PEFT {peft_version}"]
    return "\n".join(lines) + "\n"
