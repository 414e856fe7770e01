"""Cached features: what the frozen base feeds the output layer at the trained positions, computed once and trained
on for many epochs.

Under a head the base is frozen all the way up to the output layer, so the hidden state entering it at a trained
position (one whose next token the loss scores, see `scored_positions`) is the same in every epoch. `cache_features`
runs the base once over a tokenised training set and writes one row per trained position to an Arrow file in the
`datasets` format, which is memory-mapped when read (`datasets.Dataset.from_file`), so a cache larger than memory
works:

    hidden    (d_in,)  the input of the wrapped output layer, in the model's dtype (bf16 is widened to fp32: Arrow
                       has no bf16; the widening is exact and undone when the rows are read)
    target    ()       the token the loss scores at that position (int64)
    weighted  (d_e,)   softmax heads only: w N = softmax(z) N, the base's logit-weighted embedding (the head's dtype)

A contextual head (`BackAttnConfig(context=True)`) also reads the outputs of some decoder layers at every earlier
position, so its cache holds one row per example instead, everything the head's forward reads for it:

    hidden    (n_i d_in)     the n_i trained positions' hidden states, flattened, in position order
    target    (n_i)          their targets (int64)
    weighted  (n_i d_e)      softmax heads only, as above
    taps      (T_i L d_t)    the outputs of the head's L `context_layers` (width d_t) at the first T_i positions, up
                             to the last trained one (the attention never reads a later one): the prompt included
    trained   (T_i)          which of the T_i positions are trained (bool)
    attention_mask (T_i)     which are real tokens (bool)

Every value of such a cache is stored exactly in its own dtype, bf16 (which Arrow lacks) as its raw 16-bit patterns
(int16), viewed back as bf16 when read; `ExampleCollator` pads a batch of examples for the model's forward
(`cached_taps`, `cached_attention_mask`, `cached_kept`). Its `fingerprint.json` records the tapped layers, and a
cache whose layers are not the head's (or that has none, or a head without context) is refused.

The pass runs the base in eval mode with the head switched off (`disable_adapter()`), and a forward pre-hook on the
head's layer keeps the trained rows and hands the output layer nothing, so no vocabulary product is spent on it.
Eval mode means the cached features see no dropout in the base: for GPT-2 (dropout 0.1) a cached run trains on what
evaluation sees, not on the noisy states an ordinary training step sees; SmolLM2 and Llama have no dropout, so for
them the two are the same. `weighted` depends only on the base (and the head's `rms_norm_eps`), so caching it skips
one of a softmax head's vocabulary-sized products per position in every later epoch.

The head trains alone on those rows with `ScoredPositionsTrainer`, the Trainer and loss of ordinary runs, under
`accelerate launch` too: the PeftModel's forward runs the output layer alone on a `FeatureCollator` batch (see
`BackAttnModel.forward`). Its model is the PeftModel itself, so the weights it trains are the head's own
parameters, its checkpoints are the usual head checkpoints, and `save_head` and `PeftModel.from_pretrained` work
unchanged. A folder holds `features.arrow` and `fingerprint.json`, the latter written last: what the rows were
computed from (the base's weights, dtype and config, the tokenizer, `max_length` and the tokenised data), which decides
whether a later run may reuse them, and the sha256 of `features.arrow`, checked before every reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow
import pyarrow.ipc
import torch
from datasets import Dataset, Features, Value
from datasets import Sequence as FeatureList
from peft import PeftModel
from torch import nn
from torch.utils.data import Dataset as TorchDataset
from transformers import PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import ExportableState

from ..config import BackAttnConfig
from ..context import TAP_DTYPE
from ..layer import BackAttnLayer
from .data import IGNORE_INDEX, PaddingCollator
from .progress import Progress
from .saving import first_missing_folder, remove_empty_folders, remove_path
from .scored_positions import only_trained_positions, trained_positions, trained_targets

FEATURES_FILE = "features.arrow"
FINGERPRINT_FILE = "fingerprint.json"
STAGING_PREFIX = ".writing-"
FORMAT_VERSION = 2  # 2: the base's config and dtypes, the whole tokenizer, the attention mask; the file's sha256
# Config entries that cannot change a hidden state, left out of the fingerprint so that the same base compares equal
# however it was built: where it was loaded from, what saving it records (the class to build, the dtype to load in:
# the parameters' own dtypes are compared instead, the library version), and switches that choose what a forward
# returns, not what it computes (the feature pass sets `use_cache=False` itself).
_CONFIG_KEYS_LEFT_OUT = frozenset(
    {"_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version"}
    | {"use_cache", "output_attentions", "output_hidden_states", "return_dict"}
)
# Settings of the fast tokenizer's backend that the last call left behind, not the tokenizer: tokenize_examples
# truncates by itself and the collator pads, and their effect is in the tokenised data, which is compared.
_TOKENIZER_CALL_STATE = ("truncation", "padding")
_CHECKSUM_CHUNK = 1 << 22  # 4 MiB read at a time: the check's memory stays small however large the cache is
# torch dtype of the hidden states -> the Arrow type they are stored as (exactly: bf16 widens to fp32 without loss)
_STORED_AS = {torch.float32: "float32", torch.float16: "float16", torch.float64: "float64", torch.bfloat16: "float32"}
# contextual caches: every column exactly in its own dtype, bf16 as its raw 16-bit patterns (viewed back when read)
_STORED_EXACTLY = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.float64: "float64",
    torch.bfloat16: "int16",
}
_DISK_MARGIN = 1.01  # refuse unless the disk holds the estimated size plus 1 % (Arrow's own bookkeeping is smaller)


@dataclass
class CachedFeatures:
    """An opened feature cache: the memory-mapped rows and what they were computed from.

    `fingerprint["source"]` identifies the base, tokenizer, max_length and data; `fingerprint["contents"]` says what
    the rows hold (widths, dtypes, whether there is a `weighted` column and for which `rms_norm_eps`) and the file's
    size and sha256.
    """

    directory: Path
    # memory-mapped; torch-formatted rows of one position: hidden (d_in), target, [weighted (d_e)]; a contextual
    # cache's rows of one example (`ExampleRows`)
    rows: Dataset | ExampleRows
    fingerprint: dict[str, Any]
    computed: bool  # False: reused from an earlier run
    seconds: float  # computing (or checking and opening) it

    @property
    def positions(self) -> int:
        """Trained positions (a contextual cache's rows hold several each)."""
        return int(self.fingerprint["contents"]["positions"])

    @property
    def context(self) -> dict[str, Any] | None:
        """A contextual cache's taps: `layers`, `width`, `dtype`, `stored_dtype`, `examples` (its rows) and `positions`
        (tap positions stored); None for a cache of one row per trained position."""
        return self.fingerprint["contents"].get("context")

    @property
    def examples(self) -> int:
        return int(self.fingerprint["source"]["data"]["examples"])

    @property
    def hidden_dtype(self) -> torch.dtype:
        return getattr(torch, self.fingerprint["contents"]["hidden_dtype"])

    @property
    def digest(self) -> str:
        return fingerprint_digest(self.fingerprint["source"])

    def weighted_for(self, config: BackAttnConfig) -> bool:
        """Whether the stored `weighted` rows are what a head of `config` computes (softmax, same epsilon)."""
        stored = self.fingerprint["contents"]["weighted"]
        return (
            stored is not None
            and config.logit_weighting == "softmax"
            and stored["rms_norm_eps"] == config.rms_norm_eps
        )

    def positions_per_step(self, examples_per_step: int) -> int:
        """Positions in one cached batch: `examples_per_step` examples' worth of trained positions (at least 1).

        So that `batch_size` means the same amount of data per step in both kinds of run, and a step count or a
        learning rate carries over from one to the other.
        """
        return max(1, round(examples_per_step * self.positions / max(self.examples, 1)))

    def rows_per_step(self, examples_per_step: int) -> int:
        """Rows in one batch: `examples_per_step` examples of a contextual cache, else their worth of positions."""
        return examples_per_step if self.context is not None else self.positions_per_step(examples_per_step)

    def check_head(self, config: BackAttnConfig) -> None:
        """Refuse, in one line, rows that cannot train a head of `config`: their tapped layers are not the ones it
        reads (or it reads none, or they hold none)."""
        problem = _head_mismatch(self.context, config)
        if problem is not None:
            raise _refused(self.directory, problem)

    def collator(self, config: BackAttnConfig) -> FeatureCollator | ExampleCollator:
        self.check_head(config)
        contents, context = self.fingerprint["contents"], self.context
        if context is None:
            return FeatureCollator(self.hidden_dtype, self.weighted_for(config))
        weighted = contents["weighted"] if self.weighted_for(config) else None
        return ExampleCollator(
            hidden_dtype=self.hidden_dtype,
            hidden_size=contents["hidden_size"],
            tap_dtype=getattr(torch, context["dtype"]),
            taps=(len(context["layers"]), context["width"]),
            weighted_dtype=getattr(torch, weighted["dtype"]) if weighted is not None else None,
        )


@dataclass(frozen=True)
class FeatureCollator:
    """Stacks cached rows into a batch for the model's forward (`BackAttnModel.forward`): `cached_hidden` (n, d_in)
    in the model's dtype, `cached_weighted` (n, d_e) when used, and `labels` (1, n + 1).

    The labels are laid out as one sequence of n + 1 positions, as token batches are: an untrained first label,
    then the n targets, so that `trained_targets` pairs row i with target i and the Trainer counts n targets.
    """

    hidden_dtype: torch.dtype
    use_weighted: bool

    def __call__(self, rows: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        targets = torch.stack([row["target"] for row in rows])  # (n,)
        batch = {
            "cached_hidden": torch.stack([row["hidden"] for row in rows]).to(self.hidden_dtype),  # (n, d_in)
            "labels": torch.cat([targets.new_full((1,), IGNORE_INDEX), targets])[None],  # (1, n + 1)
        }
        if self.use_weighted:
            batch["cached_weighted"] = torch.stack([row["weighted"] for row in rows])  # (n, d_e)
        return batch


class ExampleRows(TorchDataset):
    """The rows of a contextual cache, one example each: numpy arrays of the stored values, read from the
    memory-mapped Arrow file without a copy where Arrow allows it (the flags are bits: copied).

    Not a `datasets` format: those widen int16 to int64 and float16 to float32, and a bf16 bit pattern is only
    exact as int16."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset  # unformatted, memory-mapped

    @property
    def column_names(self) -> list[str]:
        return self.dataset.column_names

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of a cache of {len(self)} examples")
        table = self.dataset.data.table
        return {name: table.column(name)[index].values.to_numpy(zero_copy_only=False) for name in self.column_names}


@dataclass(frozen=True)
class ExampleCollator:
    """Pads rows of a contextual cache (one example each) into a batch for the model's forward
    (`BackAttnModel.forward`): `cached_taps` (B, T, L, d_t), `cached_attention_mask` (B, T), `cached_kept` (B, T)
    bool, `cached_hidden` (n, d_in) the kept positions' rows in row-major order, `cached_weighted` (n, d_e) when
    used, and `labels` (1, n + 1) laid out as `FeatureCollator` lays them out. Padded on the right, as
    `PaddingCollator` pads sequences; the values come back in their dtypes exactly."""

    hidden_dtype: torch.dtype
    hidden_size: int
    tap_dtype: torch.dtype
    taps: tuple[int, int]  # (L, d_t)
    weighted_dtype: torch.dtype | None  # None: the head computes its softmax weights itself

    def __call__(self, rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        count, width = self.taps
        lengths = [len(row["trained"]) for row in rows]
        length = max(1, *lengths)  # one padding position when no example has one: the forward needs a position
        taps = np.zeros((len(rows), length, count * width), dtype=rows[0]["taps"].dtype)
        real = np.zeros((len(rows), length), dtype=bool)
        kept = np.zeros_like(real)
        for index, (row, stored) in enumerate(zip(rows, lengths, strict=True)):
            taps[index, :stored] = row["taps"].reshape(stored, count * width)
            real[index, :stored] = row["attention_mask"]
            kept[index, :stored] = row["trained"]
        targets = torch.from_numpy(np.concatenate([row["target"] for row in rows]).astype(np.int64))  # (n,)
        batch = {
            "cached_hidden": _stored_back(np.concatenate([row["hidden"] for row in rows]), self.hidden_dtype).reshape(
                -1, self.hidden_size
            ),  # (n, d_in)
            "cached_taps": _stored_back(taps, self.tap_dtype).reshape(len(rows), length, count, width),
            "cached_attention_mask": torch.from_numpy(real).long(),
            "cached_kept": torch.from_numpy(kept),
            "labels": torch.cat([targets.new_full((1,), IGNORE_INDEX), targets])[None],  # (1, n + 1)
        }
        if self.weighted_dtype is not None:
            weighted = _stored_back(np.concatenate([row["weighted"] for row in rows]), self.weighted_dtype)
            batch["cached_weighted"] = weighted.reshape(targets.shape[0], -1)  # (n, d_e)
        return batch


def _stored_back(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Values of a contextual cache as the tensor they were (exact): bf16 viewed from its 16-bit patterns."""
    if dtype == torch.bfloat16 and values.dtype != np.int16:  # a view of wider integers would read other values
        raise TypeError(f"bf16 values are read back from their int16 patterns, got {values.dtype}")
    tensor = torch.from_numpy(np.require(values, requirements=["C", "W"]))  # a copy only when it must be
    return tensor.view(dtype) if dtype == torch.bfloat16 else tensor.to(dtype)


def _as_stored(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a contextual cache stores it, flattened: in its own dtype, bf16 as its raw 16-bit patterns."""
    tensor = tensor.detach().cpu().contiguous()
    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).reshape(-1).numpy()


def _head_mismatch(context: Mapping[str, Any] | None, config: BackAttnConfig) -> str | None:
    """Why rows with these taps cannot train a head of `config`, as a phrase; None when they can."""
    wanted = list(config.context_layers) if config.context else None
    stored = list(context["layers"]) if context is not None else None
    if stored == wanted:
        return None
    if stored is None:
        return f"without tapped layers (for a head without context), but this head reads layers {wanted}"
    if wanted is None:
        return f"of a contextual head (tapped layers {stored}), but this head has no context"
    return f"of tapped layers {stored}, but this head reads layers {wanted} (context_layers)"


# ---- where a cache may go ---------------------------------------------------------------------------------------


def check_feature_folder(directory: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> None:
    """Refuse, in one line and before anything is loaded or written, a folder that cannot hold a feature cache.

    A cache folder is new, empty, or holds a cache (ours: `features.arrow`, `fingerprint.json`, leftovers of a
    killed pass); never a file, the head's output folder, or a folder of other files that a cache would mix with.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--feature-cache {directory} is a file; pass a folder for the cached features.")
    if output_dir is not None and directory.resolve() == Path(output_dir).resolve():
        raise ValueError(
            f"--feature-cache {directory} is the --output folder; pass a folder of its own for the cached features."
        )
    if directory.is_dir():
        others = sorted(entry.name for entry in directory.iterdir() if not _is_ours(entry.name))
        if others:
            raise ValueError(
                f"--feature-cache {directory} holds files that are no feature cache ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}); pass a new or empty folder."
            )


def _is_ours(name: str) -> bool:
    return name in (FEATURES_FILE, FINGERPRINT_FILE) or name.startswith(STAGING_PREFIX)


# ---- what a cache was computed from -----------------------------------------------------------------------------


def feature_fingerprint(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, max_length: int
) -> dict[str, Any]:
    """What cached rows depend on: the base (weights, their dtypes, its config), the tokenizer, `max_length` and the
    tokenised data.

    Hashing every base weight reads the whole model once (about a second for SmolLM2-135M); it is what makes "the
    same base" mean the same weights, not the same name. The same weights under another config (`rope_theta`,
    `rms_norm_eps`, the activation, ...) compute other hidden states, so the config is compared whole, less what
    cannot change them (`_CONFIG_KEYS_LEFT_OUT`). `name_or_path` is recorded for the reader only.
    """
    base = model.get_base_model()
    config = base.config
    return {
        "format": FORMAT_VERSION,
        "base": {
            "model_type": getattr(config, "model_type", type(base).__name__),
            "name_or_path": getattr(config, "_name_or_path", ""),
            "dtypes": sorted(
                {str(tensor.dtype).removeprefix("torch.") for tensor in _base_parameters(model).values()}
            ),
            "config": _config_state(config),
            "weights": _base_weights_digest(model),
        },
        "tokenizer": _tokenizer_state(tokenizer),
        "max_length": max_length,
        "data": {"examples": len(dataset), "tokens": _tokens_digest(dataset)},
    }


def fingerprint_digest(source: Mapping[str, Any]) -> str:
    """One short hash of a fingerprint's identity (`name_or_path` left out: a copied base is the same base)."""
    identity = {**source, "base": {k: v for k, v in source["base"].items() if k != "name_or_path"}}
    return _digest(json.dumps(identity, sort_keys=True).encode())


def _mismatch(cached: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """What differs between two fingerprints, as a phrase; None when the cached rows may be reused."""
    if cached.get("format") != current["format"]:
        return f"format {cached.get('format')} (this version writes format {current['format']})"
    base, cached_base = current["base"], cached.get("base", {})
    if cached_base.get("model_type") != base["model_type"]:
        return f"another base model ({cached_base.get('name_or_path') or 'unnamed'})"
    if cached_base.get("dtypes") != base["dtypes"]:
        return f"a {'+'.join(cached_base.get('dtypes') or ['?'])} base (this one is {'+'.join(base['dtypes'])})"
    if cached_base.get("config") != base["config"]:
        return f"another base model config ({_differing_keys(cached_base.get('config'), base['config'])})"
    if cached_base.get("weights") != base["weights"]:
        return f"another base model ({cached_base.get('name_or_path') or 'unnamed'})"
    if cached.get("tokenizer") != current["tokenizer"]:
        return f"another tokenizer ({_differing_keys(cached.get('tokenizer'), current['tokenizer'])})"
    if cached.get("max_length") != current["max_length"]:
        return f"--max-length {cached.get('max_length')}, not {current['max_length']}"
    if cached.get("data") != current["data"]:
        return "other training data"
    return None


def _differing_keys(cached: Any, current: Mapping[str, Any], shown: int = 3) -> str:
    """The (dotted) keys whose values differ between two nested dicts, sorted; the first `shown` of them."""
    old, new = _flat(cached if isinstance(cached, Mapping) else {}), _flat(current)
    keys = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _digest(data: bytes | None = None) -> str:
    return hashlib.blake2b(data or b"", digest_size=16).hexdigest()


def _config_state(config: Any) -> dict[str, Any]:
    """The base's whole config as JSON values (as `config.json` holds it), less `_CONFIG_KEYS_LEFT_OUT`."""
    state = json.loads(config.to_json_string(use_diff=False)) if hasattr(config, "to_json_string") else {}
    return {key: value for key, value in state.items() if key not in _CONFIG_KEYS_LEFT_OUT}


def _base_parameters(model: PeftModel) -> dict[str, torch.Tensor]:
    """Every base parameter by name; the heads' weights are left out."""
    parameters = model.get_base_model().named_parameters()
    return {name: tensor for name, tensor in parameters if ".backattn_heads." not in name}


def _base_weights_digest(model: PeftModel) -> str:
    """Every base parameter's name, dtype, shape and bytes; the heads' weights are left out."""
    hasher = hashlib.blake2b(digest_size=16)
    for name, tensor in _base_parameters(model).items():
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        if tensor.device.type != "meta":  # offloaded weights: their names and shapes only
            hasher.update(tensor.detach().reshape(-1).cpu().view(torch.uint8).numpy())
    return hasher.hexdigest()


def _tokenizer_state(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The tokenizer whole: a fast one's serialised backend (vocabulary, merges, normaliser, pre-tokeniser,
    post-processor, added tokens: its `tokenizer.json`), else its vocabulary; its chat template; its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialised = {k: v for k, v in json.loads(backend.to_str()).items() if k not in _TOKENIZER_CALL_STATE}
    else:
        serialised = sorted(tokenizer.get_vocab().items())
    template = getattr(tokenizer, "chat_template", None)
    special = {str(k): str(v) for k, v in tokenizer.special_tokens_map.items()}
    return {
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "state": _digest(json.dumps(serialised, sort_keys=True).encode()),
        "chat_template": _digest(json.dumps(template, sort_keys=True).encode()) if template else None,
        "special_tokens": {**special, "all": sorted(map(str, tokenizer.all_special_tokens))},
    }


def _tokens_digest(dataset: Dataset) -> str:
    """The token ids, labels and attention masks the pass reads (the mask only when the data carries one)."""
    hasher = hashlib.blake2b(digest_size=16)
    for column in ("input_ids", "labels", "attention_mask"):
        if column == "attention_mask" and column not in dataset.column_names:
            continue
        hasher.update(column.encode())
        for values in dataset[column]:
            array = np.asarray(values, dtype=np.int64)
            hasher.update(len(array).to_bytes(8, "little"))
            hasher.update(array.tobytes())
    return hasher.hexdigest()


def _file_checksum(path: str | os.PathLike) -> str:
    """The sha256 of a file, read `_CHECKSUM_CHUNK` bytes at a time (what `sha256sum` prints)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHECKSUM_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


# ---- computing, writing and opening a cache ---------------------------------------------------------------------


def count_trained_positions(dataset: Dataset) -> int:
    """Trained positions of a tokenised set: position t is trained when labels[t + 1] is (padding never is)."""
    return sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in dataset["labels"])


def count_context_positions(dataset: Dataset) -> int:
    """Positions a contextual cache stores the taps of: each example's up to its last trained one."""
    return sum(int(context_spans(trained_positions(torch.tensor([labels])))[0]) for labels in dataset["labels"])


def context_spans(trained: torch.Tensor) -> torch.Tensor:
    """(B,) positions a contextual cache stores per row of a (B, T) trained mask: up to the row's last trained one."""
    return (trained.long() * torch.arange(1, trained.shape[1] + 1, device=trained.device)).amax(dim=1)


def head_layer(model: nn.Module) -> tuple[BackAttnLayer, str]:
    """The model's one backattn layer and the name of its active head."""
    layers = [module for module in model.modules() if isinstance(module, BackAttnLayer)]
    if len(layers) != 1:
        raise ValueError(f"Cached features need a model with one backattn layer; this one has {len(layers)}.")
    layer = layers[0]
    if len(layer.active_adapters) != 1:
        raise ValueError(f"Cached features train one head at a time, but {layer.active_adapters} are active.")
    return layer, layer.active_adapters[0]


def cache_features(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    directory: str | os.PathLike,
    *,
    max_length: int,
    batch_size: int = 8,
    progress: bool = True,
    fingerprint: Mapping[str, Any] | None = None,
) -> CachedFeatures:
    """The cached features of `dataset` (from `tokenize_examples`) in `directory`: reused when it holds features of
    the same base, tokenizer, max_length and data, with the tapped layers the model's head reads (none for a head
    without context), else computed once (the base's forward, `batch_size` examples at a time) and written there.

    Prints the size before writing and refuses, in one line, a folder on a disk without room for it, a folder of
    features computed from something else or with other tapped layers, a damaged one (`open_features`), and a
    folder `check_feature_folder` refuses. A pass that fails or is interrupted removes what it wrote (and the
    folder, if it created it).
    """
    directory = Path(directory)
    check_feature_folder(directory)
    start = time.monotonic()
    layer, name = head_layer(model)
    config = layer.backattn_heads[name].config
    source = (
        dict(fingerprint) if fingerprint is not None else feature_fingerprint(model, tokenizer, dataset, max_length)
    )
    if (directory / FINGERPRINT_FILE).is_file():
        cached = _read_fingerprint(directory)
        problem = _mismatch(cached["source"], source)
        problem = f"of {problem}" if problem is not None else _head_mismatch(cached["contents"].get("context"), config)
        if problem is not None:
            raise _refused(directory, problem)
        checking = time.monotonic()
        features = open_features(directory)  # the file's sha256 checked against the fingerprint's first
        checked = time.monotonic() - checking
        features.seconds = time.monotonic() - start
        print(
            f"Feature cache: reusing {directory} ({features.positions:,} trained positions; "
            f"{_size(features.fingerprint['contents']['checksum']['bytes'])} checked against its sha256 in "
            f"{checked:.1f} s)",
            flush=True,
        )
        return features
    for entry in directory.iterdir() if directory.is_dir() else ():  # what a killed pass left: never complete
        remove_path(entry)

    hidden_dtype = _hidden_dtype(layer)
    stored_as = _STORED_EXACTLY if config.context else _STORED_AS
    contents = {
        "positions": count_trained_positions(dataset),
        "hidden_size": layer.in_features,
        "hidden_dtype": _name(hidden_dtype),
        "stored_dtype": stored_as[hidden_dtype],
        "weighted": None,
    }
    if config.logit_weighting == "softmax":
        weighted_dtype = layer.backattn_heads[name].norm_scale.dtype  # what `weighted_embedding` returns
        contents["weighted"] = {
            "rms_norm_eps": config.rms_norm_eps,
            "embedding_dim": layer.embedding_weight.shape[1],
            "dtype": _name(weighted_dtype),
            "stored_dtype": stored_as[weighted_dtype],
        }
    if config.context:  # the context path reads the tapped outputs in bf16 (TAP_DTYPE): they are stored so, exactly
        tap_dtype = TAP_DTYPE
        contents["context"] = {
            "layers": list(config.context_layers),
            "width": config.base_context_width,
            "dtype": _name(tap_dtype),
            "stored_dtype": _STORED_EXACTLY[tap_dtype],
            "examples": len(dataset),
            "positions": count_context_positions(dataset),
        }
    size = _estimated_bytes(contents)
    room = shutil.disk_usage(_existing(directory)).free
    print(
        f"Feature cache: {contents['positions']:,} trained positions of {len(dataset):,} examples, "
        f"{_describe_row(contents)} = {_size(size)}, to {directory} ({_size(room)} free)",
        flush=True,
    )
    if size * _DISK_MARGIN > room:
        raise ValueError(
            f"--feature-cache {directory}: the features need {_size(size)} but the disk has {_size(room)} free; "
            "free some space or choose a folder on another disk."
        )
    created = first_missing_folder(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f"{STAGING_PREFIX}{secrets.token_hex(8)}.arrow"
    try:
        written = _write_features(model, layer, name, tokenizer, dataset, staging, contents, batch_size, progress)
        expected = (contents["positions"], contents["context"]["positions"] if config.context else 0)
        if written != expected:
            raise RuntimeError(f"the feature pass found {written} (trained, tapped) positions, not {expected}")
        contents["checksum"] = {"sha256": _file_checksum(staging), "bytes": staging.stat().st_size}
        os.replace(staging, directory / FEATURES_FILE)
        _write_json(directory / FINGERPRINT_FILE, {"source": source, "contents": contents})  # last: complete
    except BaseException:
        for item in (staging, directory / FEATURES_FILE, directory / FINGERPRINT_FILE):
            remove_path(item)
        if created is not None:
            remove_empty_folders(directory, created)
        raise
    features = open_features(directory, verify=False)  # its checksum was just taken from the file itself
    features.computed, features.seconds = True, time.monotonic() - start
    print(f"Feature cache: {features.positions:,} positions written in {features.seconds:.0f} s", flush=True)
    return features


def open_features(directory: str | os.PathLike, *, verify: bool = True) -> CachedFeatures:
    """The cache in `directory`, memory-mapped; a damaged one is a one-line ValueError.

    `verify` first reads `features.arrow` whole and compares its size and sha256 with those recorded when it was
    written (0.7 s per GB on 2 CPU cores, see docs/training.md): bytes changed in place leave a file Arrow still reads.
    """
    directory = Path(directory)
    fingerprint = _read_fingerprint(directory)
    contents = fingerprint["contents"]
    if verify:
        _verify_checksum(directory, contents)
    try:
        columns = list(_features(contents))
        count = contents["context"]["examples"] if contents.get("context") is not None else contents["positions"]
        rows = Dataset.from_file(str(directory / FEATURES_FILE))  # memory-mapped, not read into memory
    except (OSError, ValueError, KeyError, TypeError, pyarrow.ArrowException) as error:
        raise _damaged(directory, type(error).__name__) from None
    if rows.column_names != columns or len(rows) != count:
        raise _damaged(directory, f"{len(rows)} rows of {rows.column_names}, expected {count} of {columns}")
    formatted = ExampleRows(rows) if contents.get("context") is not None else rows.with_format("torch")
    return CachedFeatures(directory, formatted, fingerprint, computed=False, seconds=0.0)


def _read_fingerprint(directory: Path) -> dict[str, Any]:
    """`fingerprint.json`, with its two parts; unreadable, it is a damaged cache."""
    try:
        fingerprint = json.loads((directory / FINGERPRINT_FILE).read_text())
        if not all(isinstance(part, dict) for part in (fingerprint, fingerprint["source"], fingerprint["contents"])):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise _damaged(directory, type(error).__name__) from None
    return fingerprint


def _verify_checksum(directory: Path, contents: Mapping[str, Any]) -> None:
    """`features.arrow` has the size and sha256 recorded when it was written, or the cache is damaged."""
    path, recorded = directory / FEATURES_FILE, contents.get("checksum")
    if not isinstance(recorded, dict) or not {"sha256", "bytes"} <= recorded.keys():
        raise _damaged(directory, f"{FINGERPRINT_FILE} records no checksum of {FEATURES_FILE}")
    try:
        size = path.stat().st_size
        if size != recorded["bytes"]:
            raise _damaged(directory, f"{FEATURES_FILE} holds {size:,} bytes, {recorded['bytes']:,} were written")
        if _file_checksum(path) != recorded["sha256"]:
            raise _damaged(directory, f"{FEATURES_FILE} does not match the sha256 recorded in {FINGERPRINT_FILE}")
    except OSError as error:
        raise _damaged(directory, f"{FEATURES_FILE}: {error.strerror or type(error).__name__}") from None


def _refused(directory: Path, problem: str) -> ValueError:
    return ValueError(
        f"--feature-cache {directory} holds features {problem}; choose another folder (or delete this one)."
    )


def _damaged(directory: Path, why: str) -> ValueError:
    return ValueError(f"--feature-cache {directory} is damaged ({why}); delete it or choose another folder.")


def _write_features(
    model: PeftModel,
    layer: BackAttnLayer,
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    path: Path,
    contents: Mapping[str, Any],
    batch_size: int,
    progress: bool,
) -> tuple[int, int]:
    """The base's forward over `dataset`, the trained rows (a contextual head's: the examples) appended to the Arrow
    file at `path`; returns the trained positions and the tapped positions written."""
    collate = PaddingCollator.from_tokenizer(tokenizer)
    device = layer.embedding_weight.device
    schema = _features(contents).arrow_schema  # carries the `datasets` feature types, for Dataset.from_file
    context = contents.get("context")
    kept: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def collect(hidden: torch.Tensor) -> None:  # in the output layer's pre-hook: the tapped layers ran already
        kept.append((hidden, layer.recorded_taps(name)[0] if context is not None else None))

    written = tapped = 0
    was_training = model.training
    model.eval()
    batches = range(0, len(dataset), batch_size)
    try:
        with (
            pyarrow.OSFile(str(path), "wb") as sink,
            pyarrow.ipc.new_stream(sink, schema) as stream,
            model.disable_adapter(),
            torch.inference_mode(),
            Progress(len(batches), "feature pass", enabled=progress) as shown,
        ):
            for start in batches:
                batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                with only_trained_positions(layer, batch["labels"], collect=collect):  # the layer computes nothing
                    model(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                        use_cache=False,
                    )
                hidden, taps = kept.pop()  # (n, d_in), (B, T, L, d_t) or None
                weighted = layer.weighted_embedding(name, hidden) if contents["weighted"] is not None else None
                if context is None:
                    columns = {
                        "hidden": hidden.to(getattr(torch, contents["stored_dtype"])),  # (n, d_in)
                        "target": trained_targets(batch["labels"]).to(torch.int64),  # (n,)
                    }
                    if weighted is not None:  # (n, d_e)
                        columns["weighted"] = weighted.to(getattr(torch, contents["weighted"]["stored_dtype"]))
                    stream.write_table(_table(columns, schema))
                else:
                    if _name(taps.dtype) != context["dtype"]:
                        raise RuntimeError(f"the tapped layers returned {taps.dtype}, not {context['dtype']}")
                    examples = _examples(hidden, weighted, taps, batch["labels"], batch["attention_mask"])
                    stream.write_table(_example_table(examples, schema))
                    tapped += sum(len(example["trained"]) for example in examples)
                written += hidden.shape[0]
                shown.update(1)
    finally:
        model.train(was_training)
    return written, tapped


def _examples(
    hidden: torch.Tensor,
    weighted: torch.Tensor | None,
    taps: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
) -> list[dict[str, np.ndarray]]:
    """A padded batch's rows of a contextual cache, one per example, each column flattened as stored.

    hidden (n, d_in) and weighted (n, d_e): the batch's trained positions, row by row; taps (B, T, L, d_t); labels
    and attention_mask (B, T), right-padded (`PaddingCollator`), so each example's positions start at 0.
    """
    trained = trained_positions(labels)  # (B, T)
    targets = trained_targets(labels).to(torch.int64)  # (n,), in hidden's order
    spans, counts = context_spans(trained).tolist(), trained.sum(dim=1).tolist()
    examples, first = [], 0
    for row, (span, count) in enumerate(zip(spans, counts, strict=True)):
        rows = slice(first, first + count)
        example = {"hidden": _as_stored(hidden[rows]), "target": targets[rows].numpy()}
        if weighted is not None:
            example["weighted"] = _as_stored(weighted[rows])
        example["taps"] = _as_stored(taps[row, :span])
        example["trained"] = trained[row, :span].numpy()
        example["attention_mask"] = attention_mask[row, :span].bool().numpy()
        examples.append(example)
        first += count
    return examples


def _features(contents: Mapping[str, Any]) -> Features:
    """The columns' `datasets` types: one row per trained position, or (a contextual cache) one per example."""
    context = contents.get("context")
    if context is not None:
        columns = {"hidden": FeatureList(Value(contents["stored_dtype"])), "target": FeatureList(Value("int64"))}
        if contents["weighted"] is not None:
            columns["weighted"] = FeatureList(Value(contents["weighted"]["stored_dtype"]))
        columns["taps"] = FeatureList(Value(context["stored_dtype"]))
        columns["trained"] = FeatureList(Value("bool"))
        columns["attention_mask"] = FeatureList(Value("bool"))
        return Features(columns)
    columns = {
        "hidden": FeatureList(Value(contents["stored_dtype"]), length=contents["hidden_size"]),
        "target": Value("int64"),
    }
    weighted = contents["weighted"]
    if weighted is not None:
        columns["weighted"] = FeatureList(Value(weighted["stored_dtype"]), length=weighted["embedding_dim"])
    return Features(columns)


def _table(columns: Mapping[str, torch.Tensor], schema: pyarrow.Schema) -> pyarrow.Table:
    """One Arrow record batch, each tensor already in its stored dtype: (n, width) as a fixed-size list column."""
    arrays = []
    for field in schema:
        values = columns[field.name].detach().cpu().contiguous()
        if values.dim() == 1:
            arrays.append(pyarrow.array(values.numpy()))
        else:
            flat = pyarrow.array(values.reshape(-1).numpy())
            arrays.append(pyarrow.FixedSizeListArray.from_arrays(flat, values.shape[1]))
    return pyarrow.Table.from_arrays(arrays, schema=schema)


def _example_table(examples: Sequence[Mapping[str, np.ndarray]], schema: pyarrow.Schema) -> pyarrow.Table:
    """One Arrow record batch of a contextual cache: each column a list of values per example."""
    arrays = []
    for field in schema:
        parts = [example[field.name] for example in examples]
        offsets = pyarrow.array(np.cumsum([0, *map(len, parts)]), type=pyarrow.int32())
        values = pyarrow.array(np.concatenate(parts), type=field.type.value_type)
        arrays.append(pyarrow.ListArray.from_arrays(offsets, values))
    return pyarrow.Table.from_arrays(arrays, schema=schema)


def _hidden_dtype(layer: BackAttnLayer) -> torch.dtype:
    """The dtype the output layer takes: its weight's, or (a quantised layer) the input embeddings'."""
    weight = getattr(layer.get_base_layer(), "weight", None)
    if weight is not None and weight.dtype in _STORED_AS:
        return weight.dtype
    return layer.embedding_weight.dtype


def _estimated_bytes(contents: Mapping[str, Any]) -> int:
    """The rows' bytes: each trained position's hidden state, target (8 bytes) and softmax weights; a contextual
    cache's tapped layers at each stored position, its two flags (1 bit each), and 4 bytes a column and example for
    where each example's values start."""
    per_row = contents["hidden_size"] * np.dtype(contents["stored_dtype"]).itemsize + 8
    weighted = contents["weighted"]
    if weighted is not None:
        per_row += weighted["embedding_dim"] * np.dtype(weighted["stored_dtype"]).itemsize
    context = contents.get("context")
    if context is None:
        return contents["positions"] * per_row
    per_position = len(context["layers"]) * context["width"] * np.dtype(context["stored_dtype"]).itemsize
    columns = len(_features(contents))
    return (
        contents["positions"] * per_row
        + context["positions"] * per_position
        + context["positions"] * 2 // 8
        + (context["examples"] * columns * 4)
    )


def _describe_row(contents: Mapping[str, Any]) -> str:
    context = contents.get("context")
    if context is None:
        stored = contents["stored_dtype"]
    else:
        stored = _dtype_phrase(contents["hidden_dtype"], contents["stored_dtype"])
    row = f"{contents['hidden_size']} hidden values ({stored})"
    if contents["weighted"] is not None:
        row += f" + {contents['weighted']['embedding_dim']} softmax weights"
    row += " + a target each"
    if context is not None:
        row += (
            f", and {len(context['layers'])} tapped layers x {context['width']} values "
            f"({_dtype_phrase(context['dtype'], context['stored_dtype'])}) at {context['positions']:,} positions "
            "(each example's up to its last trained one, prompt included)"
        )
    return row


def _dtype_phrase(dtype: str, stored: str) -> str:
    return f"{dtype}, as its 16-bit patterns" if stored != dtype else dtype


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _size(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def _existing(path: Path) -> Path:
    """`path` or its nearest existing parent: where the disk's free space is read."""
    for folder in (path, *path.parents):
        if folder.exists():
            return folder
    return Path.cwd()


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Written whole or not at all: a temporary file renamed over the name."""
    temporary = path.with_name(f"{STAGING_PREFIX}{secrets.token_hex(8)}.json")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(temporary, path)


# ---- training the head alone on them ----------------------------------------------------------------------------


class FeatureCacheStamp(TrainerCallback, ExportableState):
    """Marks a run's checkpoints as trained on cached features: its state goes into each checkpoint's
    trainer_state.json, written with the checkpoint, so `--resume` can tell the two kinds of run apart."""

    def __init__(self, features: str = "") -> None:
        self.features = features  # `fingerprint_digest` of the cache trained on

    def state(self) -> dict:
        return {"args": {"features": self.features}, "attributes": {}}


def checkpoint_features(checkpoint: str | os.PathLike) -> str | None:
    """The digest of the cached features a complete checkpoint was trained on; None for an ordinary checkpoint."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    stamp = (state.get("stateful_callbacks") or {}).get(FeatureCacheStamp.__name__)
    if isinstance(stamp, list):  # the Trainer keeps a list when a callback class appears more than once
        stamp = stamp[-1]
    return stamp["args"]["features"] if stamp else None
