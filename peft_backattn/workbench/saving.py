"""The files of a training run that must survive a kill: the final head, swapped in whole, and the checkpoint a
run resumes from, the newest complete one.

A head folder written by `save_head` holds the head's files at its top as symbolic links through one more link:

    adapter_config.json        -> .head/adapter_config.json
    adapter_model.safetensors  -> .head/adapter_model.safetensors
    README.md                  -> .head/README.md
    .head                      -> .head-<token>      (the current version, a folder holding the three files)

A new head is written whole into a folder of its own (`.saving-<random>`, renamed `.head-<token>` once complete),
and becomes the head in one step: a new link renamed over `.head` (`rename(2)` replaces a name atomically). Before
that step every path above reads the old head; after it, the new one; a kill leaves one or the other, whole. What a
killed save leaves behind (`.saving-*`, unreferenced `.head-*`, `.head.new-*` links) is removed by the next save or
training run in the folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import secrets
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import SafetensorError, safe_open

from .._files import WEIGHTS_NAME
from ..model_card import CARD_NAME, heads_at_top

CONFIG_NAME = "adapter_config.json"
# The head's files, in the order their links are placed: the config last, so that a folder never shows a config
# beside weights that are not its own (a folder without adapter_config.json is no head at all).
HEAD_FILES = (WEIGHTS_NAME, CARD_NAME, CONFIG_NAME)
HEAD_LINK = ".head"
STAGING_PREFIX = ".saving-"
_VERSION = re.compile(r"\.head-[0-9a-f]{16}")
_NEW_LINK = re.compile(r"\.head\.new-[0-9a-f]{16}")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


# ---- naming the file a read or write failed on ------------------------------------------------------------------
# torch's and safetensors' errors on a full disk or a cut file ("unexpected pos 64 vs 0") do not name the file. The
# call sites that read or write know it, so they raise these instead: one line the command line prints as it is.


class FileWriteError(OSError):
    """Writing `path` failed; the message names the file and why (a full disk, said plainly)."""

    def __init__(self, path: str | os.PathLike, error: BaseException) -> None:
        super().__init__(f"could not write {os.fspath(path)} ({_write_failure(error)})")
        self.path = os.fspath(path)


class FileReadError(ValueError):
    """Reading `path` failed: it is truncated or corrupted. The message names it and says what to do."""

    def __init__(self, path: str | os.PathLike, error: BaseException, hint: str = "") -> None:
        super().__init__(f"cannot read {os.fspath(path)}: it is truncated or corrupted ({_reason(error)}){hint}")
        self.path = os.fspath(path)


# The errors a reader or writer of one file raises when the file or the disk is at fault.
FILE_ERRORS = (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Inside, a failure of the file's writer is a `FileWriteError` naming `path`."""
    try:
        yield
    except FileWriteError:
        raise
    except FILE_ERRORS as error:
        raise FileWriteError(path, error) from error


def _reason(error: BaseException) -> str:
    """The error's type and the first sentence of its message (torch's unpickling errors run to a page)."""
    text = " ".join(str(error).split())
    sentence = re.split(r"(?<=\.) ", text, maxsplit=1)[0] if text else ""
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


def _write_failure(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or "StorageFull" in text:
        return "no space left on device"
    if "unexpected pos" in text:  # torch's zip writer when a write comes up short
        return f"the write stopped short, is the disk full? torch says: {text}"
    return _reason(error)


def save_head(model: PeftModel, directory: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Write one head (the active one by default) as `directory/adapter_{config.json,model.safetensors}`.

    PEFT puts heads not named 'default' into a sub-folder; this writes any head at the folder's top level. The old
    head in the folder, if any, is replaced in one atomic step (see the module's docstring): a reader, or a kill at
    any instant, sees the old head or the new one, whole. A head with NaN or infinite values is refused before
    anything is written. Other files in the folder (checkpoints, ...) are left alone.
    """
    name = adapter_name or model.active_adapter
    directory = Path(directory)
    _check_finite(model, name, directory)
    directory.mkdir(parents=True, exist_ok=True)
    clean_leftovers(directory)
    staged = _stage(model, name, directory)
    try:
        _commit(directory, staged)
    finally:
        clean_leftovers(directory)


def clean_leftovers(directory: str | os.PathLike) -> None:
    """Remove what a killed `save_head` left in `directory`: staging folders, links never renamed into place, and
    head versions no longer linked. Touches nothing else."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    current = _current_version(directory)
    for entry in directory.iterdir():
        stale = (
            entry.name.startswith(STAGING_PREFIX)
            or (_NEW_LINK.fullmatch(entry.name) and entry.is_symlink())
            or (_VERSION.fullmatch(entry.name) and entry.name != current and not entry.is_symlink())
        )
        if stale:
            remove_path(entry)


def _check_finite(model: PeftModel, name: str, directory: Path) -> None:
    for key, tensor in get_peft_model_state_dict(model, adapter_name=name).items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"Head '{name}' holds NaN or infinite values ({key}); it was not saved to {directory}.")


def _stage(model: PeftModel, name: str, directory: Path) -> Path:
    """The new head, whole, in a folder of its own: `.saving-*` while written, `.head-<token>` once complete.

    The head's model card (README.md, from `save_pretrained`) is written into that folder too, so it becomes
    visible with the head's weights and config, in the same step."""
    staging = directory / f"{STAGING_PREFIX}{secrets.token_hex(8)}"
    written = staging if name == "default" else staging / name  # PEFT's sub-folder for a named head
    try:
        with heads_at_top(model):  # the model card (README.md) says to load the head from the folder's top
            model.save_pretrained(staging, selected_adapters=[name])
    except FILE_ERRORS as error:  # name the file as the user will see it, not its staging copy
        unwritten = (staging / CARD_NAME, written / WEIGHTS_NAME, written / CONFIG_NAME)  # the order PEFT writes them
        failed = next((path for path in unwritten if not _whole(path)), written / WEIGHTS_NAME)
        raise FileWriteError(directory / failed.name, error) from error
    if name != "default":  # its model card is at the top
        for item in written.iterdir():
            os.replace(item, staging / item.name)
        written.rmdir()
    for item in HEAD_FILES:
        if (staging / item).is_file():
            _fsync(staging / item)
    _fsync(staging)
    version = directory / f".head-{secrets.token_hex(8)}"
    os.rename(staging, version)
    return version


def _commit(directory: Path, version: Path) -> None:
    """Make `version` the folder's head in one rename, after bringing an old head under `.head` if it is not."""
    if not _links_work(directory):
        _commit_without_links(directory, version)
        return
    if not _links_are_ours(directory):
        _adopt_plain_head(directory)
    files = [item for item in HEAD_FILES if (version / item).is_file()]
    old_head = _current_version(directory) and (directory / CONFIG_NAME).is_file()
    if old_head:
        _link_files(directory, files)  # the old head has these links; a new one (a card) dangles till the swap
        _point(directory, version)  # the one step a reader sees
    else:  # no head to replace: the link first, then the files, the config last
        _point(directory, version)
        _link_files(directory, files)
    for item in HEAD_FILES:  # a file the old head had and the new one has not (a model card)
        if item not in files and (directory / item).is_symlink():
            os.unlink(directory / item)
    _fsync(directory)


def _commit_without_links(directory: Path, version: Path) -> None:
    """On a filesystem without symbolic links: the old config goes first, then the new files are renamed in, the
    config last. Not one step, but never a mixed pair: a kill leaves the old head, the new one, or a folder without
    `adapter_config.json`, which holds no head."""
    if os.path.lexists(directory / CONFIG_NAME):
        os.unlink(directory / CONFIG_NAME)
    _fsync(directory)
    for item in HEAD_FILES:
        if (version / item).is_file():
            os.replace(version / item, directory / item)
    _fsync(directory)


def _links_work(directory: Path) -> bool:
    probe = directory / f".head.new-{secrets.token_hex(8)}"
    try:
        os.symlink(HEAD_LINK, probe)
    except OSError:
        return False
    probe.unlink()
    return True


def _adopt_plain_head(directory: Path) -> None:
    """Bring a head written as plain files (by `save_pretrained`, or copied by a tool that follows links) under
    `.head`, unchanged: a copy of its files becomes the current version, then each file is replaced by a link to
    the same bytes. A reader sees the old head throughout. A folder with weights but no config holds no head; a
    config without weights is removed first, so that it is never read beside new weights."""
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    link = directory / HEAD_LINK
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)  # a copy of an old `.head` target made by a tool that follows links; nothing reads it
    if not (config.is_file() and weights.is_file()):
        if os.path.lexists(config):
            os.unlink(config)
        return
    staging = directory / f"{STAGING_PREFIX}{secrets.token_hex(8)}"
    staging.mkdir()
    files = [item for item in HEAD_FILES if (directory / item).is_file()]
    for item in files:
        shutil.copyfile(directory / item, staging / item)
        _fsync(staging / item)
    _fsync(staging)
    version = directory / f".head-{secrets.token_hex(8)}"
    os.rename(staging, version)
    _point(directory, version)
    _link_files(directory, files, replace=True)


def _link_files(directory: Path, files: list[str], replace: bool = False) -> None:
    """Each of `files` as a link `name -> .head/name`, in `HEAD_FILES` order, each placed by one rename."""
    for item in files:
        target = f"{HEAD_LINK}/{item}"
        path = directory / item
        if not replace and path.is_symlink() and os.readlink(path) == target:
            continue
        _replace_with_link(target, path)


def _point(directory: Path, version: Path) -> None:
    _replace_with_link(version.name, directory / HEAD_LINK)


def _replace_with_link(target: str, path: Path) -> None:
    fresh = path.parent / f".head.new-{secrets.token_hex(8)}"
    os.symlink(target, fresh)
    os.replace(fresh, path)


def _links_are_ours(directory: Path) -> bool:
    """Whether the folder's head (or lack of one) is already read through `.head`: the config and weights are our
    links, or absent."""
    for item in (CONFIG_NAME, WEIGHTS_NAME):
        path = directory / item
        if os.path.lexists(path) and not (path.is_symlink() and os.readlink(path) == f"{HEAD_LINK}/{item}"):
            return False
    return True


def _current_version(directory: Path) -> str | None:
    """The name of the version folder `.head` points to, if it is one of ours and exists."""
    link = directory / HEAD_LINK
    if not link.is_symlink():
        return None
    target = os.readlink(link)
    return target if _VERSION.fullmatch(target) and (directory / target).is_dir() else None


def remove_path(path: Path) -> None:
    """Remove a file, link or folder tree; one already gone is no error."""
    with contextlib.suppress(FileNotFoundError):  # another process of the same run may clean at the same time
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def first_missing_folder(path: Path) -> Path | None:
    """The outermost folder of `path` (itself or a parent) that does not exist yet; None if `path` exists."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def check_writable(path: str | os.PathLike, option: str, *, file: bool = False) -> None:
    """Refuse, in one line and before any work, an output the run could not write: it would find out at its first
    save, after the work (a training run, an evaluation), and lose it.

    Writes nothing: looks at the nearest existing folder on the way to `path` (the folder itself, or the one the
    missing folders would be created in; for a `file`, its folder), which must be a folder this process may write
    in. `option` names the path in the message, e.g. '--output'.
    """
    path = Path(path)
    folder = path.parent if file else path
    existing = next(candidate for candidate in (folder, *folder.parents) if os.path.lexists(candidate))
    if not existing.is_dir():
        what = "a file, not a folder" if existing.is_file() else "not a folder"
        raise ValueError(f"{option} {path} cannot be created: {existing} is {what}; pass a path in a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{option} {path} cannot be written: {existing} is not writable (no permission, or a read-only file "
            "system); pass a folder you can write to."
        )


def remove_empty_folders(path: Path, up_to: Path) -> None:
    """Remove `path` and its parents up to `up_to` as long as they are empty folders (never anything with files)."""
    for folder in (path, *path.parents):
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == up_to:
            return


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk, so that a rename made after it is not seen before the data (power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- resuming --------------------------------------------------------------------------------------------------


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why the Trainer could not resume from this `checkpoint-<step>` folder (a short phrase), or None if it can.

    A complete checkpoint holds what transformers' Trainer writes into it, in the order it writes them, each intact:
    the head (`adapter_model.safetensors`, readable and finite; `adapter_config.json`), `optimizer.pt`,
    `scheduler.pt`, the RNG state (`rng_state.pth`, or one `rng_state_<rank>.pth` per process) and
    `trainer_state.json` recording the folder's step. The Trainer writes them in place, not through a temporary
    folder, so a kill or a full disk during a save leaves some missing or cut short.
    """
    folder = Path(folder)
    match = _CHECKPOINT.fullmatch(folder.name)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        return f"no {WEIGHTS_NAME}"
    try:
        with safe_open(weights, framework="pt") as handle:
            finite = all(torch.isfinite(handle.get_tensor(key)).all() for key in handle.keys())  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError):
        return f"{WEIGHTS_NAME} is truncated or corrupt"
    if not finite:
        return f"{WEIGHTS_NAME} holds NaN or infinite values"
    problem = _json_problem(folder / CONFIG_NAME)
    if problem:
        return problem
    for item in ("optimizer.pt", "scheduler.pt"):
        problem = _torch_file_problem(folder / item)
        if problem:
            return problem
    rng_files = sorted(folder.glob("rng_state*.pth"))
    if not rng_files:
        return "no rng_state.pth"
    for item in rng_files:
        problem = _torch_file_problem(item)
        if problem:
            return problem
    problem = _json_problem(folder / "trainer_state.json")
    if problem:
        return problem
    state = json.loads((folder / "trainer_state.json").read_text())
    step = state.get("global_step") if isinstance(state, dict) else None
    if match and step != int(match[1]):
        return f"trainer_state.json records step {step}"
    return None


def unwritten_checkpoint_file(folder: str | os.PathLike) -> Path | None:
    """The file a failed checkpoint save was writing: the first, in the order the Trainer writes them, that is
    missing or cut short in `folder` (the head, its config, `training_args.bin`, optimizer, scheduler, RNG state,
    `trainer_state.json`). None when all are whole."""
    folder = Path(folder)
    rng_files = sorted(folder.glob("rng_state*.pth")) or [folder / "rng_state.pth"]
    order = [
        folder / name for name in (WEIGHTS_NAME, CONFIG_NAME, "training_args.bin", "optimizer.pt", "scheduler.pt")
    ]
    return next((path for path in [*order, *rng_files, folder / "trainer_state.json"] if not _whole(path)), None)


def _whole(path: Path) -> bool:
    """Whether a file of a head or checkpoint is there and reads whole (a safetensors, JSON or torch file)."""
    if path.suffix == ".safetensors":
        return path.is_file() and _safetensors_readable(path)
    if path.suffix == ".json":
        return _json_problem(path) is None
    if path.suffix in (".pt", ".pth", ".bin"):
        return _torch_file_problem(path) is None
    return path.is_file()


def _safetensors_readable(path: Path) -> bool:
    try:
        with safe_open(path, framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, RuntimeError):
        return False
    return True


def checkpoints_newest_first(directory: str | os.PathLike) -> list[Path]:
    """The `checkpoint-<step>` folders in `directory`, highest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m[1]), p) for p in directory.iterdir() if (m := _CHECKPOINT.fullmatch(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found, reverse=True)]


def newest_complete_checkpoint(directory: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint the Trainer can resume from (None if there is none), and each newer, incomplete one
    with what is wrong with it."""
    skipped = []
    for folder in checkpoints_newest_first(directory):
        try:
            problem = checkpoint_problem(folder)
        except OSError:  # removed while read (by the main process of the same run: it was incomplete)
            problem = "removed while it was read"
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def _json_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"no {path.name}"
    try:
        json.loads(path.read_text())
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return f"{path.name} is truncated or corrupt"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip archive with a checksum per member, its pickle (`<name>/data.pkl`) among them; a cut or
    damaged file fails this check, and so does the empty archive a save that failed midway closes."""
    if not path.is_file():
        return f"no {path.name}"
    try:
        with zipfile.ZipFile(path) as archive:
            has_pickle = any(member.endswith("/data.pkl") for member in archive.namelist())
            if has_pickle and archive.testzip() is None:
                return None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        pass
    return f"{path.name} is truncated or corrupt"
