"""The checks of option values, and the command-line form of the dataclasses that hold options: one place for both.

A `Check` is a test of a value and the words for what it expects. `BackAttnConfig`, the workbench's options
dataclasses (`TrainingOptions`, `EvalOptions`, ...) and the functions that take the same values refuse a bad one
with the same one-line `ValueError`, naming the option: `--batch-size (batch_size) must be a positive integer, got
0.` Each field of an options dataclass holds its default, its help text, its flag (where it is not `--` + its name)
and its check (`metadata={"help": ..., "flag": ..., "check": ...}`); `check_fields` runs the checks when the
dataclass is built, and `add_dataclass_options` makes the command line's options from the same fields. The command
line only reads each value as the field's type: a value is checked when its dataclass is built, not by the parser
first.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from peft import PeftConfig


@dataclass(frozen=True)
class Check:
    """What a value must be: `accepts(value)`, and `expected`, the words an error says it in.

    `check(value, name)` returns the value, or raises `ValueError("{name} must be {expected}, got {value!r}.")`.
    """

    expected: str
    accepts: Callable[[Any], bool]

    def __call__(self, value: Any, name: str) -> Any:
        if not self.accepts(value):
            raise ValueError(f"{name} must be {self.expected}, got {value!r}.")
        return value

    def or_none(self, expected: str | None = None) -> Check:
        """The same check, taking None too; `expected` words both (default: '<expected> or None')."""
        accepts = self.accepts
        return Check(expected or f"{self.expected} or None", lambda value: value is None or accepts(value))

    def saying(self, expected: str) -> Check:
        """The same check in other words, e.g. with what a value means: 'a finite number >= 0 (0: no clipping)'."""
        return Check(expected, self.accepts)


def is_integer(value: Any) -> bool:
    """An int, not a bool (True is no batch size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A real number that is neither NaN nor infinite (bool excluded: True is no learning rate)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


positive_int = Check("a positive integer", lambda value: is_integer(value) and value > 0)
non_negative_int = Check("an integer >= 0", lambda value: is_integer(value) and value >= 0)
seed_int = Check("an integer from 0 to 2**32 - 1", lambda value: is_integer(value) and 0 <= value < 2**32)
positive_number = Check("a finite positive number", lambda value: is_finite(value) and value > 0)
non_negative_number = Check("a finite number >= 0", lambda value: is_finite(value) and value >= 0)
fraction = Check("a fraction, at least 0 and below 1", lambda value: is_finite(value) and 0 <= value < 1)
true_or_false = Check("True or False", lambda value: isinstance(value, bool))
path_like = Check("a path", lambda value: isinstance(value, (str, os.PathLike)) and str(value) != "")


def one_of(choices: Collection) -> Check:
    """One of `choices`, named in the error: "one of 'raw', 'softmax'"."""
    return Check("one of " + ", ".join(repr(choice) for choice in choices), lambda value: value in choices)


def option_flag(spec: dataclasses.Field) -> str | None:
    """The command-line flag of a dataclass field: its `flag` metadata, else `--` + its name with dashes (`--no-`
    for a bool that is on by default); None for a field that is no option (`"flag": None`)."""
    flag = spec.metadata.get("flag", "")
    if flag is None or flag:
        return flag
    negated = spec.default is True
    return ("--no-" if negated else "--") + spec.name.replace("_", "-")


def option_name(cls: type, name: str) -> str:
    """How a message names field `name` of the options dataclass `cls`: '--grad-accum (gradient_accumulation_steps)',
    or the bare name for a field that is no command-line option."""
    flag = option_flag(next(spec for spec in dataclasses.fields(cls) if spec.name == name))
    return name if flag is None else f"{flag} ({name})"


def check_fields(options: Any, name: Callable[[str], str] | None = None) -> None:
    """Run the check of each field of the dataclass instance `options` that names one (`"check"` metadata), naming
    the field `name(field)`: by default as `option_name` does."""
    for spec in dataclasses.fields(options):
        check = spec.metadata.get("check")
        if check is not None:
            check(getattr(options, spec.name), name(spec.name) if name else option_name(type(options), spec.name))


def check_option(cls: type, name: str, value: Any) -> Any:
    """`value` checked as field `name` of the options dataclass `cls` checks it, for a function that takes the same
    value as a keyword (`evaluate(batch_size=...)` checks it as `EvalOptions.batch_size` does)."""
    spec = next(spec for spec in dataclasses.fields(cls) if spec.name == name)
    return spec.metadata["check"](value, option_name(cls, name))


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a dataclass that are command-line options: those with help text and a flag that is not None.

    For `BackAttnConfig` only the fields it defines itself count; those inherited from PEFT's `PeftConfig` are
    bookkeeping (peft_type, revision, ...), not settings of the head.
    """
    inherited = {f.name for f in dataclasses.fields(PeftConfig)} if issubclass(cls, PeftConfig) else set()
    return [
        spec
        for spec in dataclasses.fields(cls)
        if spec.name not in inherited and "help" in spec.metadata and option_flag(spec) is not None
    ]


def read_as(kind: type, expected: str) -> Callable[[str], Any]:
    """An argparse `type=` that reads the text as `kind` (int, float, str), or refuses it in the words of the field's
    check: `argument --batch-size: must be a positive integer, got 'eight'`. The range is the dataclass's to check."""

    def read(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None

    read.__name__ = kind.__name__  # argparse names the type by it in some messages
    return read


def add_dataclass_options(
    group: argparse._ActionsContainer,
    cls: type,
    *,
    defaults: Mapping[str, Any] | None = None,
    leave_out: Collection[str] = (),
) -> None:
    """One option per field of `cls`, from the field's type, default, help text and check: the one source of each.

    An option that is not given leaves no attribute behind (argparse.SUPPRESS), so `given_options` passes only what
    the user typed and the dataclass's own defaults apply. `defaults` gives a command its own default for a field
    (`eval` reads the `test` split); `leave_out` names fields that are no option of this command.
    """
    defaults = defaults or {}
    hints = typing.get_type_hints(cls)
    for spec in option_fields(cls):
        if spec.name in leave_out:
            continue
        kind = hints[spec.name]
        if type(None) in typing.get_args(kind):  # `X | None` -> X
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        default = defaults.get(spec.name, spec.default)
        required = default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
        flag, negated = option_flag(spec), kind is bool and spec.default is True
        help_text = spec.metadata["help"]
        if negated:
            help_text += f" (on by default; {flag} turns it off)"
        elif not (required or kind is bool or default in (None, dataclasses.MISSING)):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": spec.name, "help": help_text}
        if not (kind is bool or "choices" in spec.metadata or typing.get_origin(kind) is Literal):
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()  # after the flag: `--lr LR`
        kwargs["default"] = default if spec.name in defaults else argparse.SUPPRESS
        if kind is bool:
            kwargs["action"] = "store_false" if negated else "store_true"
        elif "append" in spec.metadata:  # `list[str]` given one value a flag: `--head a=x --head b=y`
            kwargs.update(action="append", metavar=spec.metadata["append"])
        elif typing.get_origin(kind) is list:  # `list[str]`: the values that follow the flag
            kwargs.update(nargs="*", type=typing.get_args(kind)[0])
        else:
            choices = spec.metadata.get("choices")
            if typing.get_origin(kind) is Literal:
                choices, kind = typing.get_args(kind), str
            check = spec.metadata.get("check")
            reader = read_as(kind, check.expected) if check is not None and kind in (int, float) else kind
            kwargs.update(type=reader, choices=choices, required=required)
        group.add_argument(flag, **kwargs)


def given_options(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The options of `cls` that were given on the command line, as keyword arguments for `cls`."""
    return {spec.name: getattr(args, spec.name) for spec in option_fields(cls) if hasattr(args, spec.name)}
