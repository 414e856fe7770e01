"""Task files for lm-evaluation-harness that read local data, so that heads can be scored offline.

`peft-backattn lm-eval` adds this folder to lm-eval's `--include_path` (when none is given); the tasks here are
lm-eval's own with the data read from local files. `gsm8k_local` is lm-eval's `gsm8k` task (same prompt, 5-shot
examples, filters and `exact_match` metric) reading `train.jsonl` and `test.jsonl` from a local folder of
openai/gsm8k rows (`question`, `answer`).
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
