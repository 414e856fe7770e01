"""The method's name in PEFT: a `PeftType` member added at runtime, and the prefix of its parameter names.

PEFT keeps its method names in the closed enum `peft.utils.PeftType`, and `register_peft_method` refuses a name
that is not a member, so an out-of-tree method adds its member. This module imports nothing of the package: the
config needs the member when it is created, and the registration needs the config.
"""

from __future__ import annotations

from peft.utils import PeftType

PEFT_TYPE_NAME = "BACKATTN"
METHOD_NAME = "backattn"
PREFIX = "backattn_"


def _add_peft_type_member() -> PeftType:
    """`PeftType.BACKATTN`, created on first use; a second import of the package finds it in place."""
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


BACKATTN = _add_peft_type_member()
