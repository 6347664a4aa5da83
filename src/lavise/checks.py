"""The checks of settings values, run when a settings object is built.

A field of :mod:`lavise.settings` says what it accepts in its metadata: ``bounds``, an
interval such as ``"[1, )"`` (at least 1) or ``"(0, 1]"``; ``choices``; and ``warn``, a
predicate with the reason a legal value is almost surely a mistake. :func:`check_fields`
reads the field's annotation and metadata, refuses what does not fit with a
:class:`SettingError` and warns with a :class:`SettingWarning`. Both carry the same
message twice: naming the field (``ComputeSettings: batch_size must be at least 1, got
0.``) for Python users, and naming the option (``--batch-size must be at least 1, got
0.``) for the command line. Booleans are not numbers here, floats must be finite, and
integers must be whole numbers; numpy numbers become Python's, lists tuples and paths
strings, so that settings compare and serialise the same way. :func:`check_path` is the
command line's check of a path argument's kind.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np

from lavise.errors import LaviseError, LaviseWarning

GROUP_NAMES = tuple("abcdefghijklmnopqrstuvwxyz")  # of the groups of a planted bias
SEED_BOUNDS = "[0, 4294967295]"  # every random generator lavise uses accepts a seed of 32 bits
_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]*)\s*,\s*([^\])\s]*)\s*([\])])$")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


class SettingError(LaviseError):
    """A settings value of the wrong type or out of bounds.

    ``str(error)`` names the field, ``error.option`` is the same message naming the
    command-line option.
    """

    def __init__(self, owner: str, name: str, problem: str) -> None:
        super().__init__(f"{owner}: {problem.replace('{}', name, 1)}")
        self.name = name
        self.option = problem.replace("{}", _option(name), 1)


class SettingWarning(LaviseWarning):
    """A legal settings value that is almost surely a mistake; ``option`` names the command-line option."""

    def __init__(self, owner: str, name: str, value: object, why: str) -> None:
        super().__init__(f"{owner}: {name}={value!r}: {why}")
        self.name = name
        self.option = f"{_option(name)} {value!r}: {why}"


def parse_bounds(bounds: str) -> tuple[float | None, float | None, bool, bool]:
    """(low, high, low included, high included) of an interval; None where it is open-ended.

    Example:
        >>> parse_bounds("[1, )"), parse_bounds("(0, 1]")
        ((1.0, None, True, False), (0.0, 1.0, False, True))
    """
    match = _INTERVAL.match(bounds)
    if not match:
        raise ValueError(f"not an interval: {bounds!r}")
    left, low, high, right = match.groups()
    return (float(low) if low else None, float(high) if high else None, left == "[", right == "]")


def within(value: float, bounds: str) -> bool:
    """Whether ``value`` lies in the interval ``bounds``.

    Example:
        >>> within(0, "[0, 1)"), within(1, "[0, 1)"), within(5, "[1, )")
        (True, False, True)
    """
    low, high, closed_low, closed_high = parse_bounds(bounds)
    above = low is None or value > low or (closed_low and value == low)
    below = high is None or value < high or (closed_high and value == high)
    return above and below


def describe_bounds(bounds: str, integer: bool) -> str:
    """The interval in words: 'at least 1', 'between 1 and 95', 'in (0, 1)'.

    Example:
        >>> describe_bounds("[1, )", True), describe_bounds("[1, 95]", True), describe_bounds("(0, 1)", False)
        ('at least 1', 'between 1 and 95', 'in (0, 1)')
    """
    low, high, closed_low, closed_high = parse_bounds(bounds)
    text = _INTERVAL.match(bounds).groups()
    if high is None and low is not None:
        return f"at least {text[1]}" if closed_low else f"greater than {text[1]}"
    if integer and closed_low and closed_high and low is not None:
        return f"between {text[1]} and {text[2]}"
    return f"in {bounds}"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _number(value: object, integer: bool, bounds: str | None) -> tuple[object, str | None]:
    """The value as a Python int or float, or the problem with it ('{}' stands for its name)."""
    if integer:
        if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
            return value, f"{{}} must be a whole number, got {value!r}."
        value = int(value)
    else:
        if not _is_number(value):
            return value, f"{{}} must be a number, got {value!r}."
        value = float(value)
        if not math.isfinite(value):
            return value, f"{{}} must be a finite number, got {value!r}."
    if bounds is not None and not within(value, bounds):
        return value, f"{{}} must be {describe_bounds(bounds, integer)}, got {value!r}."
    return value, None


def check_value(kind: str, value: object, metadata) -> tuple[object, str | None]:
    """A field's value normalised, and the problem with it or None; ``kind`` is its annotation.

    Example:
        >>> check_value("int", 0, {"bounds": "[1, )"})
        (0, '{} must be at least 1, got 0.')
        >>> check_value("float", np.float32(0.5), {"bounds": "[0, 1]"})
        (0.5, None)
    """
    if value is None and kind.endswith("| None"):
        return value, None
    kind = kind.removesuffix(" | None")
    bounds, choices = metadata.get("bounds"), metadata.get("choices")
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            return value, f"{{}} must be True or False, got {value!r}."
        return bool(value), None
    if kind in ("int", "float"):
        return _number(value, kind == "int", bounds)
    if kind == "str":
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            return value, f"{{}} must be a string, got {value!r}."
        if choices and value not in choices:
            return value, f"Unknown {{}} {value!r}; valid: {', '.join(choices)}."
        return value, None
    if kind == "tuple[str, ...]":
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
            return value, f"{{}} must be a non-empty list of names, got {value!r}."
        wrong = [v for v in value if not isinstance(v, str) or (choices and v not in choices)]
        if wrong or len(set(value)) != len(value):
            valid = f" among {', '.join(choices)}" if choices else ""
            return value, f"{{}} must be distinct names{valid}, got {list(value)!r}."
        return tuple(value), None
    if kind in ("tuple[int, int]", "tuple[float, float]"):
        integer = kind == "tuple[int, int]"
        pair = tuple(value) if isinstance(value, (list, tuple)) else ()
        checked = [_number(v, integer, bounds) for v in pair]
        if len(pair) != 2 or any(problem for _, problem in checked) or checked[0][0] > checked[1][0]:
            where = f" {describe_bounds(bounds, integer)}" if bounds else ""
            return value, f"{{}} must be a pair (min, max) with min <= max, both{where or ' numbers'}, got {value!r}."
        return tuple(v for v, _ in checked), None
    return value, None


def check_fields(settings) -> None:
    """Check every field of a frozen settings dataclass; normalise it in place, warn where ``warn`` says.

    Example:
        >>> from lavise.settings import ComputeSettings
        >>> ComputeSettings(batch_size=0)
        Traceback (most recent call last):
        lavise.checks.SettingError: ComputeSettings: batch_size must be at least 1, got 0.
    """
    owner = type(settings).__name__
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
        checked, problem = check_value(kind, value, field.metadata)
        if problem:
            raise SettingError(owner, field.name, problem)
        if checked is not value:
            object.__setattr__(settings, field.name, checked)
        warn = field.metadata.get("warn")
        if warn is not None and warn[0](checked):
            warnings.warn(SettingWarning(owner, field.name, checked, warn[1]), stacklevel=4)


def check_path(path: Path, flag: str, kind: str) -> None:
    """A path argument of the right kind, or a LaviseError naming the argument (``flag``).

    ``kind``: "in" exists, "folder" and "file" an existing one, "run" not a file,
    "out-folder" a folder to write into or nothing yet, "out-file" not a folder.
    """
    exists, folder = path.exists(), path.is_dir()
    problems = {
        "does not exist": kind in ("in", "folder", "file") and not exists,
        "is a file, not a folder": kind == "folder" and exists and not folder,
        "is a file, not a run directory": kind == "run" and exists and not folder,
        "is a folder, not a file": kind == "file" and folder,
        "is an existing file; give a folder to write into, or a path not taken yet": kind == "out-folder" and exists and not folder,
        f"is a folder; give the file to write, e.g. '{path / 'table.md'}'": kind == "out-file" and folder,
    }
    for problem, found in problems.items():
        if found:
            raise LaviseError(f"{flag} '{path}' {problem}.")


# --- checks of scene settings (SceneSettings checks its fields itself, with these) -------


def parse_group_bias(value: object) -> tuple[tuple[str, tuple[float, ...]], ...] | None:
    """The canonical form of ``SceneSettings.group_bias``: ((word, (p_a, p_b, ...)), ...).

    Example:
        >>> parse_group_bias("dog=0.6:0.1, car=0.1:0.6")
        (('dog', (0.6, 0.1)), ('car', (0.1, 0.6)))
    """
    if value is None or value == "":
        return None
    fix = "give it as 'dog=0.6:0.1,car=0.1:0.6' or as ((word, (probability per group, ...)), ...)"
    if isinstance(value, str):
        pairs = []
        for item in value.split(","):
            word, sep, probabilities = item.partition("=")
            if not sep:
                raise LaviseError(f"group_bias item {item.strip()!r} has no '='; {fix}.")
            try:
                numbers = tuple(float(p) for p in probabilities.split(":"))
            except ValueError:
                raise LaviseError(
                    f"group_bias item {item.strip()!r} has a probability that is not a number; {fix}."
                ) from None
            pairs.append((word.strip(), numbers))
    elif isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)):
        pairs = list(value)
    else:
        raise LaviseError(f"group_bias must be a string, a mapping or pairs, not {value!r}; {fix}.")
    canonical = []
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise LaviseError(f"group_bias entry {pair!r} is not a (word, probabilities) pair; {fix}.")
        word, probabilities = pair
        numeric = isinstance(probabilities, (list, tuple)) and all(
            isinstance(p, (int, float, np.integer, np.floating)) and not isinstance(p, bool) for p in probabilities
        )
        if not numeric:
            raise LaviseError(f"group_bias probabilities of {word!r} must be numbers, not {probabilities!r}; {fix}.")
        probabilities = tuple(float(p) for p in probabilities)
        if not all(0.0 <= p <= 1.0 for p in probabilities):
            raise LaviseError(f"group_bias probabilities of {word!r} must lie in [0, 1], not {probabilities}.")
        canonical.append((word, probabilities))
    if not canonical:
        raise LaviseError(f"group_bias names no concept; {fix}.")
    words = [w for w, _ in canonical]
    if len(set(words)) != len(words) or not all(words):
        raise LaviseError(f"group_bias must name distinct, non-empty words, not {words}.")
    sizes = {len(p) for _, p in canonical}
    if len(sizes) != 1 or not 2 <= min(sizes) <= len(GROUP_NAMES):
        raise LaviseError(
            f"group_bias must give every concept one probability per group, for 2 to "
            f"{len(GROUP_NAMES)} groups; got {dict(canonical)}."
        )
    return tuple(canonical)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SettingError("SceneSettings", name, f"{{}} must be an integer of at least {minimum}, not {value!r}.")


def _check_fraction(name: str, value: object, *, below_one: bool = False) -> None:
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = number and 0.0 <= value <= 1.0
    if not ok or (below_one and value >= 1.0):
        bound = "[0, 1)" if below_one else "[0, 1]"
        raise SettingError("SceneSettings", name, f"{{}} must be a number in {bound}, not {value!r}.")


def _check_range(
    name: str, value: object, low: float, high: float | None, *, integer: bool = False
) -> None:
    """(min, max) with low < min <= max <= high for floats, low <= min <= max for ints."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    ok = (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, kinds) and not isinstance(v, bool) for v in value)
    )
    if ok:
        first, second = value
        ok = (first >= low if integer else first > low) and first <= second
        ok = ok and (high is None or second <= high)
    if not ok:
        lower = f"{low} <= min" if integer else f"{low} < min"
        upper = "" if high is None else f" <= {high}"
        raise SettingError("SceneSettings", name, f"{{}} must be a pair (min, max) with {lower} <= max{upper}, not {value!r}.")
