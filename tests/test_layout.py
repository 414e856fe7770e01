"""The package layout holds: the method stands alone, nothing imports in a circle, and the command line is quiet.

The method is `peft_backattn` itself (config, head, caches, layer, model, tying, registration, file checks,
reference, costs); the math-head workbench is `peft_backattn.workbench`; the command line `peft_backattn.cli` sits
on both. Within the method the head's math (head.py) imports torch and the config alone; the workbench uses only
what docs/api.md documents of the method.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from peft_backattn.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / "peft_backattn"
METHOD_MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name != "cli.py")
WORKBENCH_MODULES = sorted((PACKAGE / "workbench").glob("*.py"))
API_DOC = (PACKAGE.parent / "docs" / "api.md").read_text()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(importer: str, is_package: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules an import statement names (relative imports resolved, `from . import x` included)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        base = node.module or ""
    else:
        anchor = importer.split(".")
        anchor = anchor if is_package else anchor[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def runtime_imports(path: Path) -> tuple[set[str], list[int]]:
    """Package modules imported at module level (outside `if TYPE_CHECKING:`), and lines of imports in functions."""
    tree = ast.parse(path.read_text())
    name, is_package = module_name(path), path.name == "__init__.py"
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    imported: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if is_type_checking_block(child) or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                imported.update(m for m in resolve(name, is_package, child) if m in known and m != name)
            visit(child)

    visit(tree)
    in_functions = [
        inner.lineno
        for func in ast.walk(tree)
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
        for inner in ast.walk(func)
        if isinstance(inner, (ast.Import, ast.ImportFrom))
    ]
    return imported, in_functions


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): runtime_imports(p)[0] for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_import_graph_is_read_correctly():
    """Guards the checks below: they pass vacuously if the graph misses the package's own imports."""
    graph = import_graph()
    assert "peft_backattn.config" in graph["peft_backattn.layer"]
    assert {"peft_backattn.head", "peft_backattn.caches"} <= graph["peft_backattn.layer"]
    assert "peft_backattn.workbench.training" in graph["peft_backattn.cli"]
    assert "peft_backattn.config" in graph["peft_backattn.workbench.training"]  # `from ..config import`
    assert "peft_backattn._files" not in graph["peft_backattn._files"]


def test_no_module_imports_in_a_circle():
    graph = import_graph()
    visiting, done, cycles = [], set(), []

    def walk(node: str) -> None:
        if node in done:
            return
        if node in visiting:
            cycles.append(visiting[visiting.index(node) :] + [node])
            return
        visiting.append(node)
        for target in sorted(graph.get(node, ())):
            # A package's __init__ runs before its submodules; an edge to the package itself is that, not a cycle.
            if not node.startswith(target + "."):
                walk(target)
        visiting.pop()
        done.add(node)

    for module in graph:
        walk(module)
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles]}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_no_import_is_hidden_inside_a_function(path):
    _, in_functions = runtime_imports(path)
    assert not in_functions, f"{path.name} imports inside a function at lines {in_functions}; import at the top"


@pytest.mark.parametrize("path", METHOD_MODULES, ids=lambda p: p.name)
def test_the_method_never_imports_the_workbench_or_the_command_line(path):
    imported, _ = runtime_imports(path)
    leaks = sorted(m for m in imported if m.startswith(("peft_backattn.workbench", "peft_backattn.cli")))
    assert not leaks, f"{path.name} (the method) imports {leaks}"


@pytest.mark.parametrize(
    ("name", "allowed"),
    [("head", {"peft_backattn.config", "peft_backattn.context"}), ("context", {"peft_backattn.config"})],
)
def test_the_heads_math_imports_only_torch_and_the_config(name, allowed):
    """head.py and context.py are the math alone: no cache, PEFT or accelerate code, not even for type hints."""
    path = PACKAGE / f"{name}.py"
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    tree = ast.parse(path.read_text())
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    package = {m for node in imports for m in resolve(f"peft_backattn.{name}", False, node) if m in known}
    assert package == allowed, f"{name}.py imports {sorted(package)}"
    outside = {m.split(".")[0] for node in imports if getattr(node, "level", 0) == 0 for m in resolve("", False, node)}
    libraries = outside - set(sys.stdlib_module_names)
    assert libraries == {"torch"}, f"{name}.py imports {sorted(libraries)}"


def method_members() -> set[str]:
    """Names the method's own classes define (methods, properties, class attributes, fields), not those they
    override of torch's or PEFT's, which are those libraries' API; and the private attributes they set on `self`."""
    names = set()
    for path in METHOD_MODULES:
        module = importlib.import_module(module_name(path))
        for cls in vars(module).values():
            if not (isinstance(cls, type) and cls.__module__ == module.__name__):
                continue
            if issubclass(cls, tuple) and hasattr(cls, "_fields"):  # a NamedTuple: its fields, not _replace & co
                names.update(cls._fields)
                continue
            libraries = [base for base in cls.__mro__ if not base.__module__.startswith("peft_backattn")]
            inherited = {name for base in libraries for name in vars(base)}
            names.update(name for name in vars(cls) if not name.startswith("__") and name not in inherited)
        names.update(
            node.attr
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
            if ast.unparse(node.value) == "self"
            if node.attr.startswith("_") and not node.attr.startswith("__")
        )
    return names


def attributes_used(path: Path) -> set[str]:
    """Every attribute name `path` reads or writes: `x.name`, and `getattr(x, "name")` and its kin."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "hasattr", "setattr"):
            if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                names.add(node.args[1].value)
    return names


def documented(name: str) -> bool:
    """Whether docs/api.md names `name` in code (`name`, `name(...)`, `x.name`)."""
    return re.search(rf"`[^`\n]*\b{re.escape(name)}\b[^`\n]*`", API_DOC) is not None


def test_method_members_are_read_correctly():
    """Guards the check below: it passes vacuously if it misses the method's own names."""
    members = method_members()
    assert {"head_forward", "frozen_tensors", "_collapsed_cache", "_shared_forward", "normalized"} <= members
    assert not {"forward", "train", "merge", "_replace", "to"} & members  # torch's, PEFT's, NamedTuple's


@pytest.mark.parametrize("path", WORKBENCH_MODULES, ids=lambda p: p.name)
def test_the_workbench_uses_only_the_documented_public_api_of_the_method(path):
    """The workbench reaches the method through names docs/api.md documents, so that the method can change inside."""
    method = {module_name(p) for p in METHOD_MODULES}
    private_imports = [
        alias.name
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        if resolve(module_name(path), path.name == "__init__.py", node)[0] in method
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert not private_imports, f"{path.name} imports the method's private {private_imports}"
    members = method_members()
    used = attributes_used(path) & members
    private = sorted(name for name in used if name.startswith("_"))
    assert not private, f"{path.name} uses the method's private {private}"
    undocumented = sorted(name for name in used if not documented(name))
    assert not undocumented, f"{path.name} uses {undocumented} of the method, which docs/api.md does not document"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_peft_backattn_loads_the_method_only_and_prints_nothing():
    result = run_python(
        "import sys, peft_backattn\n"
        "heavy = ('datasets', 'gguf', 'peft_backattn.workbench', 'peft_backattn.cli', 'peft_backattn.lm_eval',\n"
        "         'matplotlib', 'lm_eval', 'trl', 'deepspeed', 'fastapi', 'uvicorn')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(heavy)))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"import peft_backattn also imported {result.stdout.strip()}"
    assert result.stderr == ""


def peft_backattn(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "peft_backattn.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_help_writes_nothing_on_stderr():
    """In a fresh process, so that what dependencies print on import is seen."""
    result = run_python(
        "from peft_backattn.cli import main\n"
        "for command in ([], ['train'], ['eval'], ['generate'], ['demo']):\n"
        "    try:\n"
        "        main([*command, '--help'])\n"
        "    except SystemExit as done:\n"
        "        assert done.code == 0, done.code\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.count("usage: peft-backattn") == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "synthetic"], "the following arguments are required: --output"),
        (["train", "--data", "synthetic", "--output", "x", "--r", "four"], "argument --r: must be a positive integer"),
        (["train", "--data", "synthetic", "--output", "x", "--combine", "add"], "argument --combine: invalid choice"),
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    ],
)
def test_a_usage_error_is_exactly_one_line_on_stderr(args, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert len(stderr.splitlines()) == 1, stderr
    assert message in stderr
    assert stderr.startswith("peft-backattn")


def test_train_and_eval_print_nothing_on_stderr(tmp_path, tiny_lm_dir):
    """Dependencies' loading bars and deprecation notices stay off; --no-progress leaves stderr empty."""
    head = tmp_path / "head"
    common = ["--model", str(tiny_lm_dir), "--data", "synthetic", "--limit", "8"]
    trained = peft_backattn(
        "train", *common, "--steps", "2", "--batch-size", "4", "--output", str(head), "--no-progress"
    )
    assert trained.returncode == 0, trained.stderr
    assert trained.stderr == ""
    # DeepSpeed (when installed) is imported by accelerate inside the Trainer and logs its accelerator on stdout
    assert "Setting accelerator to CPU" not in trained.stdout, trained.stdout
    assert (head / "adapter_model.safetensors").is_file()
    evaluated = peft_backattn(
        "eval", *common, "--heads", str(head), "--generation-limit", "1", "--max-new-tokens", "4"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stderr == ""


def test_a_config_error_from_the_command_line_is_one_line(tmp_path, capsys):
    assert main(["train", "--data", "synthetic", "--output", str(tmp_path / "x"), "--r", "0"]) == 2
    assert capsys.readouterr().err == "peft-backattn: error: BackAttnConfig.r must be a positive integer, got 0.\n"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_no_module_reads_the_frames_of_a_traceback(path):
    """A damaged or unwritable file is named where it is read or written, never by walking a traceback's frames and
    their locals (which breaks when a dependency renames a parameter)."""
    source = path.read_text()
    assert not re.search(r"\b(tb_frame|f_locals|__traceback__)\b", source), f"{path.name} reads traceback frames"
