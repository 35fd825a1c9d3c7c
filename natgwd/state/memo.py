"""Results of a pure function kept from one desired state to the next.

A new desired state repeats almost all of the last one: a change touches a few of
thousands of rules. Parsing an address or formatting one costs microseconds in Python, and
at 10,000 rules those microseconds are most of a change's cost, so they are looked up
instead. Only the results used for the latest state are kept, so the memory stays that of
one state however long the daemon runs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class RoundMemo(Generic[K, V]):
    """`memo(key)` is `compute(key)`; `next_round()` starts a new state, dropping results
    the previous round did not use."""

    def __init__(self, compute: Callable[[K], V]) -> None:
        self._compute = compute
        self._previous: dict[K, V] = {}
        self._current: dict[K, V] = {}

    def __call__(self, key: K) -> V:
        try:
            return self._current[key]
        except KeyError:
            pass
        try:
            value = self._previous[key]
        except KeyError:
            value = self._compute(key)
        self._current[key] = value
        return value

    def next_round(self) -> None:
        self._previous, self._current = self._current, {}
