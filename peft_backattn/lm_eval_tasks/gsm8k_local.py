"""The data of the `gsm8k_local` task: openai/gsm8k's `main` configuration, read from a local folder.

lm-eval imports this file by path (`custom_dataset: !function gsm8k_local.load_gsm8k` in gsm8k_local.yaml) and
calls `load_gsm8k` with the task's metadata, which holds lm-eval's `--metadata` and `--model_args` entries.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets

ENV_VAR = "PEFT_BACKATTN_GSM8K_DIR"
METADATA_KEY = "gsm8k_dir"


def gsm8k_dir(metadata: dict[str, Any]) -> Path:
    """The folder with `train.jsonl` and `test.jsonl`: `--metadata gsm8k_dir=DIR`, else $PEFT_BACKATTN_GSM8K_DIR."""
    folder = metadata.get(METADATA_KEY) or os.environ.get(ENV_VAR)
    if not folder:
        raise ValueError(
            f"gsm8k_local needs the folder of GSM8K's train.jsonl and test.jsonl: pass --metadata {METADATA_KEY}=DIR "
            f"or set {ENV_VAR}=DIR."
        )
    folder = Path(folder).expanduser()
    missing = [name for name in ("train.jsonl", "test.jsonl") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"gsm8k_local: {', '.join(missing)} not found in {folder}.")
    return folder


def load_gsm8k(**metadata: Any) -> datasets.DatasetDict:
    """GSM8K's train split (the few-shot examples) and test split, in the files' row order (as on the hub)."""
    folder = gsm8k_dir(metadata)
    files = {split: str(folder / f"{split}.jsonl") for split in ("train", "test")}
    return datasets.load_dataset("json", data_files=files)
