"""Evaluation metrics for math-reasoning outputs: final-answer exact match, numeric error, token overlap, perplexity.

A worked solution is first reduced to its final answer with `extract_answer` (GSM8K's `#### N`, MATH's `\\boxed{...}`,
or else the last number). Two answers are compared as numbers when both parse (`parse_number`), and otherwise as
normalised strings (`normalize_answer`). Parsing is strict on purpose: a string that is not plainly one number is not
a number, so that an answer like `3 and 4` or `(1, 2)` can never be scored as 3 or 1.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

# The opening of a `\boxed{`; its body is found by counting braces (`_braced`), which a regex cannot do.
_BOXED_RE = re.compile(r"\\boxed\s*\{")
# The opening of a LaTeX command that only sets its argument as text, e.g. `\text{ cm}` or `\mbox{(B)}`.
_TEXT_COMMAND_RE = re.compile(r"\\(?:text|textrm|textbf|textit|mbox|mathrm|mathbf)\s*\{")
# `\left` and `\right` before a delimiter (but not `\rightarrow`): they only size the delimiter.
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
# `\dfrac` and `\tfrac`, which are `\frac` in another size.
_SIZED_FRAC_RE = re.compile(r"\\[dt]frac(?![a-zA-Z])")
# MATH's thousands separator `10,\!080`: a comma followed by a negative thin space (and sometimes a space).
_THOUSANDS_SPACING_RE = re.compile(r",\\!\s*")
# LaTeX spacing commands `\!`, `\,`, `\;`, `\:` and `\ `, but not the line break `\\` before a space or comma.
_LATEX_SPACE_RE = re.compile(r"(?<!\\)\\[!,;: ]")
_WHITESPACE_RE = re.compile(r"\s+")

# A number in running text, for the last-number fallback: '1,234,567', '-3', '2.5', '.5'. A '-' counts as a sign
# only when it does not follow a word or a closing bracket (in '5-3' it is a subtraction), and a match never starts
# inside another number.
_NUMBER_IN_TEXT_RE = re.compile(r"(?:(?<![\w)\]])-)?(?<![\d.])(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)")

# An unsigned number: digits with optional thousands commas and decimals, or a bare decimal like '.5'.
_UNSIGNED = r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
# A whole answer that is exactly one number, once wrappers are gone: an optional 'x =', a sign, then a mixed number
# ('1 1/2', '1\frac{1}{2}'), a fraction ('3/4', '\frac{3}{4}', '\frac34') or a plain number, then an optional percent
# or degree sign and unit words ('5 cm', '18 dollars', '15 cm^2'). A unit must be set off by a space, so that '2k'
# or '5r^5' (expressions, not numbers) do not match.
_NUMERIC_ANSWER_RE = re.compile(
    rf"""
    (?:[a-z]\s*=\s*)?
    (?P<sign>[+-])?\s*
    (?:
        (?:(?P<whole>\d+)(?:\s+|(?=\\)))?
        (?:
            (?P<num>{_UNSIGNED})\s*/\s*(?P<den>{_UNSIGNED})
          | \\frac\s*(?:\{{\s*(?P<frac_num>[+-]?{_UNSIGNED})\s*\}}|(?P<frac_num_digit>\d))
                \s*(?:\{{\s*(?P<frac_den>[+-]?{_UNSIGNED})\s*\}}|(?P<frac_den_digit>\d))
        )
      | (?P<value>{_UNSIGNED})
    )
    (?:\s*(?:\\?%|\^\s*\{{?\s*\\circ\s*\}}?|°))?
    (?:\s+[a-z]+(?:\^\{{?\d\}}?)?)*
    """,
    re.VERBOSE | re.IGNORECASE,
)
# Overlap tokens: a run of letters, a number with inner '.' or ',' kept ('1,000', '2.5'), or any other single symbol.
_TOKEN_RE = re.compile(r"[^\W\d_]+|\d+(?:[.,]\d+)*|\S")


def _braced(text: str, start: int) -> str | None:
    """The text inside the brace group that opens at `text[start]`, or None when it never closes.

    Escaped braces (`\\{`, `\\}`, as in a set `\\{1, 2\\}`) are content, not grouping.
    """
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "{}" and i > 0 and text[i - 1] == "\\":
            continue
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last closed `\\boxed{...}`; an unclosed one (a cut-off generation) is passed over."""
    for match in reversed(list(_BOXED_RE.finditer(text))):
        content = _braced(text, match.end() - 1)
        if content is not None:
            return content
    return None


def _unwrap(text: str, command_re: re.Pattern[str], separator: str = "") -> str:
    """Replace each `\\command{content}` opened by a `command_re` match with `separator + content`, nested ones too."""
    while (match := command_re.search(text)) is not None:
        content = _braced(text, match.end() - 1)
        if content is None:
            break  # unclosed: leave the rest as written
        text = text[: match.start()] + separator + content + text[match.end() + len(content) + 1 :]
    return text


def _strip_one_period(text: str) -> str:
    """Drop the full stop that ends a sentence ('The answer is 18.'), without touching '.5'."""
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def _to_float(number: str) -> float:
    """The value of a matched number; thousands commas are only grouping."""
    return float(number.replace(",", ""))


def _check_same_length(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: len(predictions)={len(predictions)}, "
            f"len(references)={len(references)}"
        )


def extract_answer(text: str) -> str | None:
    """The final answer of a worked solution, or None when there is none.

    In order of preference: the text after the last `####` marker (GSM8K style), up to the end of its line, so
    that anything generated after the answer line is ignored; the content of the last `\\boxed{...}` (nested
    braces allowed); the last number in the text.
    """
    if not text:
        return None
    if "####" in text:
        answer = text.rsplit("####", 1)[1].strip()
        answer = answer.splitlines()[0] if answer else ""
    elif (boxed := _last_boxed(text)) is not None:
        answer = boxed
    else:
        numbers = _NUMBER_IN_TEXT_RE.findall(text)
        answer = numbers[-1] if numbers else ""
    return answer.strip() or None


def has_answer_line(text: str | None) -> bool:
    """Whether a solution states its answer the GSM8K way, in a `#### N` line whose N is one number: the format a
    math head should at least teach, whether or not N is right."""
    return bool(text) and "####" in text and parse_number(extract_answer(text)) is not None


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % for z = 1.96): the range an exact match of `successes` of `n` is
    compatible with, so that a difference of one problem is not read as a result. Sound at 0 and n, unlike the
    normal approximation."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n and n > 0, got {successes} of {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def parse_number(text: str | None) -> float | None:
    """Numeric value of an answer string, or None when it is not exactly one finite number.

    Accepts thousands commas, currency and units ('$18', '5 cm', '12%' -> 12.0, '90^\\circ'), signs, decimals,
    fractions ('3/4', '\\frac{3}{4}', '\\dfrac34'), mixed numbers ('1 1/2' -> 1.5), a leading 'x =', and a
    surrounding `\\boxed{}` or `$...$`. Anything else, such as '3 and 4', '(1, 2)' or '2\\sqrt{3}', is not a number.
    """
    if text is None:
        return None
    text = _unwrap(text.strip(), _BOXED_RE)
    text = _unwrap(text, _TEXT_COMMAND_RE, separator=" ")  # '5\text{cm}' is '5 cm'
    text = text.replace("\\$", "").replace("$", "").replace("\u2212", "-")  # U+2212 is the typographic minus
    text = _THOUSANDS_SPACING_RE.sub(",", text)
    text = _LATEX_SPACE_RE.sub(" ", text)
    text = _SIZED_FRAC_RE.sub(r"\\frac", text)
    match = _NUMERIC_ANSWER_RE.fullmatch(_strip_one_period(text))
    if match is None:
        return None
    if match["value"] is not None:
        value = _to_float(match["value"])
    else:
        numerator = _to_float(match["num"] or match["frac_num"] or match["frac_num_digit"])
        denominator = _to_float(match["den"] or match["frac_den"] or match["frac_den_digit"])
        if denominator == 0:
            return None
        value = numerator / denominator
        if match["whole"] is not None:
            value += float(match["whole"])
    if match["sign"] == "-":
        value = -value
    return value if math.isfinite(value) else None


def normalize_answer(text: str | None) -> str:
    """Canonical string form of an answer that is not a number, so that writing style does not decide a match.

    Drops `\\boxed{}`, `\\text{}`-like wrappers (keeping their content), `$`, `\\left`/`\\right`, LaTeX spacing, all
    whitespace and a trailing period; `\\dfrac` becomes `\\frac`; lower-cases the result.
    """
    if text is None:
        return ""
    text = _unwrap(text, _BOXED_RE)
    text = _unwrap(text, _TEXT_COMMAND_RE)
    text = text.replace("\\$", "").replace("$", "")
    text = _LEFT_RIGHT_RE.sub("", text)
    text = _LATEX_SPACE_RE.sub("", text)
    text = _SIZED_FRAC_RE.sub(r"\\frac", text)
    text = _WHITESPACE_RE.sub("", text)
    return _strip_one_period(text).lower()


def answers_match(prediction: str | None, reference: str | None, tolerance: float = 1e-6) -> bool:
    """Whether two final answers agree: as numbers within `tolerance` (relative or absolute) when both parse as
    numbers, else as equal non-empty normalised strings."""
    predicted, expected = parse_number(prediction), parse_number(reference)
    if predicted is not None and expected is not None:
        return math.isclose(predicted, expected, rel_tol=tolerance, abs_tol=tolerance)
    normalized = normalize_answer(prediction)
    return normalized != "" and normalized == normalize_answer(reference)


def exact_match(predictions: Sequence[str | None], references: Sequence[str | None]) -> float:
    """Fraction of already-extracted final answers that match their reference (`answers_match`); 0.0 when empty."""
    _check_same_length(predictions, references)
    if not predictions:
        return 0.0
    return sum(answers_match(p, r) for p, r in zip(predictions, references, strict=True)) / len(predictions)


@dataclass(frozen=True)
class NumericErrors:
    """Squared error over numeric answers, with the counts needed to read it (an MSE over 3 of 100 pairs is noise)."""

    mse: float | None  # None when no pair is numeric on both sides
    rmse: float | None
    n: int  # pairs where both prediction and reference are numeric
    n_unparsed: int  # pairs whose reference is numeric but the prediction is not (counted, not scored)


def numeric_errors(predictions: Sequence[str | None], references: Sequence[str | None]) -> NumericErrors:
    """Mean squared error between extracted final answers, over the pairs where both sides parse as numbers.

    Pairs with a non-numeric reference are left out entirely; those with a numeric reference but a non-numeric
    prediction are counted in `n_unparsed`, since giving them any error value would be arbitrary.
    """
    _check_same_length(predictions, references)
    squared_errors = []
    n_unparsed = 0
    for prediction, reference in zip(predictions, references, strict=True):
        expected = parse_number(reference)
        if expected is None:
            continue
        predicted = parse_number(prediction)
        if predicted is None:
            n_unparsed += 1
            continue
        difference = predicted - expected
        squared_errors.append(difference * difference)  # not `** 2`, which raises on overflow instead of giving inf
    if not squared_errors:
        return NumericErrors(mse=None, rmse=None, n=0, n_unparsed=n_unparsed)
    mse = math.fsum(squared_errors) / len(squared_errors)
    return NumericErrors(mse=mse, rmse=math.sqrt(mse), n=len(squared_errors), n_unparsed=n_unparsed)


def tokenize_for_overlap(text: str | None) -> list[str]:
    """Lower-cased tokens for overlap scores: letter runs, numbers ('1,000' and '2.5' whole), single symbols.

    Symbols are tokens of their own because in math answers they carry meaning ('-', '/', '^').
    """
    if text is None:
        return []
    return _TOKEN_RE.findall(text.lower())


@dataclass(frozen=True)
class OverlapScores:
    """Bag-of-tokens agreement of a prediction with its reference, each score in [0, 1]."""

    precision: float
    recall: float
    f1: float


def token_overlap(prediction: str | None, reference: str | None) -> OverlapScores:
    """Bag-of-tokens precision, recall and F1 of a prediction against its reference, as in SQuAD.

    Tokens are counted with multiplicity, so repeating a correct token does not raise precision. Two empty texts
    agree perfectly; one empty text against a non-empty one scores zero.
    """
    predicted, expected = tokenize_for_overlap(prediction), tokenize_for_overlap(reference)
    if not predicted and not expected:
        return OverlapScores(1.0, 1.0, 1.0)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return OverlapScores(0.0, 0.0, 0.0)
    precision, recall = common / len(predicted), common / len(expected)
    return OverlapScores(precision, recall, 2 * precision * recall / (precision + recall))


def mean_token_overlap(predictions: Sequence[str | None], references: Sequence[str | None]) -> OverlapScores:
    """Macro average of `token_overlap` over pairs (each score averaged on its own); zeros when empty."""
    _check_same_length(predictions, references)
    if not predictions:
        return OverlapScores(0.0, 0.0, 0.0)
    scores = [token_overlap(p, r) for p, r in zip(predictions, references, strict=True)]
    return OverlapScores(
        precision=math.fsum(s.precision for s in scores) / len(scores),
        recall=math.fsum(s.recall for s in scores) / len(scores),
        f1=math.fsum(s.f1 for s in scores) / len(scores),
    )


def perplexity(total_nll: float, total_tokens: int) -> float:
    """Perplexity of the target tokens, exp(total_nll / total_tokens), from a summed natural-log NLL.

    Returns math.inf when the exponent overflows, so that a diverged model reports a value instead of crashing.
    """
    if total_tokens <= 0:
        raise ValueError(f"perplexity needs at least one target token, got total_tokens={total_tokens}")
    try:
        return math.exp(total_nll / total_tokens)
    except OverflowError:
        return math.inf
