"""The answer metrics on hand-computed cases, and answer extraction on the real GSM8K, MATH-500 and
OpenMathInstruct-2 rows."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from conftest import requires_shared_data

from peft_backattn.workbench.metrics import (
    answers_match,
    exact_match,
    extract_answer,
    has_answer_line,
    mean_token_overlap,
    normalize_answer,
    numeric_errors,
    parse_number,
    perplexity,
    token_overlap,
    tokenize_for_overlap,
    wilson_interval,
)


def check(actual, expected):
    """Compare a result with its hand-computed value; floats (also inside the metric dataclasses) approximately."""
    if dataclasses.is_dataclass(actual):
        actual = dataclasses.astuple(actual)
    if isinstance(expected, float):
        assert isinstance(actual, float), actual
    if isinstance(expected, (float, tuple)):
        assert actual == pytest.approx(expected)
    else:
        assert actual == expected


EXTRACT_CASES = [
    # GSM8K: the text after the last '####', up to the end of its line
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
    ("So he made 1,000 + 234 = 1,234 dollars\n#### 1,234", "1,234"),
    ("#### 5\nOn second thought:\n####  -7 ", "-7"),
    ("The answer is 3.\n#### 3\n\nQuestion: Tom has 12 apples.", "3"),
    ("#### \n", None),
    # MATH: the content of the last closed \boxed{}
    ("So $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("First $\\boxed{15\\frac{39}{40}}$, or $\\boxed{\\frac{639}{40}}$ inches.", "\\frac{639}{40}"),
    ("The set is $\\boxed{\\{1, 2\\}}$.", "\\{1, 2\\}"),
    ("It is $\\boxed{5}$, not $\\boxed{\\frac{1}{", "5"),  # a cut-off last box is passed over
    ("$\\boxed{ }$ and 7", None),
    # otherwise the last number
    ("He has 3 apples and buys 1,234,567 more.", "1,234,567"),
    ("The temperature fell to -3.5 degrees.", "-3.5"),
    ("It costs .5 dollars", ".5"),
    ("so 9 - 2 = 7 and the range is 5-3", "3"),  # '-' after a digit is a subtraction, not a sign
    ("The lists are 1,2,3", "3"),  # commas not in groups of three separate numbers
    ("no numbers here", None),
    ("", None),
]


@pytest.mark.parametrize("text, expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
    check(extract_answer(text), expected)


PARSE_NUMBER_CASES = [
    ("42", 42.0),
    ("1,000", 1000.0),
    ("1,234,567", 1234567.0),
    ("$18", 18.0),
    ("\\$18.90", 18.9),
    ("18 dollars", 18.0),
    ("5 cm", 5.0),
    ("15\\mbox{ cm}^2", 15.0),
    ("5.4 \\text{ cents}", 5.4),
    ("3 hours", 3.0),
    ("12%", 12.0),
    ("10\\%", 10.0),
    ("90^\\circ", 90.0),
    ("-7", -7.0),
    ("+7", 7.0),
    ("\u22123", -3.0),  # typographic minus
    (".5", 0.5),
    ("2.50", 2.5),
    ("3/4", 0.75),
    ("\\frac{3}{4}", 0.75),
    ("\\dfrac{3}{4}", 0.75),
    ("\\frac34", 0.75),
    ("\\frac 59", 5 / 9),
    ("\\frac9{19}", 9 / 19),
    ("\\frac{270}7\\text{ degrees}", 270 / 7),
    ("-\\frac{35}{9}", -35 / 9),
    ("1 1/2", 1.5),
    ("-1 1/2", -1.5),
    ("1\\frac{4}{5}", 1.8),
    ("137 \\frac{1}{2}", 137.5),
    ("11/2", 5.5),  # not the mixed number 1 1/2
    ("\\boxed{42}", 42.0),
    ("$\\frac{1}{2}$", 0.5),
    ("18.", 18.0),
    ("x=5", 5.0),
    ("10,\\!080", 10080.0),
    ("\\$32,\\!348", 32348.0),
    ("11,\\! 111,\\! 111,\\! 100", 11111111100.0),
    (None, None),
    ("", None),
    ("   ", None),
    ("abc", None),
    ("3 and 4", None),
    ("between 3 and 4", None),
    ("(1, 2)", None),
    ("1,-2", None),
    ("1,00", None),
    ("1/0", None),
    ("\\frac{1}{0}", None),
    ("9" * 400, None),  # overflows to inf
    ("2k", None),
    ("5r^5", None),
    ("2\\sqrt{3}", None),
    ("7\\pi", None),
    ("52_8", None),
    ("6 - 5i", None),
    ("y = 2x", None),
]


@pytest.mark.parametrize("text, expected", PARSE_NUMBER_CASES)
def test_parse_number(text, expected):
    check(parse_number(text), expected)


NORMALIZE_CASES = [
    (None, ""),
    ("\\boxed{\\text{(B)}}", "(b)"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("p - q", "p-q"),
    ("\\text{Evelyn}.", "evelyn"),
    ("$x^2$", "x^2"),
    ("\\dfrac{\\pi}{2}", "\\frac{\\pi}{2}"),
    ("x \\rightarrow 0", "x\\rightarrow0"),  # \right only as a delimiter size
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\\{1\\pm\\sqrt{5},\\,-2\\}", "\\{1\\pm\\sqrt{5},-2\\}"),
]


@pytest.mark.parametrize("text, expected", NORMALIZE_CASES)
def test_normalize_answer(text, expected):
    check(normalize_answer(text), expected)


ANSWERS_MATCH_CASES = [
    # (prediction, reference, tolerance, expected)
    ("0.5", "\\frac{1}{2}", 1e-6, True),
    ("$18.00", "18", 1e-6, True),
    ("12%", "12", 1e-6, True),
    ("1,234", "1234", 1e-6, True),
    ("90", "90^\\circ", 1e-6, True),
    ("18", "19", 1e-6, False),
    ("0.333333", "\\frac{1}{3}", 1e-6, True),
    ("4.6667", "\\frac{14}{3}", 1e-6, False),
    ("4.6667", "\\frac{14}{3}", 1e-4, True),
    ("\\text{(B)}", "(b)", 1e-6, True),
    ("\\text{Evelyn}", "Evelyn", 1e-6, True),
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", 1e-6, True),
    ("p-q", "p - q", 1e-6, True),
    ("q - p", "p - q", 1e-6, False),
    ("52", "52_8", 1e-6, False),
    ("2", "2k", 1e-6, False),
    ("3", "3 and 4", 1e-6, False),
    (None, None, 1e-6, False),
    ("", "", 1e-6, False),
    (None, "5", 1e-6, False),
    ("5", None, 1e-6, False),
]


@pytest.mark.parametrize("prediction, reference, tolerance, expected", ANSWERS_MATCH_CASES)
def test_answers_match(prediction, reference, tolerance, expected):
    check(answers_match(prediction, reference, tolerance=tolerance), expected)


NUMERIC_ERRORS_CASES = [
    # (predictions, references, (mse, rmse, n, n_unparsed))
    (["3", "x", "5"], ["1", "2", "5"], (2.0, math.sqrt(2.0), 2, 1)),  # errors 2 and 0; 'x' is not scored
    (["1/2", "$10", None], ["0.5", "7", "x + 1"], (4.5, math.sqrt(4.5), 2, 0)),  # a non-numeric reference is skipped
    (["a"], ["1"], (None, None, 0, 1)),
    (["1", "2"], ["a", "b"], (None, None, 0, 0)),
    ([], [], (None, None, 0, 0)),
    (["1" + "0" * 200], ["0"], (math.inf, math.inf, 1, 0)),  # (1e200)^2 overflows to inf rather than raising
]


@pytest.mark.parametrize("predictions, references, expected", NUMERIC_ERRORS_CASES)
def test_numeric_errors(predictions, references, expected):
    check(numeric_errors(predictions, references), expected)


TOKENIZE_CASES = [
    ("1,000 and 2.5", ["1,000", "and", "2.5"]),
    ("x^2+3=7.", ["x", "^", "2", "+", "3", "=", "7", "."]),
    ("\\frac{1}{2}", ["\\", "frac", "{", "1", "}", "{", "2", "}"]),
    ("Hello, World", ["hello", ",", "world"]),
    ("abc123", ["abc", "123"]),
    ("3, 4", ["3", ",", "4"]),
    ("", []),
    (None, []),
]


@pytest.mark.parametrize("text, expected", TOKENIZE_CASES)
def test_tokenize_for_overlap(text, expected):
    check(tokenize_for_overlap(text), expected)


TOKEN_OVERLAP_CASES = [
    # (prediction, reference, (precision, recall, f1))
    ("the cat sat", "the cat sat", (1.0, 1.0, 1.0)),
    ("The Cat", "the cat", (1.0, 1.0, 1.0)),
    ("the cat", "the cat sat on the mat", (1.0, 1 / 3, 0.5)),  # 2 common of 2 and of 6
    ("the the the", "the cat", (1 / 3, 1 / 2, 0.4)),  # repeats count once per reference occurrence
    ("1,000 apples", "apples: 1,000", (1.0, 2 / 3, 0.8)),
    ("x^2", "x^3", (2 / 3, 2 / 3, 2 / 3)),
    ("!!!", "answer 5", (0.0, 0.0, 0.0)),  # malformed prediction
    ("", "", (1.0, 1.0, 1.0)),
    (None, None, (1.0, 1.0, 1.0)),
    ("", "x", (0.0, 0.0, 0.0)),
    ("x", None, (0.0, 0.0, 0.0)),
]


@pytest.mark.parametrize("prediction, reference, expected", TOKEN_OVERLAP_CASES)
def test_token_overlap(prediction, reference, expected):
    check(token_overlap(prediction, reference), expected)


MEAN_TOKEN_OVERLAP_CASES = [
    # macro average: precision (1 + 0) / 2, recall (1/3 + 0) / 2, f1 (0.5 + 0) / 2
    (["the cat", "x"], ["the cat sat on the mat", "y"], (0.5, 1 / 6, 0.25)),
    ([], [], (0.0, 0.0, 0.0)),
]


@pytest.mark.parametrize("predictions, references, expected", MEAN_TOKEN_OVERLAP_CASES)
def test_mean_token_overlap(predictions, references, expected):
    check(mean_token_overlap(predictions, references), expected)


PERPLEXITY_CASES = [
    (0.0, 10, 1.0),
    (10 * math.log(4.0), 10, 4.0),
    (3 * math.log(8.0) + 2 * math.log(2.0), 5, math.exp((3 * math.log(8.0) + 2 * math.log(2.0)) / 5)),
    (1e6, 1, math.inf),  # exp overflows
]


@pytest.mark.parametrize("total_nll, total_tokens, expected", PERPLEXITY_CASES)
def test_perplexity(total_nll, total_tokens, expected):
    check(perplexity(total_nll, total_tokens), expected)


@pytest.mark.parametrize("total_tokens", [0, -3])
def test_perplexity_needs_tokens(total_tokens):
    with pytest.raises(ValueError, match=f"at least one target token, got total_tokens={total_tokens}"):
        perplexity(1.0, total_tokens)


EXACT_MATCH_CASES = [
    (["18", "0.5", "(b)", "x"], ["18.00", "\\frac12", "\\text{(B)}", "7"], 0.75),
    ([None], ["5"], 0.0),
    ([], [], 0.0),
]


@pytest.mark.parametrize("predictions, references, expected", EXACT_MATCH_CASES)
def test_exact_match(predictions, references, expected):
    check(exact_match(predictions, references), expected)


@pytest.mark.parametrize("metric", [numeric_errors, mean_token_overlap, exact_match])
def test_length_mismatch(metric):
    message = r"^predictions and references differ in length: len\(predictions\)=2, len\(references\)=1$"
    with pytest.raises(ValueError, match=message):
        metric(["1", "2"], ["1"])


def _gsm8k_reference(row: dict) -> str:
    return row["answer"].rsplit("####", 1)[1].strip()


REAL_DATA = [
    # (file, solution of a row, reference answer of a row, lowest match rate accepted)
    ("gsm8k/test.jsonl", lambda row: row["answer"], _gsm8k_reference, 1.0),
    # with the '#### N' line cut off, the last-number fallback has to find the answer in the worked steps
    ("gsm8k/test.jsonl", lambda row: row["answer"].rsplit("####", 1)[0], _gsm8k_reference, 0.95),
    (
        "openmathinstruct2/sample100.jsonl",
        lambda row: row["generated_solution"],
        lambda row: row["expected_answer"],
        0.95,
    ),
    ("math500/test.jsonl", lambda row: row["solution"], lambda row: row["answer"], 0.95),
]


@pytest.mark.parametrize(
    "path, solution, reference, min_rate", REAL_DATA, ids=["gsm8k", "gsm8k-no-marker", "openmathinstruct2", "math500"]
)
def test_extracted_answers_match_the_real_references(path, solution, reference, min_rate):
    with open(requires_shared_data() / path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert rows, path
    misses = [
        (extract_answer(solution(row)), reference(row))
        for row in rows
        if not answers_match(extract_answer(solution(row)), reference(row))
    ]
    rate = 1 - len(misses) / len(rows)
    assert rate >= min_rate, f"{path}: {rate:.2%} of {len(rows)} rows match; first misses: {misses[:5]}"


def test_gsm8k_references_are_numbers():
    with open(requires_shared_data() / "gsm8k/test.jsonl", encoding="utf-8") as f:
        references = [_gsm8k_reference(json.loads(line)) for line in f if line.strip()]
    assert [r for r in references if parse_number(r) is None] == []
    assert any("," in r for r in references)  # the thousands commas are exercised


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3 + 4 = 7\n#### 7", True),
        ("#### 1,200\nand then more text", True),  # the answer line need not be last
        ("#### $18.50", True),
        ("#### seven", False),  # the line is there, the number is not
        ("#### 3 and 4", False),
        ("The answer is 7.", False),  # a number, but not the format
        ("", False),
        (None, False),
    ],
)
def test_has_answer_line(text, expected):
    assert has_answer_line(text) is expected


def _wilson_by_bisection(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson interval from its definition: the p whose normal test does not reject p_hat, |p_hat - p| <=
    z sqrt(p (1 - p) / n), found by bisection on each side of p_hat."""
    p_hat = successes / n

    def inside(p: float) -> bool:
        return abs(p_hat - p) <= z * math.sqrt(p * (1 - p) / n)

    def edge(outside: float, inner: float) -> float:
        for _ in range(200):
            middle = (outside + inner) / 2
            outside, inner = (outside, middle) if inside(middle) else (middle, inner)
        return inner

    return edge(0.0, p_hat) if successes else 0.0, edge(1.0, p_hat) if successes < n else 1.0


@pytest.mark.parametrize("successes, n", [(0, 200), (1, 200), (13, 200), (100, 200), (200, 200), (3, 7)])
def test_wilson_interval_matches_its_definition(successes, n):
    low, high = wilson_interval(successes, n)
    expected_low, expected_high = _wilson_by_bisection(successes, n)
    assert low == pytest.approx(expected_low, abs=1e-9) and high == pytest.approx(expected_high, abs=1e-9)
    assert low <= successes / n <= high


@pytest.mark.parametrize("successes, n", [(1, 0), (-1, 10), (11, 10)])
def test_wilson_interval_refuses_impossible_counts(successes, n):
    with pytest.raises(ValueError, match="wilson_interval needs 0 <= successes <= n and n > 0"):
        wilson_interval(successes, n)
