"""The values a config key allows, declared by the code that reads it, and the one message a bad value gets.

Each module that reads config keys lists them in a ``RANGES`` table
({dotted key: range}) beside the code that uses them; nemo_dpo/config.py
gathers the tables and checks every key before any work starts, so a value out
of range stops a run the same way whichever key it is, naming the key, the
allowed range and the value:

    model.optim.lr must be a finite number > 0, got -1
    trainer.dpo.max_steps must be -1 (no limit) or >= 1, got 0

A range is a test with a description (its ``str``, which the message quotes).
It tests the type too: a key whose default is null has no type to be held to
when the config is loaded (nemo_dpo/config.py holds the others to the type of
their default, with its own message). Rules between keys (divisibility, the
world size) are not ranges; they stay in the packages' check functions, which
run once every key is known to be in range. This module imports nothing from
the project, so every layer can use it.
"""

import math
from abc import ABC, abstractmethod
from collections import abc
from collections.abc import Sequence
from dataclasses import dataclass, field


def check(key: str, value, allowed: "Range") -> None:
    """ValueError naming ``key``, the range and ``value``, unless the range admits the value."""
    if not allowed.admits(value):
        raise ValueError(f"{key} must be {allowed}, got {value!r}")


def _number(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True, kw_only=True)
class Range(ABC):
    """What one key allows; ``nullable``: null as well (conf/gpt_dpo.yaml says what null means there)."""

    nullable: bool = False

    def admits(self, value) -> bool:
        return self.nullable if value is None else self._admits(value)

    def __str__(self) -> str:
        described = self._describe()
        if not self.nullable:
            return described
        return described + (", or null" if " or " in described else " or null")

    @abstractmethod
    def _admits(self, value) -> bool:
        """Whether a value other than null is allowed."""

    @abstractmethod
    def _describe(self) -> str:
        """The allowed values other than null, as the error message says them."""


def _with_special(special: dict, bounds: str) -> str:
    """'-1 (no limit) or >= 1': the values with a meaning of their own, then the bounds."""
    return " or ".join([*(f"{_number(value)} ({meaning})" for value, meaning in special.items()), bounds])


@dataclass(frozen=True, kw_only=True)
class Integer(Range):
    """An integer >= ``ge`` (and <= ``le``); ``special``: values below that which mean something ({-1: "no limit"})."""

    ge: int
    le: int | None = None
    special: dict = field(default_factory=dict)

    def _admits(self, value) -> bool:
        if not isinstance(value, int) or isinstance(value, bool):
            return False
        return value in self.special or (value >= self.ge and (self.le is None or value <= self.le))

    def _describe(self) -> str:
        return _with_special(self.special, f">= {self.ge}" if self.le is None else f"in [{self.ge}, {self.le}]")


@dataclass(frozen=True, kw_only=True)
class Real(Range):
    """A finite number (an integer will do) above ``gt`` or from ``ge`` on, and below ``lt`` (or up to ``le``).

    ``special``: values outside the bounds which mean something ({0: "no clipping"}).
    """

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None  # dropout < 1, Adam's betas < 1
    le: float | None = None  # a probability or a weight that may be 1, a fraction of an epoch up to a whole one
    special: dict = field(default_factory=dict)

    def _admits(self, value) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return False
        above = value > self.gt if self.gt is not None else value >= self.ge
        below = (self.lt is None or value < self.lt) and (self.le is None or value <= self.le)
        return value in self.special or (above and below)

    def _describe(self) -> str:
        open_low = self.gt is not None
        low = _number(self.gt if open_low else self.ge)
        if self.lt is None and self.le is None:
            bounds = f"a finite number {'>' if open_low else '>='} {low}"
        else:
            high = f"{_number(self.lt)})" if self.lt is not None else f"{_number(self.le)}]"
            bounds = f"in {'(' if open_low else '['}{low}, {high}"
        return _with_special(self.special, bounds)


@dataclass(frozen=True, kw_only=True)
class Either(Range):
    """A value that one of two ranges admits, its type saying which was meant (NeMo-Aligner's intervals: an integer
    is a number of steps, a float a fraction of an epoch); ``first_is`` and ``second_is`` name what each is."""

    first: Range
    first_is: str
    second: Range
    second_is: str

    def _admits(self, value) -> bool:
        return self.first.admits(value) or self.second.admits(value)

    def _describe(self) -> str:
        return f"{self.first} ({self.first_is}); or {self.second} ({self.second_is})"


@dataclass(frozen=True, kw_only=True)
class OneOf(Range):
    """One of a few names."""

    choices: tuple

    def _admits(self, value) -> bool:
        return isinstance(value, str) and value in self.choices

    def _describe(self) -> str:
        return repr(self.choices[0]) if len(self.choices) == 1 else f"one of {list(self.choices)}"


@dataclass(frozen=True, kw_only=True)
class Flag(Range):
    """true or false."""

    def _admits(self, value) -> bool:
        return isinstance(value, bool)

    def _describe(self) -> str:
        return "a boolean"


@dataclass(frozen=True, kw_only=True)
class Text(Range):
    """A string; ``empty``: the empty string too."""

    empty: bool = False

    def _admits(self, value) -> bool:
        return isinstance(value, str) and (self.empty or value != "")

    def _describe(self) -> str:
        return "a string" if self.empty else "a non-empty string"


@dataclass(frozen=True, kw_only=True)
class FilePath(Range):
    """A file or folder name (whether it must exist is the reading code's business); ``many``: or a list of them."""

    many: bool = False

    def _admits(self, value) -> bool:
        if self.many and isinstance(value, Sequence) and not isinstance(value, str):
            return len(value) > 0 and all(_is_path(item) for item in value)
        return _is_path(value)

    def _describe(self) -> str:
        return "a path or a non-empty list of paths" if self.many else "a path"


def _is_path(value) -> bool:
    return isinstance(value, str) and value != ""


@dataclass(frozen=True, kw_only=True)
class ListOf(Range):
    """A list whose items are each in ``each``: ``length`` of them (None: one or more), ``distinct`` or not."""

    each: Range
    length: int | None = None
    distinct: bool = False

    def _admits(self, value) -> bool:
        if not isinstance(value, Sequence) or isinstance(value, str):
            return False
        items = list(value)
        return (
            (len(items) == self.length if self.length is not None else len(items) > 0)
            and all(self.each.admits(item) for item in items)
            and (not self.distinct or len(set(items)) == len(items))
        )

    def _describe(self) -> str:
        size = f"a list of {self.length}" if self.length is not None else "a non-empty list of"
        return f"{size} {'distinct ' if self.distinct else ''}values, each {self.each}"

    def __str__(self) -> str:
        return f"null or {self._describe()}" if self.nullable else self._describe()  # null is the whole list's


@dataclass(frozen=True, kw_only=True)
class Mapping(Range):
    """A mapping of settings whose own keys and values ``what`` checks (its cross-key rules)."""

    what: str

    def _admits(self, value) -> bool:
        return isinstance(value, abc.Mapping)

    def _describe(self) -> str:
        return f"a mapping of {self.what}"


@dataclass(frozen=True, kw_only=True)
class OneOrMany(Range):
    """A value in ``each``, or a non-empty list of distinct such values (a loss, or a mixture of losses)."""

    each: Range

    def _admits(self, value) -> bool:
        if isinstance(value, str) or not isinstance(value, Sequence):
            return self.each.admits(value)
        items = list(value)
        return bool(items) and len(set(items)) == len(items) and all(self.each.admits(item) for item in items)

    def _describe(self) -> str:
        return f"{self.each}, or a non-empty list of distinct such values"
