"""Registers the method with PEFT, so that get_peft_model, PeftModel.from_pretrained and load_adapter know it.

Idempotent: importing `peft_backattn` twice (or reloading it) registers once.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from . import _peft_patches
from ._peft_patches import BACKATTN
from ._peft_type import METHOD_NAME, PREFIX
from .config import BackAttnConfig
from .model import BackAttnModel


def register() -> None:
    """Make `backattn` a PEFT method (a no-op when it already is one), with the same checks on every head load and
    a model card that describes the head on every save."""
    _peft_patches.install()
    if BACKATTN in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name=METHOD_NAME, config_cls=BackAttnConfig, model_cls=BackAttnModel, prefix=PREFIX)
