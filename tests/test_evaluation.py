"""Evaluation: teacher-forced perplexity, generation with one head per sample, and the metric plumbing."""

from __future__ import annotations

import dataclasses
import json
import math
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_heads
from peft import get_peft_model

from peft_backattn import BackAttnConfig
from peft_backattn.workbench.base_models import load_base_model
from peft_backattn.workbench.data import tokenize_examples
from peft_backattn.workbench.evaluation import (
    evaluate,
    evaluate_heads,
    format_table,
    generate_solutions,
    load_heads,
    target_nll,
    use_head,
    write_json,
)
from peft_backattn.workbench.metrics import exact_match, extract_answer, mean_token_overlap, numeric_errors
from peft_backattn.workbench.synthetic import generate_examples


@pytest.fixture(scope="module")
def two_heads(tiny_lm_dir):
    base, tokenizer = load_base_model(str(tiny_lm_dir))
    model = get_peft_model(base, BackAttnConfig(r=8), adapter_name="math")
    model.add_adapter("code", BackAttnConfig(r=8, logit_weighting="raw"))
    randomize_heads(model, std=1.0)
    return model.eval(), tokenizer


def test_target_nll_counts_only_target_tokens(two_heads):
    model, tokenizer = two_heads
    examples = generate_examples(5, split="test")
    total, count, _ = target_nll(model, tokenizer, examples, max_length=256, batch_size=2)
    dataset, _ = tokenize_examples(examples, tokenizer, 256)
    expected_total, expected_count = 0.0, 0
    with torch.no_grad():
        for row in dataset:  # one example at a time, no padding
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor(row["labels"][1:])
            logits = model(input_ids=ids).logits[0, :-1]
            mask = labels != -100
            expected_total += F.cross_entropy(logits[mask], labels[mask], reduction="sum").item()
            expected_count += int(mask.sum())
    assert count == expected_count
    assert total == pytest.approx(expected_total, rel=1e-4)


def test_evaluate_reports_the_metrics_of_its_own_generations(two_heads):
    model, tokenizer = two_heads
    examples = generate_examples(4, split="test", seed=3)
    result = evaluate(model, tokenizer, examples, max_new_tokens=6, batch_size=4, max_length=256)
    solutions = generate_solutions(model, tokenizer, [e.problem for e in examples], max_new_tokens=6)
    answers = [extract_answer(s) for s in solutions]
    overlap = mean_token_overlap(solutions, [e.solution for e in examples])
    total, count, _ = target_nll(model, tokenizer, examples, max_length=256)
    assert result.perplexity == pytest.approx(math.exp(total / count))
    assert result.exact_match == exact_match(answers, [e.answer for e in examples])
    assert result.rmse == numeric_errors(answers, [e.answer for e in examples]).rmse
    assert (result.precision, result.recall, result.f1) == (overlap.precision, overlap.recall, overlap.f1)
    assert result.n == 4 and result.target_tokens == count


def test_evaluate_reports_the_share_of_generations_with_an_answer_line(two_heads, monkeypatch):
    from peft_backattn.workbench import evaluation

    texts = ["3 + 4 = 7\n#### 7", "so it is 3", "#### five", "x\n#### 1,200\n"]
    monkeypatch.setattr(evaluation, "_generate_batch", lambda *args: (texts[: len(args[2])], 0))
    model, tokenizer = two_heads
    result = evaluate(model, tokenizer, generate_examples(4, split="test"), batch_size=4, max_length=256)
    assert result.answer_lines == 0.5 and result.n == 4
    assert evaluate(model, tokenizer, generate_examples(4, split="test"), generation_limit=0).answer_lines is None


def test_generation_with_one_head_per_problem_equals_each_head_on_the_batch(two_heads):
    model, tokenizer = two_heads
    problems = [e.problem for e in generate_examples(3, split="validation")]
    names = ["code", "__base__", "math"]
    mixed = generate_solutions(model, tokenizer, problems, max_new_tokens=8, adapter_names=names)
    for i, name in enumerate(names):
        with use_head(model, "base" if name == "__base__" else name):
            alone = generate_solutions(model, tokenizer, problems, max_new_tokens=8)
        assert mixed[i] == alone[i], name


def test_use_head_restores_the_active_head_and_knows_the_heads(two_heads):
    model, _ = two_heads
    model.set_adapter("math")
    with use_head(model, "code"):
        assert model.active_adapter == "code"
    assert model.active_adapter == "math"
    with pytest.raises(ValueError, match=r"Unknown head 'poetry'; known heads: \['code', 'math'\]"):
        with use_head(model, "poetry"):
            pass


def test_evaluate_heads_names_results_by_head(two_heads):
    model, tokenizer = two_heads
    results = evaluate_heads(model, tokenizer, generate_examples(2), ["base", "math"], max_new_tokens=4)
    assert list(results) == ["base", "math"]
    assert results["base"].perplexity != results["math"].perplexity


def test_load_heads_names_heads_after_their_folders(tiny_lm_dir, two_heads, tmp_path):
    model, _ = two_heads
    model.save_pretrained(tmp_path / "saved")  # 'math' and 'code' land in sub-folders
    base, _ = load_base_model(str(tiny_lm_dir))
    loaded, names = load_heads(base, [tmp_path / "saved" / "math", tmp_path / "saved" / "code"])
    assert names == ["math", "code"] and set(loaded.peft_config) == {"math", "code"}
    with pytest.raises(ValueError, match="No head at .*nothing"):
        load_heads(load_base_model(str(tiny_lm_dir))[0], [tmp_path / "nothing"])


def test_write_json_replaces_the_file_in_one_step(tmp_path):
    path = tmp_path / "out" / "results.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_write_json_leaves_no_temporary_file_when_the_rename_fails(tmp_path):
    (tmp_path / "results.json").mkdir()  # --output names a folder: the rename onto it fails
    with pytest.raises(IsADirectoryError):
        write_json(tmp_path / "results.json", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert list((tmp_path / "results.json").iterdir()) == []


def test_write_json_leaves_the_old_file_and_no_temporary_one_when_the_payload_is_not_json(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert json.loads(path.read_text()) == {"a": 1}


def test_generation_prompts_are_encoded_as_training_prompts(tmp_path):
    """Without a chat template the prompt starts with BOS in training; generation must see the same tokens."""
    from conftest import save_tiny_lm

    model, tokenizer = load_base_model(str(save_tiny_lm(tmp_path / "plain", chat=False)))
    examples = generate_examples(4, split="test")
    features, _ = tokenize_examples(examples, tokenizer, 512)
    solutions = generate_solutions(model, tokenizer, [e.problem for e in examples], max_new_tokens=1)
    for row, solution in zip(features, solutions, strict=True):
        prompt = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label == -100]
        assert prompt[0] == tokenizer.bos_token_id
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax().item()
        assert solution == tokenizer.decode([expected], skip_special_tokens=True)


def test_a_spent_time_budget_scores_one_perplexity_batch_and_no_answers(two_heads):
    """A spent budget still gives every model a perplexity (one batch, the same problems) and skips generation."""
    model, tokenizer = two_heads
    examples = generate_examples(6, split="test")
    settings = dict(max_new_tokens=2, batch_size=2, max_length=64, progress=False)
    _, report = tokenize_examples(examples, tokenizer, 64)
    assert report.truncated == 6, "the premise: 64 tokens cut every one of these examples"
    cut = evaluate_heads(model, tokenizer, examples, ["base", "math", "code"], time_budget_seconds=0.0, **settings)
    whole = evaluate_heads(model, tokenizer, examples[:2], ["base", "math", "code"], generation_limit=0, **settings)
    assert [(r.n, r.perplexity_problems, r.exact_match, r.f1) for r in cut.values()] == [(0, 2, None, None)] * 3
    for name in cut:  # the same two problems give the same metrics, whatever cut them
        assert cut[name].truncated == 6 and whole[name].truncated == 2  # counted over all examples given
        assert dataclasses.replace(cut[name], truncated=2) == whole[name]


def test_a_time_budget_stops_generation_between_batches_for_every_model(two_heads, monkeypatch):
    """No generation batch starts once the budget is spent; all models are scored on the same problems."""
    from peft_backattn.workbench import evaluation

    clock = {"now": 0.0}  # a clock that moves only when a batch is generated: 10 s per model and batch
    monkeypatch.setattr(evaluation, "time", types.SimpleNamespace(monotonic=lambda: clock["now"]))
    generate_batch = evaluation._generate_batch

    def slow_generate_batch(*args, **kwargs):
        clock["now"] += 10.0
        return generate_batch(*args, **kwargs)

    monkeypatch.setattr(evaluation, "_generate_batch", slow_generate_batch)
    model, tokenizer = two_heads
    examples = generate_examples(7, split="test")
    settings = dict(max_new_tokens=2, batch_size=2, max_length=128, progress=False)
    heads = ["base", "math", "code"]
    cut = evaluate_heads(model, tokenizer, examples, heads, time_budget_seconds=35.0, **settings)
    # batch 1 starts at 0 s, batch 2 at 30 s (< 35), batch 3 would start at 60 s: 4 problems answered
    assert [(r.n, r.perplexity_problems) for r in cut.values()] == [(4, 7)] * 3
    clock["now"] = 0.0
    assert cut == evaluate_heads(model, tokenizer, examples, heads, generation_limit=4, **settings)


def test_models_taking_turns_equal_each_model_evaluated_alone(two_heads):
    model, tokenizer = two_heads
    examples = generate_examples(5, split="test")
    settings = dict(max_new_tokens=3, batch_size=2, max_length=128, progress=False)
    together = evaluate_heads(model, tokenizer, examples, ["base", "math", "code"], **settings)
    for name in ("base", "math", "code"):
        with use_head(model, name):
            assert evaluate(model, tokenizer, examples, **settings) == together[name]


def test_no_time_budget_scores_every_problem(two_heads):
    model, tokenizer = two_heads
    examples = generate_examples(5, split="test")
    results = evaluate_heads(
        model, tokenizer, examples, ["math", "base"], max_new_tokens=2, batch_size=2, max_length=128, progress=False
    )
    assert [result.n for result in results.values()] == [5, 5]


def test_generation_limit_zero_measures_perplexity_only(two_heads):
    """0 means no generation: the generation metrics are absent (None), not zeros."""
    model, tokenizer = two_heads
    examples = generate_examples(3, split="test")
    result = evaluate(model, tokenizer, examples, max_new_tokens=4, max_length=256, generation_limit=0)
    assert result.n == 0 and result.perplexity > 1
    assert (result.exact_match, result.precision, result.recall, result.f1, result.mse) == (None,) * 5
    assert "perplexity" in format_table({"base": result})


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"generation_limit": -1}, r"--generation-limit \(generation_limit\) must be an integer >= 0"),
        ({"batch_size": 0}, r"--batch-size \(batch_size\) must be a positive integer, got 0"),
        ({"max_new_tokens": 0}, r"--max-new-tokens \(max_new_tokens\) must be a positive integer, got 0"),
        ({"max_length": 600}, r"--max-length \(max_length\) is 600 tokens, beyond the 512 positions the base takes"),
        ({"max_new_tokens": 600}, r"problem \d's prompt \(\d+ tokens\) plus --max-new-tokens \(max_new_tokens\) 600"),
    ],
)
def test_evaluate_refuses_bad_settings_before_running(two_heads, settings, message):
    model, tokenizer = two_heads
    with pytest.raises(ValueError, match=message):
        evaluate(model, tokenizer, generate_examples(2, split="test"), **{"max_length": 256, **settings})
