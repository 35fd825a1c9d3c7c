"""The desired-state file as the Python shim edits it when natgwd has no edit endpoint:
an exclusive flock on `<state>.lock`, a generation stamp after the JSON, a journal of the
sha256 every write produced (`<state>.journal`), and an atomic replace.

Why the journal and the stamp: natgwd polls the file and may apply only the newest of
several quick writes, so a caller must also accept a *later* content as "applied"; the
journal lists, per generation, the sha256 every write produced. And two generations must
never share a sha256: otherwise (add X, del X) would give back the bytes natgwd applied
before both, and the `del X` caller could return while natgwd is still applying the
intermediate `add X`. So every file the shim writes ends with a generation stamp: a last
line of spaces and tabs (the generation in binary), which JSON ignores as whitespace.
Writing a journal entry before the file it describes means that a content natgwd can
have read is always already in the journal when a waiter looks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from natgwd.io import paths
from natgwd.io.files import write_atomically
from natgwd.kubeovn.shim.call import Call, edited, refusal
from natgwd.kubeovn.shim.edits import Context, Doc, compact
from natgwd.kubeovn.shim.grammar import ShimError
from natgwd.state.validation import InvalidStateError, load_state

DEFAULT_TIMEOUT = 30.0
JOURNAL_MAX_BYTES = 256 * 1024
JOURNAL_KEEP = 1024


@dataclass(frozen=True)
class Config:
    state: Path
    applied: Path
    timeout: float
    gateway_v4: str | None
    token: Path = paths.EDIT_TOKEN

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        text = env.get("NATGWD_SHIM_TIMEOUT", "") or str(DEFAULT_TIMEOUT)
        try:
            timeout = float(text)
        except ValueError:
            raise ShimError(f"natgwd: NATGWD_SHIM_TIMEOUT={text!r} is not a number of seconds") from None
        return cls(
            Path(env.get("NATGWD_STATE") or paths.STATE),
            Path(env.get("NATGWD_APPLIED_STATE") or paths.APPLIED_STATE),
            timeout,
            (env.get("GATEWAY_V4") or "").strip() or None,
            Path(env.get("NATGWD_EDIT_TOKEN") or paths.EDIT_TOKEN),
        )

    @property
    def lock(self) -> Path:
        return lock_path(self.state)

    @property
    def journal(self) -> Path:
        return self.state.with_name(self.state.name + ".journal")


def lock_path(state: Path) -> Path:
    """The file every writer of the state file locks (natgwd's compaction too)."""
    return state.with_name(state.name + ".lock")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stamp(generation: int) -> bytes:
    return format(generation, "b").replace("0", " ").replace("1", "\t").encode() + b"\n"


def generation_of(raw: bytes) -> int | None:
    """The generation stamp the shim puts after the JSON document; None when absent."""
    tail = raw[raw.rfind(b"}") + 1 :]
    if not tail.startswith(b"\n") or not tail.endswith(b"\n"):
        return None
    bits = tail[1:-1]
    if not bits or bits.strip(b" \t") or not bits.startswith(b"\t"):
        return None
    return int(bits.replace(b" ", b"0").replace(b"\t", b"1"), 2)


def document_bytes(doc: Doc) -> bytes:
    """The state file's content for a document: indented JSON, for humans too."""
    return json.dumps(compact(doc), indent=2).encode() + b"\n"


def render(doc: Doc, generation: int) -> bytes:
    return document_bytes(doc) + _stamp(generation)


@contextlib.contextmanager
def locked(path: Path, deadline: float) -> Iterator[None]:
    """An exclusive flock on `path` (never renamed or deleted, so every caller locks the
    same inode), polled until `deadline`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ShimError(f"natgwd: could not lock {path} in time (another call holds it)") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_journal(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return []
    entries = []
    for line in text.splitlines():
        generation, _, digest = line.partition(" ")
        if generation.isdigit() and re.fullmatch(r"[0-9a-f]{64}", digest):
            entries.append((int(generation), digest))
    return entries


def _journal_append(path: Path, generation: int, digest: str) -> None:
    with open(path, "ab") as file:
        file.write(f"{generation} {digest}\n".encode())
    if path.stat().st_size > JOURNAL_MAX_BYTES:
        recent = read_journal(path)[-JOURNAL_KEEP:]
        write_atomically(path, "".join(f"{g} {d}\n" for g, d in recent).encode())


def _validate(data: bytes) -> None:
    try:
        load_state(data)
    except InvalidStateError as err:
        raise refusal(err) from None


@dataclass(frozen=True)
class Written:
    digest: str  # sha256 of the state file's content after this call
    generation: int
    changed: bool


def transact(config: Config, call: Call, ctx: Context, deadline: float) -> Written:
    """Apply one edit to the state file under the lock; validate; write atomically."""
    with locked(config.lock, deadline):
        try:
            raw: bytes | None = config.state.read_bytes()
        except FileNotFoundError:
            raw = None
        except OSError as err:
            raise ShimError(f"natgwd: cannot read {config.state}: {err.strerror}") from None
        doc: Doc | None = None
        if raw is not None:
            try:
                loaded = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ShimError(f"natgwd: {config.state} is not valid JSON: {err}") from None
            if not isinstance(loaded, dict):
                raise ShimError(f"natgwd: {config.state} is not a desired-state document")
            doc = loaded
        journal = read_journal(config.journal)
        last = max((g for g, _ in journal), default=0)
        stamp = generation_of(raw) if raw is not None else None
        before = None if doc is None else json.dumps(compact(doc), sort_keys=True)
        after = edited(call, doc, ctx, config.state)
        if raw is not None and json.dumps(compact(after), sort_keys=True) == before:
            _validate(raw)
            return Written(sha256(raw), stamp if stamp is not None else last, changed=False)
        generation = max(last, stamp or 0) + 1
        data = render(after, generation)
        _validate(data)
        digest = sha256(data)
        try:
            _journal_append(config.journal, generation, digest)
            write_atomically(config.state, data)
        except OSError as err:
            raise ShimError(f"natgwd: cannot write {config.state}: {err}") from None
        return Written(digest, generation, changed=True)
