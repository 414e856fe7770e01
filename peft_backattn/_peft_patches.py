"""Every change this package makes to PEFT's own classes, in one place, each with why and for which PEFT.

An out-of-tree PEFT method needs a few things PEFT 0.21 has no hook for. They are listed here, applied once per
process by `install()` (a second call does nothing), and checked against the installed PEFT at import: outside the
tested range the import stops with one line instead of misbehaving later. What the patches call lives with its
concern (`_loading.py` for the load checks, `model_card.py` for the card); this module only decides what is
patched. docs/design.md ("What PEFT would need") proposes, per patch, the upstream change that would retire it.
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet
from packaging.version import Version
from peft import PeftConfig, PeftModel
from peft import __version__ as installed_peft
from peft.utils import PeftType

from . import _loading, model_card
from ._peft_type import PEFT_TYPE_NAME

# The PEFT releases these patches were written and tested against; pyproject.toml states the same range
# (tests/test_model.py keeps the two equal).
TESTED_PEFT = SpecifierSet(">=0.21.2,<0.22")
_MARK = "_backattn_patch"  # set on each wrapper, so that a second install() (or a reload) wraps nothing twice


def check_peft_version(version: str = installed_peft) -> None:
    """Refuse, in one line, a PEFT outside the tested range: the patched internals may have changed there."""
    if Version(version) not in TESTED_PEFT:
        raise ImportError(
            f"peft-backattn patches PEFT internals tested with peft{TESTED_PEFT}, but peft {version} is installed; "
            f"install a tested release: pip install 'peft{TESTED_PEFT}'."
        )


def _add_peft_type_member() -> PeftType:
    """`PeftType.BACKATTN`, created on first use; a second import of the package finds it in place.

    peft 0.21: `register_peft_method` accepts only names that are already members of the closed `PeftType` enum.
    """
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


check_peft_version()
BACKATTN = _add_peft_type_member()


def install() -> None:
    """Wrap PEFT's load, config-type, save and card methods (each with its reason below); idempotent."""
    # peft 0.21: into an existing adapter name, load_adapter loads the weights without reading or checking the
    # saved config, and a new name whose load fails keeps a half-attached head.
    _wrap(PeftModel, "load_adapter", _loading.checked_load_adapter)
    # peft 0.21: an unknown or missing peft_type is a bare `KeyError: 'X'` on every load path.
    _wrap(PeftConfig, "_get_peft_type", _loading.checked_get_peft_type, classmethod_=True)
    # peft 0.21: the card writer is not told which adapters a save selected (the card describes those heads).
    _wrap(PeftModel, "save_pretrained", model_card.remember_selection)
    # peft 0.21: the card is PEFT's blank template; a method has no hook to describe its adapter.
    _wrap(PeftModel, "create_or_update_model_card", model_card.backattn_card)


def _wrap(owner: type, name: str, wrapper_factory, classmethod_: bool = False) -> None:
    original = getattr(owner, name).__func__ if classmethod_ else getattr(owner, name)
    if getattr(original, _MARK, False):
        return
    wrapper = wrapper_factory(original)
    setattr(wrapper, _MARK, True)
    setattr(owner, name, classmethod(wrapper) if classmethod_ else wrapper)
