"""The daemon's side of nat-gateway.sh calls: they arrive on the edit endpoint's threads and
are carried out on natgwd's one reconciling thread, in arrival order, never during a
reconcile of the file. Each is applied to the last accepted document, validated and
applied to the kernel (the daemon's `apply`), recorded in the edit log, and only then
answered; a refused call changes nothing.

The service keeps the document natgwd applies: the state file with the edit log folded
in. It rewrites the state file (and empties the log) when the log is long or the calls
pause, so that the file stays what `natgwd status`, `natgwd check` and a human read.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from natgwd.io.files import write_atomically
from natgwd.kubeovn.shim.call import Call, Reply, edited, prepare, refusal
from natgwd.kubeovn.shim.editlog import Delta, EditLog, diff, fold
from natgwd.kubeovn.shim.edits import Context, Doc, compact, shared_lists
from natgwd.kubeovn.shim.filestate import document_bytes, lock_path, locked
from natgwd.kubeovn.shim.grammar import ShimError
from natgwd.kubeovn.shim.init import KernelView, Links, delete_leftover_routes
from natgwd.kubeovn.shim.lookup import Lookup
from natgwd.kubeovn.shim.protocol import Request
from natgwd.state.validation import InvalidStateError

log = structlog.get_logger("natgwd.kubeovn.shim.service")

COMPACT_IDLE_SECONDS = 1.0  # calls come in bursts (a controller's replay): rewrite after one
COMPACT_ENTRIES = 2000  # ... or during a long one, so that a restart folds little
COMPACT_BYTES = 4 * 1024 * 1024
REPLY_SECONDS = 600.0  # how long an endpoint thread waits for the reconciling thread

Apply = Callable[[Doc], None]  # validate and apply a document; raises InvalidStateError or another error


@dataclass
class _Pending:
    request: Request
    done: threading.Event = field(default_factory=threading.Event)
    reply: Reply | None = None


class EditService:
    def __init__(
        self,
        state_path: Path,
        wake: Callable[[], None],
        written: Callable[[bytes], None],
        links: Callable[[], Links] = KernelView,
        compact_idle: float = COMPACT_IDLE_SECONDS,
        refused_lines: Callable[[int], None] = lambda _count: None,
    ) -> None:
        """`wake` wakes the reconciling thread; `written(data)` tells the daemon the state
        file it wrote (its own write is no change to apply); `refused_lines(n)`: n lines of
        the edit log were left out (damaged)."""
        self._refused_lines = refused_lines
        self.state_path = state_path
        self._written = written
        self._compact_idle = compact_idle
        self.log = EditLog(state_path.with_name(state_path.name + ".edits"))
        self.document: Doc | None = None  # the last accepted document (the file, the log folded in)
        self._base: str | None = None  # sha256 of the state file that document extends
        self._wake = wake
        self._links = links
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._last_edit = 0.0
        self._compact_not_before = 0.0  # after a compaction that could not be done
        self._digested: tuple[Doc, str] | None = None  # a document and applied_digest's answer for it
        self._lookup = Lookup()  # the document's lists indexed, from call to call

    # --- the endpoint's threads ----------------------------------------------------------

    def submit(self, request: Request) -> Reply:
        """Queue a call for the reconciling thread and wait for its reply."""
        pending = _Pending(request)
        self._queue.put(pending)
        self._wake()
        if not pending.done.wait(REPLY_SECONDS) or pending.reply is None:
            return Reply(1, "", f"natgwd: no answer within {REPLY_SECONDS:g}s (natgwd is busy or stopping)\n")
        return pending.reply

    # --- the reconciling thread ----------------------------------------------------------

    def effective(self, raw: bytes, digest: str) -> bytes:
        """What natgwd applies for the state file `raw`: the file with the edits logged on it."""
        if self.document is not None and digest == self._base:
            return json.dumps(self.document).encode()
        # At start (the log a previous natgwd left), after a failed first apply, or a file
        # someone else wrote: the log on disk says which file it extends.
        deltas = self.log.load()
        if self.log.base != digest:
            return raw
        for number, reason in self.log.refused:
            log.error("edit log line refused", path=str(self.log.path), line=number, reason=reason)
        self._refused_lines(len(self.log.refused))
        if not deltas:
            return raw
        try:
            folded = fold(json.loads(raw), deltas)
        except Exception as err:  # a file that is no state under a log naming it: the file alone decides
            log.error(
                "edit log refused: it cannot be folded into the state file",
                path=str(self.log.path),
                edits=len(deltas),
                error=f"{type(err).__name__}: {err}",
            )
            self._refused_lines(len(deltas))
            return raw
        log.info("edits folded into the state file", edits=len(deltas), state_sha256=digest[:12])
        return json.dumps(compact(folded)).encode()

    def applied_digest(self) -> str | None:
        """The sha256 of what natgwd applies when calls are applied on top of the state file
        (or before there is one): that of the file folding them in will write, so that it
        stays the same across the fold. None when the state file alone is applied. Made
        when asked, once per document: a call costs what it changes, this the whole document."""
        document = self.document
        if document is None or (self.log.entries == 0 and self._base is not None):
            return None
        if self._digested is None or self._digested[0] is not document:
            self._digested = (document, hashlib.sha256(document_bytes(document)).hexdigest())
        return self._digested[1]

    def logged_on(self) -> tuple[str | None, int]:
        """(sha256 of the state file the logged calls extend, how many are logged)."""
        return self._base, self.log.entries

    def accepted(self, applied: bytes, digest: str, document: Doc | None = None) -> None:
        """natgwd applied `applied`, the effective content of the state file `digest`;
        `document`: natgwd's own decoding of it, whose rule objects the next edit keeps
        (so that natgwd finds the changed rules by identity)."""
        if self.log.base not in (None, digest):
            log.warning(
                "the state file was replaced: edits logged on the previous one dropped",
                edits=self.log.entries,
                state_sha256=digest[:12],
            )
            self.log.clear()
        self._base = digest
        self.document = compact(document if document is not None else json.loads(applied))

    def serve_pending(self, apply: Apply) -> int:
        """Carry out every queued call, in arrival order; how many there were."""
        served = 0
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                return served
            served += 1
            try:
                pending.reply = self._serve(pending.request, apply)
            except Exception as err:  # no call may take the reconciling thread down
                log.exception("edit failed unexpectedly")
                pending.reply = Reply(1, "", f"natgwd: the call failed: {type(err).__name__}: {err}\n")
            pending.done.set()

    def refuse_pending(self, reason: str) -> None:
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                return
            pending.reply = Reply(1, "", f"natgwd: {reason}\n")
            pending.done.set()

    def _serve(self, request: Request, apply: Apply) -> Reply:
        call = prepare(request.argv, self._links)
        if isinstance(call, Reply):
            return call
        ctx = Context(request.gateway_v4, lookup=self._lookup)
        try:
            summary = self._edit(call, ctx, apply)
        except ShimError as error:
            return call.refused(error)
        finally:  # the indexes of the accepted document's lists, whatever became of the call
            self._lookup.keep(shared_lists(self.document) if self.document is not None else [])
        try:
            if ctx.route_dels:
                delete_leftover_routes(ctx, self._links())
        except ShimError as error:
            return call.refused(error, ctx.warnings)
        return call.done(ctx.warnings, summary)

    def _edit(self, call: Call, ctx: Context, apply: Apply) -> str:
        before = self.document
        if before is None and self.state_path.exists():
            raise ShimError(f"natgwd: {self.state_path} is not applied (see natgwd's log); nothing changed")
        after = compact(edited(call, before, ctx, self.state_path))
        delta = diff(before, after) if before is not None else None
        if delta == {}:
            return "natgwd: nothing to change"
        try:
            apply(after)
        except InvalidStateError as err:
            raise refusal(err) from None
        except Exception as err:
            raise ShimError(f"natgwd: applying the change failed: {err}") from None
        self.document = after
        self._last_edit = time.monotonic()
        why = self._record(delta)
        if why is not None:
            # A call answered "applied" must outlive natgwd. Undone, the controller's retry
            # applies and records it again instead of finding nothing to change.
            self._undo(before, apply)
            raise ShimError(f"natgwd: {why}: nothing changed; try again")
        return "natgwd: applied"

    def _record(self, delta: Delta | None) -> str | None:
        """Record the document's last change; None once it is recorded, else why not."""
        try:
            if delta is None or self._base is None:  # no state file yet: it is the record
                if self.compact() is None:
                    return "cannot record the change: the state file changed meanwhile or cannot be written"
            else:
                self.log.append(self._base, delta)
        except OSError as err:
            return f"cannot record the change: {err.strerror or err}"
        return None

    def _undo(self, before: Doc | None, apply: Apply) -> None:
        self.document = before
        if before is None:
            return  # no state yet: the retry starts from nothing again
        try:
            apply(before)
        except Exception:
            # The kernel keeps the change for now; the next reconcile of the file applies the record.
            log.exception("cannot undo an edit that could not be recorded")

    def compaction_due(self) -> bool:
        if self.log.entries == 0 or time.monotonic() < self._compact_not_before:
            return False
        if self.log.entries >= COMPACT_ENTRIES or self.log.size >= COMPACT_BYTES:
            return True
        return time.monotonic() - self._last_edit >= self._compact_idle

    def compact(self) -> bytes | None:
        """Rewrite the state file as the document, empty the log; the new content, or None
        when another writer holds the file's lock or replaced the file (the daemon's next
        read of it decides), or the file cannot be written (tried again later)."""
        if self.document is None:
            return None
        self._compact_not_before = time.monotonic() + self._compact_idle
        try:
            with locked(lock_path(self.state_path), time.monotonic()):
                if self._base is not None or self.state_path.exists():
                    try:
                        current = hashlib.sha256(self.state_path.read_bytes()).hexdigest()
                    except FileNotFoundError:
                        current = None
                    if current != self._base:
                        return None
                data = document_bytes(self.document)
                write_atomically(self.state_path, data)
                folded = self.log.entries
                self.log.clear()
        except ShimError:
            return None
        except OSError as err:
            log.warning("cannot fold the edit log into the state file", path=str(self.state_path), error=str(err))
            return None
        self._base = hashlib.sha256(data).hexdigest()
        log.info("edit log folded into the state file", edits=folded, path=str(self.state_path), sha256=self._base[:12])
        self._written(data)
        return data
