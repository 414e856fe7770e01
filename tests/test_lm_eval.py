"""lm-evaluation-harness scores heads: `peft-backattn lm-eval` (lm-eval's own CLI with the method registered) and
lm-eval's Python API, on tiny local tasks (generate_until and multiple-choice log-likelihoods), tied and untied."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_heads, save_tiny_lm
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from peft_backattn import BackAttnConfig
from peft_backattn import lm_eval as harness
from peft_backattn.cli import main
from peft_backattn.lm_eval import lm_eval_arguments
from peft_backattn.lm_eval_tasks import TASKS_DIR

try:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
except ImportError:  # the optional extra
    simple_evaluate = HFLM = TaskManager = None

needs_lm_eval = pytest.mark.skipif(
    simple_evaluate is None, reason="lm-eval is the optional extra peft-backattn[lm-eval] (lm-eval==0.4.13)"
)

QUESTIONS = [("What is 2 + 3?", "5", ["5", "6", "7"]), ("What is 4 * 2?", "8", ["6", "8", "9"]),
             ("What is 9 - 4?", "5", ["4", "5", "13"]), ("What is 10 / 2?", "5", ["2", "5", "20"])]  # fmt: skip
TASKS = {
    "tiny_gen": """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
""",
    "tiny_mc": """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.index(answer)}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
""",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A tied and an untied tiny Llama, a randomised head for each, and the two local tasks."""
    work = tmp_path_factory.mktemp("lm_eval")
    tied = save_tiny_lm(work / "tied", chat=False)
    untied = work / "untied"
    model = AutoModelForCausalLM.from_pretrained(tied)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 2)  # its own matrix
    model.save_pretrained(untied)
    (untied / "tokenizer.json").write_bytes((tied / "tokenizer.json").read_bytes())
    (untied / "tokenizer_config.json").write_bytes((tied / "tokenizer_config.json").read_bytes())
    paths = {"tied": tied, "untied": untied, "tasks": work / "tasks", "work": work}
    for name in ("tied", "untied"):
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(paths[name]), BackAttnConfig(r=8))
        randomize_heads(peft_model, std=2.0)
        peft_model.save_pretrained(work / f"head_{name}")
        paths[f"head_{name}"] = work / f"head_{name}"
    paths["tasks"].mkdir()
    data = paths["tasks"] / "tiny.jsonl"
    data.write_text("".join(json.dumps(dict(question=q, answer=a, choices=c)) + "\n" for q, a, c in QUESTIONS))
    for name, text in TASKS.items():
        (paths["tasks"] / f"{name}.yaml").write_text(text.format(data=data))
    return paths


def evaluate(setup, base: str, head: str | None = None, tasks: tuple[str, ...] = tuple(TASKS)) -> dict:
    """lm-eval's Python API on lm-eval's own `hf` loading (`pretrained=..., peft=...`, as on the command line)."""
    lm = HFLM(pretrained=str(setup[base]), peft=None if head is None else str(setup[head]), device="cpu", batch_size=2)
    return simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=TaskManager(include_path=str(setup["tasks"])), log_samples=True
    )


def responses(results: dict) -> dict[str, list]:
    """Per task, each document's responses as lm-eval logged them (generated text, or log-likelihoods)."""
    return {
        task: [sample["filtered_resps"] for sample in sorted(samples, key=lambda s: s["doc_id"])]
        for task, samples in results["samples"].items()
    }


@needs_lm_eval
def test_the_command_line_scores_a_head_on_a_tied_base_as_the_python_api_does(setup):
    output = setup["work"] / "cli_results"
    command = [
        sys.executable, "-m", "peft_backattn.cli", "lm-eval", "--model", "hf",
        "--model_args", f"pretrained={setup['tied']},peft={setup['head_tied']}", "--tasks", ",".join(TASKS),
        "--include_path", str(setup["tasks"]), "--device", "cpu", "--batch_size", "2", "--log_samples",
        "--output_path", str(output),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=setup["work"])
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = output.rglob("results_*.json")
    from_cli = json.loads(results_file.read_text())["results"]
    from_cli_samples = {}
    for task in TASKS:
        (samples_file,) = output.rglob(f"samples_{task}_*.jsonl")
        rows = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
        from_cli_samples[task] = [row["filtered_resps"] for row in rows]

    api = evaluate(setup, "tied", "head_tied")
    assert {t: from_cli[t]["exact_match,none" if t == "tiny_gen" else "acc,none"] for t in TASKS} == {
        t: api["results"][t]["exact_match,none" if t == "tiny_gen" else "acc,none"] for t in TASKS
    }
    api_samples = responses(api)
    assert from_cli_samples["tiny_gen"] == api_samples["tiny_gen"]
    for cli_row, api_row in zip(from_cli_samples["tiny_mc"], api_samples["tiny_mc"], strict=True):
        assert [float(c[0]) for c in cli_row] == pytest.approx([float(a[0]) for a in api_row], abs=1e-4)

    base = responses(evaluate(setup, "tied"))
    assert base["tiny_mc"] != api_samples["tiny_mc"]  # the head changed the log-likelihoods
    assert base["tiny_gen"] != api_samples["tiny_gen"]  # and what the model generates


@needs_lm_eval
def test_an_untied_base_with_a_head_scores_differently_from_the_base(setup):
    with_head = responses(evaluate(setup, "untied", "head_untied", tasks=("tiny_mc",)))
    base = responses(evaluate(setup, "untied", tasks=("tiny_mc",)))
    assert base["tiny_mc"] != with_head["tiny_mc"]


@needs_lm_eval
def test_a_base_that_lm_eval_resizes_refuses_the_head(setup, tmp_path):
    """lm-eval resizes the embeddings to len(tokenizer) before it loads the adapter when the config's vocabulary
    differs; the head was built for the config's vocabulary and is refused in one line."""
    padded = tmp_path / "padded"
    model = AutoModelForCausalLM.from_pretrained(setup["tied"])
    model.resize_token_embeddings(model.config.vocab_size + 8)  # a vocabulary padded beyond the tokenizer's
    model.save_pretrained(padded)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (padded / name).write_bytes((setup["tied"] / name).read_bytes())
    head = get_peft_model(AutoModelForCausalLM.from_pretrained(padded), BackAttnConfig(r=8))
    head.save_pretrained(tmp_path / "head")
    with pytest.raises(ValueError, match="vocab"):
        HFLM(pretrained=str(padded), peft=str(tmp_path / "head"), device="cpu")


def test_the_shipped_tasks_are_added_unless_an_include_path_is_given():
    args = ["--model", "hf", "--tasks", "gsm8k_local"]
    assert lm_eval_arguments(args) == args + ["--include_path", str(TASKS_DIR)]
    assert lm_eval_arguments(args + ["--include_path", "x"]) == args + ["--include_path", "x"]
    assert lm_eval_arguments(["ls", "tasks"]) == ["ls", "tasks"]
    assert (TASKS_DIR / "gsm8k_local.yaml").is_file()


@needs_lm_eval
def test_gsm8k_local_is_lm_evals_gsm8k_reading_local_files(tmp_path):
    """Same prompt, few-shot examples, filters and metric as lm-eval's gsm8k; the data from local JSONL files."""
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(8)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    manager = TaskManager(include_path=str(TASKS_DIR), metadata={"gsm8k_dir": str(tmp_path)})
    task = manager.load_task_or_group(["gsm8k_local"])["gsm8k_local"]
    assert task.config.num_fewshot == 5 and task.OUTPUT_TYPE == "generate_until"
    assert task.config.doc_to_text == "Question: {{question}}\nAnswer:"
    assert [f.name for f in task._filters] == ["strict-match", "flexible-extract"]
    docs = list(task.test_docs())
    assert docs[0]["question"] == rows[0]["question"] and len(list(task.fewshot_docs())) == 8


@needs_lm_eval
def test_help_is_lm_evals_own_and_writes_nothing_on_stderr():
    command = [sys.executable, "-m", "peft_backattn.cli", "lm-eval", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: lm-eval") and result.stderr == ""


def test_without_lm_eval_the_command_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setattr(harness, "cli_evaluate", None)
    assert main(["lm-eval", "--model", "hf"]) == 2
    assert capsys.readouterr().err == f"peft-backattn: error: {harness.MISSING}\n"
