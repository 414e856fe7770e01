"""What a run leaves on disk: which checkpoints count as complete, the head saved in one step, and leftovers."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build, randomize_heads
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_training import token_dataset
from transformers import Trainer, TrainingArguments

from peft_backattn import BackAttnConfig
from peft_backattn.model_card import CARD_MARK, record_card_details
from peft_backattn.workbench import saving
from peft_backattn.workbench.saving import (
    checkpoint_problem,
    clean_leftovers,
    newest_complete_checkpoint,
    save_head,
)

HEAD = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint exactly as the Trainer writes it."""
    torch.manual_seed(0)
    model = get_peft_model(build("gpt2"), BackAttnConfig(r=4))
    output = tmp_path_factory.mktemp("run")
    args = TrainingArguments(
        output_dir=str(output), max_steps=2, save_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=token_dataset()).train()
    return output / "checkpoint-2"


def damaged(checkpoint: Path, tmp_path: Path, name: str, how: str) -> Path:
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, copy)
    path = copy / name
    if how == "missing":
        path.unlink()
    else:  # cut short, as a kill or a full disk leaves it
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return copy


def test_a_checkpoint_the_trainer_wrote_is_complete(checkpoint):
    assert checkpoint_problem(checkpoint) is None


@pytest.mark.parametrize(
    "name", ["adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json"]
)
@pytest.mark.parametrize("how", ["missing", "truncated"])
def test_a_checkpoint_missing_or_cutting_short_a_file_is_incomplete(checkpoint, tmp_path, name, how):
    expected = f"no {name}" if how == "missing" else f"{name} is truncated or corrupt"
    assert checkpoint_problem(damaged(checkpoint, tmp_path, name, how)) == expected


def test_the_rng_state_is_needed(checkpoint, tmp_path):
    assert checkpoint_problem(damaged(checkpoint, tmp_path, "rng_state.pth", "missing")) == "no rng_state.pth"
    shutil.rmtree(tmp_path / "checkpoint-2")
    problem = checkpoint_problem(damaged(checkpoint, tmp_path, "rng_state.pth", "truncated"))
    assert problem == "rng_state.pth is truncated or corrupt"


def test_a_checkpoint_of_another_step_or_with_non_finite_weights_is_incomplete(checkpoint, tmp_path):
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, copy)
    state = json.loads((copy / "trainer_state.json").read_text())
    (copy / "trainer_state.json").write_text(json.dumps({**state, "global_step": 3}))
    assert checkpoint_problem(copy) == "trainer_state.json records step 3"
    (copy / "trainer_state.json").write_text(json.dumps(state))
    weights = load_file(copy / "adapter_model.safetensors")
    next(iter(weights.values()))[0] = float("nan")
    save_file(weights, copy / "adapter_model.safetensors")
    assert checkpoint_problem(copy) == "adapter_model.safetensors holds NaN or infinite values"


def test_the_newest_complete_checkpoint_is_chosen_by_step_not_by_name(checkpoint, tmp_path):
    for step in (2, 9, 10):
        shutil.copytree(checkpoint, tmp_path / f"checkpoint-{step}")
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({**state, "global_step": step}))
    (tmp_path / "checkpoint-10" / "scheduler.pt").unlink()
    (tmp_path / "checkpoint-11").mkdir()
    chosen, skipped = newest_complete_checkpoint(tmp_path)
    assert chosen == tmp_path / "checkpoint-9"
    assert skipped == [(tmp_path / "checkpoint-11", "no adapter_model.safetensors"),
                       (tmp_path / "checkpoint-10", "no scheduler.pt")]  # fmt: skip


@pytest.fixture
def model() -> PeftModel:
    model = get_peft_model(build("gpt2"), BackAttnConfig(r=4), adapter_name="math")
    randomize_heads(model)
    return model


def files(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder`: a link as its target, a file as its bytes, a folder as '/' (the head's version
    folder named `.head-*`, whatever its token)."""
    listing = {}
    for path in sorted(folder.rglob("*")):
        key = re.sub(r"^\.head-[0-9a-f]{16}", ".head-*", str(path.relative_to(folder)))
        if path.is_symlink():
            listing[key] = "-> " + re.sub(r"^\.head-[0-9a-f]{16}$", ".head-*", os.readlink(path))
        else:
            listing[key] = path.read_bytes() if path.is_file() else "/"
    return listing


def test_save_head_writes_the_head_through_one_link(model, tmp_path):
    save_head(model, tmp_path / "head")
    entries = sorted(p.name for p in (tmp_path / "head").iterdir())
    assert entries[:2] == [".head", entries[1]] and entries[2:] == ["README.md", *HEAD]
    assert os.readlink(tmp_path / "head" / ".head") == entries[1]
    for name in ("README.md", *HEAD):
        assert os.readlink(tmp_path / "head" / name) == f".head/{name}"
    loaded = PeftModel.from_pretrained(build("gpt2"), tmp_path / "head")
    for key, value in model.state_dict().items():
        if ".backattn_heads.math." in key:
            assert torch.equal(loaded.state_dict()[key.replace(".math.", ".default.")], value)


def test_the_model_card_is_written_inside_the_head_version_it_describes(model, tmp_path):
    """The card is one of the head's files: written into the version folder that becomes the head in one rename,
    so a reader never sees a card beside weights it does not describe. The folder holds exactly these entries."""
    save_head(model, tmp_path / "head")
    version = [".head-*/adapter_config.json", ".head-*/adapter_model.safetensors", ".head-*/README.md"]
    links = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    listing = files(tmp_path / "head")
    assert set(listing) == {".head", ".head-*", *version, *links}
    assert {name: listing[name] for name in links} == {name: f"-> .head/{name}" for name in links}
    first = (tmp_path / "head" / "README.md").read_text()
    assert CARD_MARK in first and "# backattn head `math`" in first
    assert "subfolder=" not in first  # save_head puts a named head at the folder's top, and the card says so
    record_card_details(model, metrics={"exact match": 0.5})
    save_head(model, tmp_path / "head")
    assert set(files(tmp_path / "head")) == {".head", ".head-*", *version, *links}  # the old version is gone
    second = (tmp_path / "head" / "README.md").read_text()
    assert "| exact match | 0.5 |" in second and "| exact match |" not in first


def test_save_head_refuses_a_head_with_nan_and_writes_nothing(model, tmp_path):
    save_head(model, tmp_path / "head")
    before = files(tmp_path / "head")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if ".backattn_heads.math." in n).view(-1)[0] = float("inf")
    for folder in (tmp_path / "head", tmp_path / "new"):
        with pytest.raises(ValueError) as error:
            save_head(model, folder)
        assert str(error.value) == (
            "Head 'math' holds NaN or infinite values (base_model.model.lm_head.backattn_heads.norm_scale); "
            f"it was not saved to {folder}."
        )
    assert files(tmp_path / "head") == before
    assert not (tmp_path / "new").exists()


def test_a_head_copied_by_a_tool_that_follows_links_is_replaced_whole(model, tmp_path):
    save_head(model, tmp_path / "head")
    shutil.copytree(tmp_path / "head", tmp_path / "copy")  # links become files; `.head` becomes a folder
    assert not (tmp_path / "copy" / "adapter_config.json").is_symlink()
    (tmp_path / "copy" / "notes.txt").write_text("mine")
    randomize_heads(model, seed=1)
    save_head(model, tmp_path / "copy")
    save_head(model, tmp_path / "again")
    copy = files(tmp_path / "copy")
    assert copy.pop("notes.txt") == b"mine"
    assert copy == files(tmp_path / "again")  # the same files and links, no leftover of the copy


def test_without_symbolic_links_the_head_is_written_config_last(model, tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise PermissionError("symbolic links are not supported here")

    save_head(model, tmp_path / "reference")
    monkeypatch.setattr(os, "symlink", no_links)
    order = []
    original = os.replace

    def replace(src, dst):
        if Path(dst).parent == tmp_path / "head":
            order.append(Path(dst).name)
        original(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    save_head(model, tmp_path / "head")
    save_head(model, tmp_path / "head")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["README.md", *HEAD]
    for name in HEAD:
        assert not (tmp_path / "head" / name).is_symlink()
        assert (tmp_path / "head" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    assert order == ["adapter_model.safetensors", "README.md", "adapter_config.json"] * 2


def test_clean_leftovers_removes_only_what_a_killed_save_leaves(model, tmp_path):
    folder = tmp_path / "head"
    save_head(model, folder)
    (folder / ".saving-abc").mkdir()
    (folder / ".saving-abc" / "adapter_model.safetensors").write_bytes(b"half")
    (folder / ".head-0123456789abcdef").mkdir()
    os.symlink(".head-0123456789abcdef", folder / ".head.new-0123456789abcdef")
    keep = {".head-notes": "mine", ".hidden": "mine", "checkpoint-2/trainer_state.json": "{}"}
    for name, text in keep.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
    clean_leftovers(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [".head", os.readlink(folder / ".head"), ".head-notes", ".hidden", "checkpoint-2", "README.md", *HEAD]
    )
    assert all((folder / name).read_text() == text for name, text in keep.items())
    assert saving.checkpoints_newest_first(folder) == [folder / "checkpoint-2"]


# ---- naming the file a failed save was writing -----------------------------------------------------------------

CHECKPOINT_ORDER = [
    "adapter_model.safetensors", "adapter_config.json", "training_args.bin", "optimizer.pt", "scheduler.pt",
    "rng_state.pth", "trainer_state.json",
]  # fmt: skip


def test_a_whole_checkpoint_has_no_unwritten_file(checkpoint):
    assert saving.unwritten_checkpoint_file(checkpoint) is None


@pytest.mark.parametrize("how", ["missing", "truncated"])
@pytest.mark.parametrize("index", range(len(CHECKPOINT_ORDER)), ids=CHECKPOINT_ORDER)
def test_a_save_that_failed_midway_names_the_file_it_was_writing(checkpoint, tmp_path, index, how):
    """The Trainer writes the files in this order: a save that failed on one left it, and all after it, unwritten."""
    copy = damaged(checkpoint, tmp_path, CHECKPOINT_ORDER[index], how)
    for later in CHECKPOINT_ORDER[index + 1 :]:
        (copy / later).unlink()
    assert saving.unwritten_checkpoint_file(copy) == copy / CHECKPOINT_ORDER[index]


def test_an_aborted_torch_save_is_not_a_whole_file(tmp_path, monkeypatch):
    """A torch.save that fails midway closes an archive without its pickle; that file is not whole."""
    monkeypatch.setattr("torch.serialization._save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("cut")))
    with pytest.raises(RuntimeError):
        torch.save({"a": 1}, tmp_path / "optimizer.pt")
    assert saving._torch_file_problem(tmp_path / "optimizer.pt") == "optimizer.pt is truncated or corrupt"


@pytest.mark.parametrize("adapter_name", ["default", "math"])
def test_a_full_disk_during_the_final_save_names_the_heads_file_and_keeps_the_old_head(
    tmp_path, monkeypatch, adapter_name
):
    from safetensors import SafetensorError

    model = get_peft_model(build("gpt2"), BackAttnConfig(r=4), adapter_name=adapter_name)
    save_head(model, tmp_path / "head")
    before = (tmp_path / "head" / "adapter_model.safetensors").read_bytes()
    randomize_heads(model)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.serialize_file", full)
    with pytest.raises(saving.FileWriteError) as error:
        save_head(model, tmp_path / "head")
    assert (
        str(error.value)
        == f"could not write {tmp_path / 'head' / 'adapter_model.safetensors'} (no space left on device)"
    )
    assert (tmp_path / "head" / "adapter_model.safetensors").read_bytes() == before
