"""What the workbench calls a math problem: `MathExample`, and the column mappings of the data sets it reads.

Plain data types with no dependencies, so that the loaders (`data`) and the generator (`synthetic`) share them
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldMapping:
    """Which columns of a dataset hold the problem, the worked solution and the final answer."""

    problem: str
    solution: str
    answer: str | None = None  # None: the answer is taken from the solution (GSM8K's '#### N' line)

    def __str__(self) -> str:
        """The command-line form, which `parse_field_mapping` reads back."""
        answer = "" if self.answer is None else f",answer={self.answer}"
        return f"problem={self.problem},solution={self.solution}{answer}"


SCHEMAS: dict[str, FieldMapping] = {
    "openmathinstruct2": FieldMapping("problem", "generated_solution", "expected_answer"),
    "gsm8k": FieldMapping("question", "answer", None),
    "math500": FieldMapping("problem", "solution", "answer"),
}


def parse_field_mapping(text: str) -> FieldMapping:
    """'problem=question,solution=answer[,answer=final]' -> FieldMapping, for the command line."""
    expected = "expected 'problem=COLUMN,solution=COLUMN[,answer=COLUMN]'"
    columns: dict[str, str] = {}
    for part in text.split(","):
        key, sep, column = (piece.strip() for piece in part.partition("="))
        if not sep or not column or key not in ("problem", "solution", "answer"):
            raise ValueError(f"bad part {part.strip()!r} in field mapping {text!r}; {expected}")
        if key in columns:
            raise ValueError(f"{key!r} is given twice in field mapping {text!r}; {expected}")
        columns[key] = column
    missing = [key for key in ("problem", "solution") if key not in columns]
    if missing:
        raise ValueError(f"field mapping {text!r} lacks {' and '.join(missing)}; {expected}")
    return FieldMapping(**columns)


@dataclass(frozen=True)
class MathExample:
    """One problem with its training target."""

    problem: str
    solution: str  # worked solution ending in a '#### <answer>' line; GSM8K '<<48/2=24>>' calculator notes removed
    answer: str  # the final answer as a string, e.g. '72' or '\\frac{1}{2}'
