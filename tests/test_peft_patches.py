"""What the package changes in PEFT is changed in one module, for the PEFT releases it was tested with."""

from __future__ import annotations

import ast
import re
from importlib.metadata import requires
from pathlib import Path

import pytest
from conftest import build
from packaging.requirements import Requirement
from peft import PeftConfig, PeftModel, get_peft_model

from peft_backattn import BackAttnConfig, _peft_patches
from peft_backattn.model_card import record_card_details

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "peft_backattn"
PEFT_NAMES = {"PeftModel", "PeftConfig", "PeftType", "BaseTuner", "PeftModelForCausalLM"}
WRAPPED = [
    (PeftModel, "load_adapter"),
    (PeftConfig, "_get_peft_type"),
    (PeftModel, "save_pretrained"),
    (PeftModel, "create_or_update_model_card"),
]


def changes_to_peft_classes(path: Path) -> list[str]:
    """Lines of `path` that assign to an attribute of a PEFT class, `setattr` one, or write an enum's maps."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            base = target.value if isinstance(target, (ast.Attribute, ast.Subscript)) else None
            while isinstance(base, (ast.Attribute, ast.Subscript)):
                base = base.value
            if isinstance(base, ast.Name) and base.id in PEFT_NAMES:
                found.append(f"{path.name}:{node.lineno}")
        if isinstance(node, ast.Call) and node.args:
            called, first = ast.unparse(node.func), node.args[0]
            if called in ("setattr", "type.__setattr__") and isinstance(first, ast.Name) and first.id in PEFT_NAMES:
                found.append(f"{path.name}:{node.lineno}")
            if called.endswith(("_member_names_.append",)) and "PeftType" in called:
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_the_scan_finds_the_patches_where_they_are():
    """Guards the test below: a scan that finds nothing would pass it vacuously."""
    found = changes_to_peft_classes(PACKAGE / "_peft_patches.py")
    assert len(found) >= 3, found  # the enum's class attribute, its member-name list, the wrapping setattr


@pytest.mark.parametrize(
    "path", sorted(p for p in PACKAGE.rglob("*.py") if p.name != "_peft_patches.py"), ids=lambda p: p.name
)
def test_no_other_module_changes_a_peft_class(path):
    assert not changes_to_peft_classes(path), f"{path.name} patches PEFT outside _peft_patches.py"


def test_every_patch_is_installed_once():
    before = [getattr(owner, name) for owner, name in WRAPPED]
    _peft_patches.install()  # a second install wraps nothing again
    after = [getattr(owner, name) for owner, name in WRAPPED]
    assert before == after
    for owner, name in WRAPPED:
        method = getattr(owner, name)
        assert getattr(getattr(method, "__func__", method), _peft_patches._MARK, False), f"{name} is not wrapped"


def test_the_tested_range_is_the_one_pyproject_requires():
    (peft,) = [Requirement(r) for r in requires("peft-backattn") if Requirement(r).name == "peft"]
    assert peft.specifier == _peft_patches.TESTED_PEFT


@pytest.mark.parametrize("version", ["0.22.0", "0.21.1", "1.0.0"])
def test_a_peft_outside_the_tested_range_is_refused_in_one_line(version):
    with pytest.raises(ImportError) as error:
        _peft_patches.check_peft_version(version)
    message = str(error.value)
    assert "\n" not in message
    assert re.search(rf"tested with peft.*0\.21\.2.*but peft {re.escape(version)} is installed", message)
    assert "pip install 'peft" in message


@pytest.mark.parametrize("version", ["0.21.2", "0.21.9"])
def test_a_peft_inside_the_tested_range_is_accepted(version):
    _peft_patches.check_peft_version(version)


def test_the_card_keeps_nothing_in_the_peft_models_own_attributes(tmp_path):
    model = get_peft_model(build("gpt2"), BackAttnConfig(r=8))
    record_card_details(model, training_data="synthetic", metrics={"exact match": 0.5})
    model.save_pretrained(tmp_path / "head")
    assert "exact match" in (tmp_path / "head" / "README.md").read_text()
    assert not [key for key in vars(model) if "backattn" in key]
