"""Allowed values of config keys, declared next to the dataclass that holds them, and the check that
refuses the rest. A leaf: the engine runs the checks, sections (the engine's and the stages') declare
them, and neither needs to know the other."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

INT64_MAX = 2**63 - 1  # TOML integers may be any size in Python; torch and numpy take int64 at most


@dataclass(frozen=True)
class Range:
    """A number's allowed interval; `meaning` says what the value means, to help choose a fix."""

    low: float | None = None  # None = unbounded
    high: float | None = None
    low_open: bool = False  # True: low itself is refused
    high_open: bool = False
    meaning: str = ""

    def allows(self, value: float) -> bool:
        if self.low is not None and (value < self.low or self.low_open and value == self.low):
            return False
        return self.high is None or (value < self.high or not self.high_open and value == self.high)

    def rule(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        return (f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.high_open else ']'}")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


def at_least(low: float, meaning: str = "", high: float | None = None) -> Range:
    return Range(low, high, meaning=meaning)


def positive(meaning: str = "", high: float | None = None) -> Range:
    return Range(0, high, low_open=True, meaning=meaning)


def fraction(meaning: str = "") -> Range:
    return Range(0, 1, meaning=meaning)


def below_1(meaning: str = "") -> Range:
    return Range(0, 1, high_open=True, meaning=meaning)


# The radius and the step of an attack on [0, 1] pixels: 0 would not attack, above 1 changes nothing more.
PIXEL_RADIUS = Range(0, 1, low_open=True, meaning="on [0, 1] pixels, e.g. 0.031 for 8/255")


Refuse = Callable[[str, str, str], Exception]  # (key, problem, fix) -> the UserError to raise


def check_values(section: str, values: Any, allowed: dict[str, Range | tuple], refuse: Refuse) -> None:
    """Refuse any key of `values` (a section's dataclass) outside `allowed` (a Range, or a tuple of choices)."""
    for key, rule in allowed.items():
        value = getattr(values, key)
        name = f"{section}.{key}"
        if isinstance(rule, tuple):
            if value not in rule:
                raise refuse(name, f"it must be one of {', '.join(map(str, rule))}", "")
            continue
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
            raise refuse(name, f"it must be a 64-bit integer {rule.rule()}" + _meaning(rule), "")
        if isinstance(value, float) and not math.isfinite(value) or not rule.allows(value):
            raise refuse(name, f"it must be {'a finite number ' if isinstance(value, float) else ''}{rule.rule()}"
                               + _meaning(rule), "")


def _meaning(rule: Range) -> str:
    return f" ({rule.meaning})" if rule.meaning else ""
