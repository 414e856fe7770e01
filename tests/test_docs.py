"""The docs stay in step with the code: every config field, command-line option and exported name is documented,
and every relative link points to a file (and heading) that exists.

These checks read the code's own lists (the dataclass fields, the argument parser, `__all__`), so a new field or
option fails here until the page that describes it is updated.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from pathlib import Path

import pytest
from peft import PeftConfig

import peft_backattn
from peft_backattn import BackAttnConfig
from peft_backattn.cli import build_parser, option_fields
from peft_backattn.workbench.training import TrainingOptions

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = (DOCS / "api.md").read_text()
TRAINING = (DOCS / "training.md").read_text()

# Pages that are written separately and may not exist yet; links to them are checked once they do.
PAGES_WRITTEN_LATER = {"results.md"}


def own_config_fields() -> list[dataclasses.Field]:
    """The fields BackAttnConfig defines itself, not those it inherits from PEFT's PeftConfig."""
    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    return [f for f in dataclasses.fields(BackAttnConfig) if f.name not in inherited]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def mentions_option(text: str, option: str) -> bool:
    """`--r` must appear as itself, not only as the start of `--resume`."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


@pytest.mark.parametrize("field", own_config_fields(), ids=lambda f: f.name)
def test_every_config_field_has_a_row_with_its_default(field):
    row = re.search(rf"^\| `{field.name}` \| (?P<type>.+?) \| `(?P<default>[^`]+)` \|", API, re.MULTILINE)
    assert row, f"docs/api.md has no BackAttnConfig table row for `{field.name}`"
    assert ast.literal_eval(row["default"]) == field.default, f"documented default of {field.name} is wrong"


@pytest.mark.parametrize("field", dataclasses.fields(TrainingOptions), ids=lambda f: f.name)
def test_every_training_option_has_a_row_with_its_default_and_flag(field):
    row = re.search(rf"^\| `{field.name}` \| .+? \| (?P<default>[^|]+) \|.*\| (?P<flag>[^|]+) \|$", API, re.MULTILINE)
    assert row, f"docs/api.md has no TrainingOptions table row for `{field.name}`"
    default = row["default"].strip()
    if field.default is dataclasses.MISSING:
        assert default == "required"
    else:
        assert ast.literal_eval(default.strip("`")) == field.default, f"documented default of {field.name} is wrong"
    flags = {
        opt for action in subcommands()["train"]._actions if action.dest == field.name for opt in action.option_strings
    }
    documented = row["flag"].strip().strip("`")
    if field in option_fields(TrainingOptions):
        assert {documented} == flags, f"{field.name} is {flags} on the command line, {documented} in docs/api.md"
    else:
        assert documented == "-" and not flags


def test_every_exported_name_is_documented():
    missing = [name for name in peft_backattn.__all__ if not re.search(rf"\b{name}\b", API)]
    assert not missing, f"docs/api.md does not mention {missing}"


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_subcommand_and_option_is_documented(name):
    assert f"peft-backattn {name}" in TRAINING, f"docs/training.md does not show `peft-backattn {name}`"
    options = {opt for action in subcommands()[name]._actions for opt in action.option_strings if opt.startswith("--")}
    missing = sorted(opt for opt in options if not mentions_option(TRAINING, opt))
    assert not missing, f"docs/training.md does not mention these options of `{name}`: {missing}"


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def without_code_blocks(text: str) -> str:
    return re.sub(r"^ *```.*?^ *```", "", text, flags=re.MULTILINE | re.DOTALL)


def relative_links(text: str) -> list[str]:
    """Link targets of `[text](target)` outside code blocks, without web links."""
    targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", without_code_blocks(text))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower-cased, punctuation other than '-' and '_' dropped, spaces made '-'."""
    headings = re.findall(r"^#+ (.+)$", without_code_blocks(page.read_text()), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_existing_files_and_headings(page):
    broken = []
    for target in relative_links(page.read_text()):
        file_part, _, anchor = target.partition("#")
        path = (page.parent / file_part).resolve() if file_part else page
        if path.name in PAGES_WRITTEN_LATER and not path.exists():
            continue
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} has broken links: {broken}"
