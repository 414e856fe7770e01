"""The embedded word-problem generator: deterministic, disjoint splits, and arithmetic that checks out."""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction

import pytest

from peft_backattn.workbench.problems import MathExample
from peft_backattn.workbench.synthetic import SPLITS, generate_examples

# A worked step 'a op b [op c ...] = r' in a solution line.
EQUATION = re.compile(r"((?:\d+ [-+*/] )+\d+) = (\d+)")
NUMBER = re.compile(r"\d+")
# Numbers a solution may use without the problem stating them: percent, minutes per hour, meters per kilometer.
CONSTANTS = {100, 60, 1000}
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expression: str) -> Fraction:
    """Exact value of an arithmetic expression of integers, with Python's precedence, computed independently."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        raise AssertionError(f"unexpected syntax in {expression!r}")

    return walk(ast.parse(expression, mode="eval").body)


@pytest.fixture(scope="module")
def by_split() -> dict[str, list[MathExample]]:
    return {split: generate_examples(300, split=split) for split in SPLITS}


def test_deterministic_for_split_and_seed():
    assert generate_examples(40, split="validation", seed=7) == generate_examples(40, split="validation", seed=7)
    assert generate_examples(40, seed=7) != generate_examples(40, seed=8)
    assert generate_examples(10, seed=7) == generate_examples(40, seed=7)[:10]


def test_count_and_distinct_problems(by_split):
    for examples in by_split.values():
        assert len(examples) == 300
        assert len({example.problem for example in examples}) == 300
    assert len(generate_examples(1, split="test")) == 1


def test_splits_are_disjoint(by_split):
    problems = {split: {example.problem for example in examples} for split, examples in by_split.items()}
    assert not problems["train"] & problems["validation"]
    assert not problems["train"] & problems["test"]
    assert not problems["validation"] & problems["test"]
    # Another seed draws other problems, but never one that a different split of seed 0 holds.
    other_seed_train = {example.problem for example in generate_examples(300, split="train", seed=1)}
    assert not other_seed_train & (problems["validation"] | problems["test"])


def test_every_step_holds_and_leads_to_the_answer(by_split):
    for example in (example for examples in by_split.values() for example in examples):
        *steps, answer_line = example.solution.split("\n")
        assert answer_line == f"#### {example.answer}"
        assert 2 <= len(steps) <= 4
        known = {int(number) for number in NUMBER.findall(example.problem)} | CONSTANTS
        result = None
        for step in steps:
            equations = EQUATION.findall(step)
            assert len(equations) == 1, step
            left, right = equations[0]
            assert evaluate(left) == int(right), step
            # Each operand comes from the problem or an earlier step, so the chain computes what was asked.
            assert {int(number) for number in NUMBER.findall(left)} <= known, (example.problem, step)
            result = int(right)
            known.add(result)
        assert int(example.answer) == result


def test_varied_templates_names_and_numbers(by_split):
    examples = by_split["train"]
    # The operators of the steps differ from template to template.
    shapes = {tuple(re.findall(r" ([-+*/]) ", example.solution)) for example in examples}
    assert len(shapes) >= 8
    starts = {example.problem.split()[0] for example in examples}
    assert len(starts) >= 15
    assert len({example.answer for example in examples}) >= 100


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"count": 0}, "count must be a positive integer, got 0"),
        ({"count": -3}, "count must be a positive integer, got -3"),
        ({"count": 2.5}, "count must be a positive integer, got 2.5"),
        ({"count": 5, "split": "dev"}, "unknown split 'dev'; use one of train, validation, test"),
    ],
)
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_examples(**kwargs)
