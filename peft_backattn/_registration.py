"""Registers the method with PEFT: a runtime `PeftType` member plus `register_peft_method`.

PEFT keeps its method names in the closed enum `peft.utils.PeftType`, and `register_peft_method` refuses a name
that is not a member. An out-of-tree method therefore adds its member at runtime. Both steps are idempotent, so
importing `peft_backattn` twice (or from several modules) is harmless.
"""

from __future__ import annotations

from peft.utils import PeftType

PEFT_TYPE_NAME = "BACKATTN"
METHOD_NAME = "backattn"
PREFIX = "backattn_"


def _add_peft_type_member() -> PeftType:
    """Return `PeftType.BACKATTN`, creating the enum member on first use."""
    if PEFT_TYPE_NAME in PeftType.__members__:
        return PeftType[PEFT_TYPE_NAME]
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    # Set the class attribute before the member map learns the name: EnumType refuses to reassign members.
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    return member


def register() -> None:
    """Make `backattn` a PEFT method: get_peft_model, PeftModel.from_pretrained and load_adapter then know it."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import BackAttnConfig
    from .model import BackAttnModel

    peft_type = _add_peft_type_member()
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name=METHOD_NAME, config_cls=BackAttnConfig, model_cls=BackAttnModel, prefix=PREFIX)
