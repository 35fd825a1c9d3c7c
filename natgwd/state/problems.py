"""What is wrong with a desired state, and where: every check of a validation (the shape,
the rules, the addresses, QoS, HA) reports to one `Problems` collector, so that a refused
state lists every problem with the JSONPath of its field."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from natgwd.state.model import RULE_KINDS

T = TypeVar("T")
ITEM_SECTIONS = ("eips", *RULE_KINDS)  # sections whose items are checked one by one


@dataclass(frozen=True)
class Problem:
    """What is wrong and where: `path` is the JSONPath of the field; a problem of one
    rule or EIP also names its section, its index in that section and the field."""

    path: str
    reason: str
    section: str | None = None
    index: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    @classmethod
    def at(cls, parts: Sequence[str | int], reason: str) -> Problem:
        """A problem at a path given as its parts (section, index, field...)."""
        item = len(parts) >= 2 and parts[0] in ITEM_SECTIONS and isinstance(parts[1], int)
        if not item:
            return cls(json_path(parts), reason)
        fld = str(parts[2]) if len(parts) > 2 else None
        return cls(json_path(parts), reason, str(parts[0]), int(parts[1]), fld)


def json_path(parts: Any) -> str:
    path = "$"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


class InvalidValueError(ValueError):
    """A value refused, with the reason in validation's words; the caller knows the field
    it read the value from (Problems.parsed)."""


Where = str | Sequence[str | int]  # a JSONPath, or its parts (section, index, field...)


class Problems:
    """The problems one validation found, in the order found."""

    def __init__(self) -> None:
        self.found: list[Problem] = []

    def __len__(self) -> int:
        return len(self.found)

    def add(self, where: Where, reason: str) -> None:
        self.found.append(Problem(where, reason) if isinstance(where, str) else Problem.at(where, reason))

    def item(self, section: str, index: int, field: str, reason: str) -> None:
        """A problem of one field of a rule or EIP."""
        self.found.append(Problem.at((section, index, field), reason))

    def parsed(self, where: Where, parse: Callable[[Any], T], value: Any) -> T | None:
        """`parse(value)`, or None with the reason of its InvalidValueError reported at `where`."""
        try:
            return parse(value)
        except InvalidValueError as err:
            self.add(where, str(err))
            return None


class InvalidStateError(Exception):
    """`skipped` says which checks did not run and why, when some could not."""

    def __init__(self, problems: list[Problem], skipped: str | None = None) -> None:
        super().__init__("; ".join([str(p) for p in problems] + ([skipped] if skipped else [])))
        self.problems = problems
        self.skipped = skipped
