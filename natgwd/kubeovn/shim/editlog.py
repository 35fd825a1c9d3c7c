"""The log of the edits natgwd accepted through its edit endpoint (`<state>.edits`), so that
a call costs one short append instead of a rewrite of a multi-megabyte state file.

The first line names the sha256 of the state file the log extends; each further line is
one accepted call, as the difference it made to the document: top-level keys set or
removed, and rules removed (by name) and added in the named lists. natgwd folds the log
into the file when it starts, and compacts it (rewrites the state file, empties the log)
when the log grows or the calls pause. A state file whose sha256 is not the one the log
names was written by someone else after the log began, and wins: the log is dropped.

A call is answered "applied" only once its whole line is written: a short write (a full
disk) is continued, and a failed one is cut back off the file, so that the call is
answered as failed and the log holds only whole lines. No fsync: a write is in the page
cache before the call is answered, and the page cache outlives a kill -9 of natgwd and a
restart of its container (same kernel). Only a node crash loses it, and that loses the
pod's network namespace too: the controller then replays every rule into a new pod.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from natgwd.kubeovn.shim.edits import OPTIONAL_LISTS, Doc

Delta = dict[str, Any]


def diff(before: Doc, after: Doc) -> Delta:
    """What turns `before` into `after` under `fold`; empty when they are equal."""
    delta: Delta = {}
    for key in before.keys() | after.keys():
        old, new = before.get(key), after.get(key)
        if key not in after:
            delta.setdefault("unset", []).append(key)
        elif key in OPTIONAL_LISTS and _named(old) and _named(new):
            removed, added = _list_change(old or [], new or [])
            if removed is None:
                delta.setdefault("set", {})[key] = new
            else:
                if removed:
                    delta.setdefault("del", {})[key] = removed
                if added:
                    delta.setdefault("add", {})[key] = added
        elif key not in before or old != new:
            delta.setdefault("set", {})[key] = new
    return delta


def _named(value: object) -> bool:
    # Documents here were validated (or made by edits): their lists hold objects.
    return value is None or isinstance(value, list)


def _list_change(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> tuple[list[str] | None, list[dict[str, Any]]]:
    """(names removed, items appended) that turn `old` into `new`; (None, []) when the
    change is not of that form (a reordering, a name that is not unique)."""
    if len(new) >= len(old) and all(map(operator.is_, old, new)):
        return [], new[len(old) :]  # the common call: rules added at the end
    names = [item.get("name") for item in new]
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        return None, []
    by_name = dict(zip(names, new, strict=True))
    kept = [item for item in old if (same := by_name.get(item.get("name"))) is not None and same == item]
    kept_names = {item["name"] for item in kept}
    removed = [str(item.get("name")) for item in old if item.get("name") not in kept_names]
    added = [item for item in new if item["name"] not in kept_names]
    if [item["name"] for item in kept] + [item["name"] for item in added] != names:
        return None, []
    return removed, added


def fold(doc: Doc, deltas: list[Delta]) -> Doc:
    """`doc` with the deltas applied in order (each named list held by name meanwhile, so
    that folding thousands of lines stays linear)."""
    lists: dict[str, dict[str, dict[str, Any]]] = {}
    result = dict(doc)

    def named(key: str) -> dict[str, dict[str, Any]]:
        if key not in lists:
            lists[key] = {item["name"]: item for item in result.get(key) or []}
        return lists[key]

    for delta in deltas:
        for key in delta.get("unset", []):
            result.pop(key, None)
            lists.pop(key, None)
        for key, value in delta.get("set", {}).items():
            result[key] = value
            lists.pop(key, None)
        for key, names in delta.get("del", {}).items():
            held = named(key)
            for name in names:
                held.pop(name, None)
        for key, items in delta.get("add", {}).items():
            held = named(key)
            for item in items:
                held.pop(item["name"], None)
                held[item["name"]] = item
    for key, held in lists.items():
        result[key] = list(held.values())
    return result


def refusal(delta: object) -> str | None:
    """Why a line is not an edit `diff` writes, or None. Only damage or tampering makes
    one, but a line of the wrong shape must not take `fold`, and natgwd, down."""
    if not isinstance(delta, dict):
        return "not an object"
    if unknown := delta.keys() - {"set", "unset", "del", "add"}:
        return f"unknown key {sorted(unknown)[0]!r}"
    unset, changed = delta.get("unset", []), delta.get("set", {})
    if not isinstance(unset, list) or not all(isinstance(key, str) for key in unset):
        return "unset: not a list of keys"
    if not isinstance(changed, dict):
        return "set: not an object"
    for key, value in changed.items():
        if key in OPTIONAL_LISTS and value is not None and not _named_items(value):
            return f"set.{key}: not a list of objects with a name"
    for verb, check in (("del", _names), ("add", _named_items)):
        lists = delta.get(verb, {})
        if not isinstance(lists, dict):
            return f"{verb}: not an object"
        for key, value in lists.items():
            if key not in OPTIONAL_LISTS:
                return f"{verb}.{key}: not a list natgwd edits"
            if not check(value):
                return f"{verb}.{key}: not a list of {'names' if verb == 'del' else 'objects with a name'}"
    return None


def _names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(name, str) for name in value)


def _named_items(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, dict) and isinstance(item.get("name"), str) for item in value
    )


@dataclass
class EditLog:
    path: Path
    base: str | None = None  # sha256 of the state file the log extends; None: no log
    entries: int = 0
    size: int = 0
    refused: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason) of the last load

    def load(self) -> list[Delta]:
        """Read the log from disk: the state file it extends (`base`) and its edits. A last
        line cut short (natgwd killed in the middle of an append, before it answered the
        call) is left out and cut off the file. A line that is not an edit is skipped, not
        the lines after it (each was an answered call), and listed in `refused`; when it is
        one an older natgwd cut short and then appended to, the whole edit at its end is
        kept."""
        self.base, self.entries, self.size, self.refused = None, 0, 0, []
        deltas: list[Delta] = []
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        try:
            header = json.loads(lines[0])
            base = header["extends"]
        except (ValueError, TypeError, KeyError):
            return []
        if not isinstance(base, str):
            return []
        size = len(lines[0]) + 1
        for number, line in enumerate(lines[1:-1], start=2):  # the last piece: empty, or cut short
            size += len(line) + 1
            delta = _delta(line)
            reason = refusal(delta) if delta is not None else "not an edit"
            if reason is not None:
                self.refused.append((number, reason))
            elif delta is not None:
                deltas.append(delta)
        if size < len(data):
            os.truncate(self.path, size)  # so that the next append does not follow the cut line
        self.base, self.entries, self.size = base, len(deltas), size
        return deltas

    def append(self, base: str, delta: Delta) -> None:
        """Add one accepted edit to the log of the state file `base` (a log of another file
        is replaced). Returns once the whole line is written; raises OSError with the file
        as it was (a line written in part is cut off again)."""
        line = json.dumps(delta, separators=(",", ":")).encode() + b"\n"
        if self.base != base:
            self.clear()
            line = json.dumps({"extends": base}).encode() + b"\n" + line
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if os.fstat(fd).st_size != self.size:
                os.ftruncate(fd, self.size)  # what an append that failed to cut itself off left
            written = 0
            try:
                while written < len(line):
                    written += os.pwrite(fd, line[written:], self.size + written)
            except OSError:
                os.ftruncate(fd, self.size)
                raise
        finally:
            os.close(fd)
        self.base = base
        self.entries += 1
        self.size += len(line)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self.base, self.entries, self.size = None, 0, 0


def _delta(line: bytes) -> Delta | None:
    """The edit on a line; else the whole edit at its end (a line an older natgwd cut short
    and then appended to); else None. A cut JSON prefix leaves brackets open, so the only
    suffix that decodes is the appended edit."""
    for start in (0, *_starts(line)):
        try:
            delta = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(delta, dict):
            return delta
        if start == 0:
            return None
    return None


def _starts(line: bytes) -> Iterator[int]:
    at = line.find(b'{"', 1)
    while at != -1:
        yield at
        at = line.find(b'{"', at + 1)
