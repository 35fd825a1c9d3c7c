"""The bytes of a desired-state file -> its JSON document, or InvalidStateError: the size,
the encoding, strict JSON (no duplicate keys, no NaN, the text of every fraction kept) and
a bound on nesting, before anything walks the document."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from natgwd.state.problems import InvalidStateError, Problem

MAX_FILE_BYTES = 32 * 1024 * 1024  # ~200,000 rules; parsing holds several times this
MAX_DEPTH = 16  # the format needs 5 levels; deeper input is refused before it is walked


class _DuplicateKeyError(ValueError):
    pass


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        key = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise _DuplicateKeyError(f"duplicate key {key!r} in one object")
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def decode(raw: bytes) -> Any:
    """The JSON document of a state file (any JSON value), or InvalidStateError."""
    return decode_text(text_of(raw))[0]


def text_of(raw: bytes) -> str:
    """The text of a state file, or InvalidStateError (too large, empty, NUL, not UTF-8)."""
    if len(raw) > MAX_FILE_BYTES:
        raise InvalidStateError([Problem("$", f"file is larger than {MAX_FILE_BYTES} bytes")])
    if not raw.strip():
        raise InvalidStateError([Problem("$", "file is empty")])
    if b"\x00" in raw:
        raise InvalidStateError([Problem("$", f"file contains a NUL byte at offset {raw.index(0)}")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidStateError([Problem("$", f"file is not UTF-8: {err.reason} at byte {err.start}")]) from None


def decoder(fractions: list[str]) -> json.JSONDecoder:
    """The JSON decoder of state files: duplicate keys and NaN refused; the text of every
    number with a fraction or an exponent goes to `fractions` (80.0 equals 80 in Python,
    and only one of them is a port)."""

    def parse_float(text: str) -> float:
        fractions.append(text)
        return float(text)

    return json.JSONDecoder(
        object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant, parse_float=parse_float
    )


def scanner() -> Callable[[str, int], tuple[Any, int]]:
    """The decoder's scanner: (value, end) of the JSON value at an offset of a text."""
    scan: Callable[[str, int], tuple[Any, int]] = decoder([]).scan_once  # type: ignore[attr-defined]
    return scan


def decode_text(text: str) -> tuple[Any, bool]:
    """The document of a state file's text, and whether it holds a fraction; or
    InvalidStateError."""
    fractions: list[str] = []
    try:
        document = decoder(fractions).decode(text)
    except json.JSONDecodeError as err:
        reason = f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        raise InvalidStateError([Problem("$", reason)]) from None
    except _DuplicateKeyError as err:
        raise InvalidStateError([Problem("$", str(err))]) from None
    except (ValueError, RecursionError) as err:
        # ValueError: NaN/Infinity, integers too long to convert. RecursionError: nesting.
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise InvalidStateError([Problem("$", f"not valid JSON: {reason}")]) from None
    return document, bool(fractions)


def check_depth(document: Any) -> None:
    """Refuse nesting the format never has: jsonschema and error messages recurse into it."""
    # (A tuple of types: isinstance with a union costs twice as much, asked of every value.)
    if not isinstance(document, (dict, list)):
        return
    level, depth = [document], 0
    while level := [
        child
        for node in level
        for child in (node.values() if isinstance(node, dict) else node)
        if isinstance(child, (dict, list))
    ]:
        depth += 1
        # `level` holds the containers at `depth`: one with anything in it at MAX_DEPTH
        # puts a value deeper than MAX_DEPTH.
        if depth >= MAX_DEPTH and any(level):
            raise InvalidStateError([Problem(_too_deep(document), f"nested deeper than {MAX_DEPTH} levels")])


def _too_deep(document: Any) -> str:
    """The path of the first node nested deeper than MAX_DEPTH (one is known to exist)."""
    stack: list[tuple[Any, str, int]] = [(document, "$", 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            return path
        if isinstance(node, dict):
            stack.extend((value, f"{path}.{key}", depth + 1) for key, value in node.items())
        elif isinstance(node, list):
            stack.extend((value, f"{path}[{i}]", depth + 1) for i, value in enumerate(node))
    return "$"
