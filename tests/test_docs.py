"""The docs stay in step with the code: every config field, command-line option and exported name is documented,
every relative link points to a file (and heading) that exists, and the results pages say what the stored results
say.

These checks read the code's own lists (the dataclass fields, the argument parser, `__all__`) and the stored
benchmark results (benchmarks/results/*.json), so a new field, option or result fails here until the page that
describes it is updated.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import re
import sys
from pathlib import Path

import pytest
from peft import PeftConfig

import peft_backattn
from peft_backattn import BackAttnConfig
from peft_backattn.cli import build_parser
from peft_backattn.validation import option_fields
from peft_backattn.workbench.training import TrainingOptions

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = (DOCS / "api.md").read_text()
TRAINING = (DOCS / "training.md").read_text()
BENCHMARKS = ROOT / "benchmarks"
RESULTS_PAGE, HISTORY_PAGE = DOCS / "results.md", DOCS / "history.md"


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
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} has broken links: {broken}"


# The results pages: results.md shows the present runs, history.md the superseded ones. Their tables are written by
# benchmarks/report.py from benchmarks/results/*.json; the prose quotes those tables.


@pytest.fixture(scope="module")
def report():
    """benchmarks/report.py, imported as it runs: with benchmarks/ on the path for its neighbour `common`."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("report")
    finally:
        sys.path.remove(str(BENCHMARKS))


def stored(name: str) -> dict:
    return json.loads((BENCHMARKS / "results" / f"{name}.json").read_text())


@pytest.mark.parametrize("page", [RESULTS_PAGE, HISTORY_PAGE], ids=lambda p: p.name)
def test_generated_tables_are_what_report_makes_of_the_stored_results(page, report):
    tables = report.tables()
    stale = []
    for block in report.BLOCK.finditer(page.read_text()):
        assert block["name"] in tables, f"{page.name} has a block {block['name']!r} that report.py does not make"
        if block["body"] != tables[block["name"]] + "\n":
            stale.append(block["name"])
    assert not stale, f"{page.name}: {stale} differ from the stored results; run `python benchmarks/report.py`"


def test_every_stored_result_has_its_tables_on_exactly_one_page(report, monkeypatch):
    read = []
    original = report.load
    monkeypatch.setattr(report, "load", lambda name: read.append(name) or original(name))
    tables = report.tables()
    assert set(read) >= {path.stem for path in (BENCHMARKS / "results").glob("*.json")}, "report.py skips a result"
    placed = [block["name"] for page in report.PAGES for block in report.BLOCK.finditer(page.read_text())]
    assert sorted(placed) == sorted(tables), "each table report.py makes belongs on exactly one page"


# A figure in the prose: a number with a decimal point, outside code, not part of a version like 2.13.0.
FIGURE = re.compile(r"(?<![\w.])\d[\d,]*\.\d+(?!\d|\.\d)")
TABLE_NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?")

# Figures the prose of results.md quotes that no table shows, and where each comes from in the stored results.
STORED_FIGURES = {
    "134.5": lambda: stored("lmeval-gsm8k-base")["config"]["model_num_parameters"] / 1e6,  # SmolLM2's parameters
    "8.85": lambda: next(r for r in stored("sweep")["runs"] if r["lr"] == 0.01)["losses"][2],  # the divergence
}
# The demo's printout: no result file holds it; the page quotes it with the command that prints it.
UNSTORED_FIGURES = {"2.966", "1.668"}


def prose(text: str, report) -> str:
    """A page without its code, generated tables and link targets."""
    text = report.BLOCK.sub("", without_code_blocks(text))
    return re.sub(r"\]\([^)]*\)", "]", re.sub(r"`[^`]*`", "", text))


def table_numbers(*pages: Path, report) -> list[float]:
    bodies = [block["body"] for page in pages for block in report.BLOCK.finditer(page.read_text())]
    return [float(number.replace(",", "")) for body in bodies for number in TABLE_NUMBER.findall(body)]


def shown_as(figure: str, value: float) -> bool:
    """`value` rounded to as many decimals as `figure` shows is `figure`."""
    return f"{value:.{len(figure.split('.')[1])}f}" == figure.replace(",", "")


@pytest.mark.parametrize("page", [RESULTS_PAGE, HISTORY_PAGE], ids=lambda p: p.name)
def test_every_figure_in_the_prose_is_in_a_generated_table(page, report):
    """So a figure follows the stored results. results.md quotes only its own tables (no superseded number comes
    back into it); history.md may quote the present tables it is compared with."""
    values = table_numbers(*([page] if page == RESULTS_PAGE else [RESULTS_PAGE, HISTORY_PAGE]), report=report)
    figures = FIGURE.findall(prose(page.read_text(), report))
    unsourced = []
    for figure in figures:
        if any(shown_as(figure, value) for value in values):
            continue
        if page == RESULTS_PAGE and figure in UNSTORED_FIGURES:
            continue
        if page == RESULTS_PAGE and figure in STORED_FIGURES:
            assert shown_as(figure, STORED_FIGURES[figure]()), f"{figure} is not what the stored results say"
            continue
        unsourced.append(figure)
    assert not unsourced, f"{page.name} quotes figures no generated table shows: {unsourced}"


def test_the_figures_listed_as_quoted_are_quoted():
    figures = set(FIGURE.findall(without_code_blocks(RESULTS_PAGE.read_text())))
    assert set(STORED_FIGURES) | UNSTORED_FIGURES <= figures


def script_options(script: Path) -> set[str]:
    """The options a benchmark script's parser declares (read from its source: `add_argument("--x", ...)`)."""
    calls = [node for node in ast.walk(ast.parse(script.read_text())) if isinstance(node, ast.Call)]
    return {
        arg.value
        for call in calls
        if isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument"
        for arg in call.args
        if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")
    }


def quoted_commands(text: str) -> list[str]:
    """Command lines in code blocks and inline code, continuation lines joined, comments dropped."""
    blocks = re.findall(r"^ *```[^\n]*\n(.*?)^ *```", text, flags=re.MULTILINE | re.DOTALL)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"^ *```.*?^ *```", "", text, flags=re.MULTILINE | re.DOTALL))
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()] + inline
    return [re.sub(r"\s#\s.*$", "", line) for line in lines]


def test_the_commands_on_the_results_page_use_options_that_exist():
    """results.md's commands run today's scripts (history.md's run at the commits they name)."""
    wrong = []
    for command in quoted_commands(RESULTS_PAGE.read_text()):
        programs = re.findall(
            r"(?:python\s+(?:benchmarks/)?(\w+\.py)|(peft-backattn \w[\w-]*))((?:\s+[^\s&;|]+)*)", command
        )
        for program, arguments in ((script or cli, arguments) for script, cli, arguments in programs):
            if program.endswith(".py"):
                script = BENCHMARKS / program
                if not script.exists():
                    wrong.append(f"{program} does not exist")
                    continue
                known = script_options(script)
            elif program == "peft-backattn lm-eval":
                continue  # every argument after it is lm-eval's own
            elif program.split()[1] not in subcommands():
                wrong.append(f"{program} is no subcommand")
                continue
            else:
                known = {o for a in subcommands()[program.split()[1]]._actions for o in a.option_strings}
            wrong += [
                f"{program} {option}" for option in re.findall(r"(?<!\S)--[\w-]+", arguments) if option not in known
            ]
    assert not wrong, f"docs/results.md quotes options that do not exist: {wrong}"
