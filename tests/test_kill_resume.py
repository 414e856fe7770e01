"""`peft-backattn train` killed with SIGKILL at chosen instants, then run again: the resumed run ends with the very
head an uninterrupted run ends with, and a kill during the final save leaves the old head or the new one, whole.

Each run is the command line's `main()` in a child forked from this process (a fresh interpreter would spend most of
its time importing torch); the child sends itself SIGKILL from a hook at the chosen instant, which the folder cannot
tell from a kill from outside: nothing of the process's own clean-up runs. A forked child computes on one thread, as
PyTorch's own data-loader workers do: OpenMP's thread pool, once used by this process, hangs in a forked child.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import build, randomize_heads
from peft import get_peft_model
from safetensors.torch import load_file
from transformers.trainer_callback import CallbackHandler

from peft_backattn import BackAttnConfig
from peft_backattn.cli import main
from peft_backattn.workbench import saving
from peft_backattn.workbench.saving import save_head

if not hasattr(os, "fork"):
    pytest.skip("forks a child per run", allow_module_level=True)

TRAIN = [
    "--data", "synthetic", "--limit", "24", "--batch-size", "4", "--max-length", "64", "--no-progress",
    "--logging-steps", "1", "--steps", "6", "--save-steps", "2", "--save-total-limit", "3", "--lr", "0.01",
]  # fmt: skip
HEAD = ("adapter_config.json", "adapter_model.safetensors")


def forked(work: Callable[[], int], log: Path | None = None, timeout: float = 300) -> int:
    """Run `work` in a forked child (stdout and stderr to `log`); its exit status, or -9 if it was killed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            torch.set_num_threads(1)
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            if log is not None:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            code = work()
        finally:
            sys.stdout.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the child did not finish in {timeout} s")
        time.sleep(0.05)
    status = done[1]
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def run_child(log: Path, argv: list[str], hook: Callable[[], None] | None = None) -> int:
    """`main(argv)` in a forked child, with `hook` installed first."""

    def work() -> int:
        if hook:
            hook()
        return main(argv)

    return forked(work, log)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_step(step: int) -> Callable[[], None]:
    """Kill right after optimiser step `step`, before the Trainer may checkpoint it."""

    def hook():
        original = CallbackHandler.on_step_end

        def on_step_end(self, args, state, control):
            control = original(self, args, state, control)
            if state.global_step == step:
                die()
            return control

        CallbackHandler.on_step_end = on_step_end

    return hook


def kill_while_writing(name: str, checkpoint: str) -> Callable[[], None]:
    """Kill halfway through the Trainer's writing of `checkpoint/name`: half its bytes are on disk."""

    def hook():
        original = torch.save

        def save(obj, f, *args, **kwargs):
            path = Path(str(f))
            if path.name == name and path.parent.name == checkpoint:
                original(obj, f, *args, **kwargs)
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
                die()
            return original(obj, f, *args, **kwargs)

        torch.save = save

    return hook


def head_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def assert_same_head_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_head(got: Path, expected: Path) -> None:
    assert_same_head_tensors(head_tensors(got), head_tensors(expected))
    assert json.loads((got / HEAD[0]).read_text()) == json.loads((expected / HEAD[0]).read_text())


def train_argv(model: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), *TRAIN, "--output", str(output), *extra]


@pytest.fixture(scope="module")
def straight(tiny_lm_dir, tmp_path_factory) -> Path:
    """An uninterrupted run: the head every interrupted one must end with."""
    output = tmp_path_factory.mktemp("straight") / "head"
    assert run_child(output.parent / "log", train_argv(tiny_lm_dir, output)) == 0
    return output


def test_killed_before_the_first_checkpoint(tiny_lm_dir, straight, tmp_path):
    output = tmp_path / "head"
    assert run_child(tmp_path / "killed.log", train_argv(tiny_lm_dir, output), kill_after_step(1)) == -9
    assert not any(output.glob("checkpoint-*"))
    assert run_child(tmp_path / "resume.log", train_argv(tiny_lm_dir, output, "--resume")) == 2
    assert (tmp_path / "resume.log").read_text().splitlines()[-1] == (
        f"peft-backattn: error: --resume: no checkpoint-* folder in {output}; train without --resume first."
    )
    assert run_child(tmp_path / "again.log", train_argv(tiny_lm_dir, output)) == 0
    assert_same_head(output, straight)


def test_killed_between_checkpoints(tiny_lm_dir, straight, tmp_path):
    output = tmp_path / "head"
    assert run_child(tmp_path / "killed.log", train_argv(tiny_lm_dir, output), kill_after_step(3)) == -9
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
    assert run_child(tmp_path / "resume.log", train_argv(tiny_lm_dir, output, "--resume")) == 0
    assert "Resuming from checkpoint-2\n" in (tmp_path / "resume.log").read_text()
    assert_same_head(output, straight)


def test_killed_while_a_checkpoint_is_written(tiny_lm_dir, straight, tmp_path):
    output = tmp_path / "head"
    hook = kill_while_writing("optimizer.pt", "checkpoint-4")
    assert run_child(tmp_path / "killed.log", train_argv(tiny_lm_dir, output), hook) == -9
    assert sorted(p.name for p in (output / "checkpoint-4").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "training_args.bin",
    ]  # fmt: skip
    assert run_child(tmp_path / "resume.log", train_argv(tiny_lm_dir, output, "--resume")) == 0
    skipped = "checkpoint-4 is incomplete: optimizer.pt is truncated or corrupt"
    assert f"Resuming from checkpoint-2 ({skipped}; removed)\n" in (tmp_path / "resume.log").read_text()
    assert_same_head(output, straight)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert saving.checkpoint_problem(output / "checkpoint-4") is None


# ---- a kill during the final save ------------------------------------------------------------------------------

MUTATIONS = ("rename", "replace", "symlink", "unlink", "rmdir")


def kill_at_mutation(number: int) -> Callable[[], None]:
    """Kill just before the `number`-th change to the file system (a rename, link or removal)."""

    def hook():
        count = 0

        def wrap(original):
            def changed(*args, **kwargs):
                nonlocal count
                count += 1
                if count == number:
                    die()
                return original(*args, **kwargs)

            return changed

        for name in MUTATIONS:
            setattr(os, name, wrap(getattr(os, name)))

    return hook


def fork_save(model, folder: Path, name: str, hook: Callable[[], None]) -> int:
    def work() -> int:
        hook()
        save_head(model, folder, adapter_name=name)
        return 0

    return forked(work)


def head_bytes(folder: Path) -> tuple[bytes, bytes] | None:
    """The head a reader of `folder` gets (config and weights), or None when the folder holds no head."""
    if not (folder / HEAD[0]).exists():
        return None
    return tuple((folder / item).read_bytes() for item in HEAD)


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` outside the head's own files, with the bytes of each file."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in folder.rglob("*")
        if not re.match(r"(\.head|\.saving-|adapter_|README)", p.relative_to(folder).parts[0])
    }


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory):
    """One base with an 'old' (softmax) and a 'new' (raw) head of the same shapes, and the bytes each saves to."""
    model = get_peft_model(build("gpt2"), BackAttnConfig(r=4, logit_weighting="softmax"), adapter_name="old")
    model.add_adapter("new", BackAttnConfig(r=4, logit_weighting="raw"))
    randomize_heads(model)
    root = tmp_path_factory.mktemp("heads")
    save_head(model, root / "old", adapter_name="old")
    save_head(model, root / "new", adapter_name="new")
    return model, head_bytes(root / "old"), head_bytes(root / "new")


@pytest.mark.parametrize("before", ["saved by save_head", "plain files", "no head"])
def test_a_kill_during_the_final_save_leaves_the_old_head_or_the_new_one(two_heads, tmp_path, before):
    """Killed before each change save_head makes to the file system in turn, until one save runs to its end."""
    model, old, new = two_heads
    template = tmp_path / "template"
    (template / "checkpoint-2").mkdir(parents=True)
    (template / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (template / "notes.txt").write_text("mine")
    if before == "saved by save_head":
        save_head(model, template, adapter_name="old")
    elif before == "plain files":
        model.save_pretrained(tmp_path / "plain", selected_adapters=["old"])
        for item in (tmp_path / "plain" / "old").iterdir():
            shutil.copy(item, template / item.name)
    expected_before = old if before != "no head" else None
    others = listing(template)

    names = {expected_before: "old" if expected_before else "no head", new: "new"}
    seen = set()
    for number in range(1, 100):
        folder = tmp_path / f"kill-{number}"
        shutil.copytree(template, folder, symlinks=True)
        code = fork_save(model, folder, "new", kill_at_mutation(number))
        seen.add(names.get(head_bytes(folder), "a mixed head"))
        assert "a mixed head" not in seen, f"killed before change {number}: a mixed head"
        save_head(model, folder, adapter_name="new")  # the next save finishes the job and clears what was left
        assert head_bytes(folder) == new
        assert listing(folder) == others
        hidden = sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
        assert len(hidden) == 2 and hidden[0] == ".head" and re.fullmatch(r"\.head-[0-9a-f]{16}", hidden[1]), hidden
        if code == 0:  # the save finished before its `number`-th change: every kill point was tried
            break
        assert code == -9
    assert seen == {names[expected_before], "new"}
    assert number > 5


@pytest.mark.parametrize("swap", ["before", "after"])
def test_a_kill_in_the_final_save_of_an_overwrite_with_another_weighting(tiny_lm_dir, straight, tmp_path, swap):
    """The issue's case: --overwrite over a same-shaped head with another logit_weighting, killed mid-save."""
    output = tmp_path / "head"
    shutil.copytree(straight, output, symlinks=True)
    old = head_bytes(output)

    def hook():  # kill just before or just after the rename that makes the new head current
        original = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name != ".head" or not str(Path(src).name).startswith(".head.new-"):
                return original(src, dst, *args, **kwargs)
            if swap == "before":
                die()
            original(src, dst, *args, **kwargs)
            die()

        os.replace = replace

    argv = train_argv(tiny_lm_dir, output, "--overwrite", "--logit-weighting", "raw")
    assert run_child(tmp_path / "killed.log", argv, hook) == -9
    config = json.loads((output / "adapter_config.json").read_text())
    if swap == "after":  # the new head, whole; the old version is left for the next save to clear
        assert head_bytes(output)[1] != old[1] and config["logit_weighting"] == "raw"
        return
    assert head_bytes(output) == old and config["logit_weighting"] == "softmax"
    assert run_child(tmp_path / "again.log", argv) == 0
    assert json.loads((output / "adapter_config.json").read_text())["logit_weighting"] == "raw"
    hidden = sorted(p.name for p in output.iterdir() if p.name.startswith("."))
    assert len(hidden) == 2, hidden
