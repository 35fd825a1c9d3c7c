"""Which rules a new desired-state document changes, and the state it describes, at the
cost of what changed (kube-proxy's change tracker, for a whole document).

A document is compared with the last accepted one: everything outside the rule lists
must be equal, and in each rule list the items between the equal head and the equal tail
are matched by (kind, name) and compared. Only the rules that differ are checked, against
the indexes of all the others (natgwd.state.rules). The full path (every rule checked)
is taken when something outside the rule lists changed, when a rule list holds anything
but named objects, and when more than a fraction of the rules changed. A change the
delta path refuses is validated again in full, so a refusal lists every problem exactly
as a full validation does: the delta path decides nothing the full path would not.
"""

from __future__ import annotations

import itertools
import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from natgwd.state.decode import check_depth, decode_text, scanner, text_of
from natgwd.state.eipdelta import EipChange, eip_change, names_removed_eip, rules_of
from natgwd.state.model import RULE_KINDS, DesiredState, Eip, FipRule, RuleKind, SnatRule
from natgwd.state.problems import Problems
from natgwd.state.rules import RULE_CHECKS, Journal, Rule, RuleContext, RuleIndex, port_block_conflicts
from natgwd.state.semantics import Validated
from natgwd.state.shape import has_control_character, item_shape_ok, may_hold_control_characters, schema
from natgwd.state.spans import Layout, Splice, layout_of, splice
from natgwd.state.validation import validate_document

# More changed rules than 1/FULL_FRACTION of the state (and than FULL_MINIMUM): the full
# path is as cheap, and a whole-state rewrite is what it is made for.
FULL_FRACTION = 4
FULL_MINIMUM = 64
PORT_FIELDS = ("externalPort", "internalPort")
Windows = dict[RuleKind, tuple[int, int]]  # per rule list: the equal head and tail


@dataclass(frozen=True)
class RuleDelta:
    """The rules a change removes from the last state and adds to it (a changed rule is
    in both: its old value removed, its new value added), and the EIPs (natgwd.state.eipdelta)."""

    removed: tuple[Rule, ...]
    added: tuple[Rule, ...]
    removed_eips: tuple[Eip, ...] = ()
    added_eips: tuple[Eip, ...] = ()

    def __len__(self) -> int:
        """How many rules it changes."""
        return len(self.removed) + len(self.added)

    @property
    def eips_changed(self) -> bool:
        return bool(self.removed_eips or self.added_eips)


@dataclass(frozen=True)
class Change:
    """A valid document and its state; `delta` says how it differs from the state it was
    checked against, None when it was validated as a whole."""

    validated: Validated
    delta: RuleDelta | None
    base: DesiredState | None
    # Names of DNAT rules whose item gives a port as the integer 1 (which equals `true`).
    port_one: frozenset[str] = field(default=frozenset(), compare=False)
    layout: Layout | None = field(default=None, compare=False)  # where its rules lie in its text
    # Its text while its layout and port_one are not made yet (StateTracker.settle).
    text: str | None = field(default=None, compare=False, repr=False)
    # What the change writes to the base's indexes (they hold the base until accepted).
    journal: Journal = field(default_factory=list, compare=False, repr=False)

    @property
    def state(self) -> DesiredState:
        return self.validated.state


class StateTracker:
    """The last accepted document, and the checks of the next one against it."""

    def __init__(self) -> None:
        self._accepted: Change | None = None

    @property
    def accepted(self) -> Change | None:
        return self._accepted

    @property
    def state(self) -> DesiredState | None:
        return self._accepted.state if self._accepted is not None else None

    def check(self, raw: bytes) -> Change:
        """The state `raw` describes (InvalidStateError listing every problem if none),
        checked against the last accepted document. Changes nothing: see accept."""
        text = text_of(raw)
        self.settle()
        accepted = self._accepted
        spliced = None
        if accepted is not None and accepted.layout is not None:
            spliced = splice(accepted.layout, accepted.validated.document, text, scanner())
            if spliced is not None:
                change = self._spliced(accepted, spliced)
                if change is not None:
                    return change
        document, fractions = decode_text(text)
        # A splice the delta path refused would be refused again: the full path decides.
        if accepted is not None and spliced is None:
            change = self._delta(document, fractions)
            if change is not None:
                return replace(change, layout=layout_of(text, document, scanner()))
        check_depth(document)
        validated = validate_document(document, may_hold_control_characters(raw))
        # Its layout and port_one serve only the next check: made by settle, after the apply.
        return Change(validated, None, self.state, text=text)

    def check_document(self, document: Any) -> Change:
        """check, for a document already decoded (its numbers' text unknown)."""
        self.settle()
        if self._accepted is not None:
            change = self._delta(document, fractions=True)
            if change is not None:
                return change
        check_depth(document)
        validated = validate_document(document)
        return Change(validated, None, self.state, _port_one(validated.document))

    def accept(self, change: Change) -> None:
        """`change` is applied: the next document is compared with it."""
        if change.delta is not None:
            assert self._accepted is not None and change.base is self._accepted.state, "a change of another base"
            RuleIndex.redo(change.journal)
        self._accepted = change

    def settle(self) -> None:
        """Make what only the next check needs of a document validated in full: its
        layout (a scan of its whole text, 80 ms at 50,000 rules) and port_one. The daemon
        asks after the applied-state record, so that a cold start's apply does not wait
        for them; the next check asks in any case."""
        accepted = self._accepted
        if accepted is not None and accepted.text is not None:
            document = accepted.validated.document
            layout = layout_of(accepted.text, document, scanner())
            self._accepted = replace(accepted, port_one=_port_one(document), layout=layout, text=None)

    def forget(self) -> None:
        """The next document is checked as a whole."""
        self._accepted = None

    # --- the delta path ---------------------------------------------------------------

    def _spliced(self, base: Change, spliced: Splice) -> Change | None:
        """The change of a text that differs from the accepted one inside one rule list:
        the items outside the splice are the accepted document's own objects."""
        document = spliced.document
        items = document[spliced.kind]
        if len(items) > _max_items(spliced.kind):
            return None
        windows: Windows = {kind: (len(document.get(kind, ())), 0) for kind in RULE_KINDS}
        windows[spliced.kind] = (spliced.head, spliced.tail)
        change = self._checked(base, document, windows)
        return replace(change, layout=spliced.layout) if change is not None else None

    def _delta(self, document: Any, fractions: bool) -> Change | None:
        """The change from the accepted document to `document` by its changed rules; None
        when the full path must decide."""
        assert self._accepted is not None
        last = self._accepted.validated
        if not isinstance(document, dict) or not _same_frame(last.document, document, but=("eips",)):
            return None
        eips = None
        old_eips, new_eips = last.document.get("eips", []), document.get("eips", [])
        if old_eips is not new_eips and not (old_eips == new_eips and isinstance(new_eips, list)):
            eips = eip_change(last.state, old_eips, new_eips, document)
            if eips is None:
                return None
        windows: Windows = {}
        for kind in RULE_KINDS:
            items = document.get(kind, [])
            if not isinstance(items, list) or len(items) > _max_items(kind):
                return None
            windows[kind] = _equal_ends(last.document.get(kind, []), items)
        if (fractions or self._accepted.port_one) and not _ports_typed_alike(
            last.document.get("dnat", []), document.get("dnat", []), windows["dnat"]
        ):
            return None
        return self._checked(self._accepted, document, windows, eips)

    def _checked(
        self, base: Change, document: dict[str, Any], windows: Windows, eips: EipChange | None = None
    ) -> Change | None:
        """The change that folds the rules of the windows into the base's indexes; None at
        the first problem. The indexes are left as they were (accept writes the change)."""
        index = base.validated.index
        with index.journaled() as journal:
            folded = self._fold(base, document, windows, eips)
        if folded is None:
            return None
        state, delta, port_one = folded
        return Change(Validated(document, state, index), delta, base.state, port_one, journal=journal)

    def _fold(
        self, base: Change, document: dict[str, Any], windows: Windows, eip_change: EipChange | None
    ) -> tuple[DesiredState, RuleDelta, frozenset[str]] | None:
        last = base.validated
        index = last.index
        # Only whether there is a problem counts: the full path lists them all.
        problems = Problems()
        removed: list[Rule] = []
        arrivals: list[tuple[RuleKind, int, dict[str, Any]]] = []
        port_one = set(base.port_one)
        for kind in RULE_KINDS:
            head, tail = windows[kind]
            before = {item["name"]: item for item in _middle(last.document.get(kind, []), head, tail)}
            for offset, item in enumerate(_middle(document.get(kind, []), head, tail)):
                name = item.get("name") if type(item) is dict else None
                if not isinstance(name, str):
                    return None
                old = before.pop(name, None)
                if old is not None and old == item and not _types_differ(kind, old, item):
                    continue
                if old is not None:
                    removed.append(index.rules[kind][name])
                    index.remove(kind, name)
                    port_one.discard(name)
                arrivals.append((kind, head + offset, item))
            for name in before:
                removed.append(index.rules[kind][name])
                index.remove(kind, name)
                port_one.discard(name)
        total = sum(len(document.get(kind, ())) for kind in RULE_KINDS)
        if len(removed) + len(arrivals) > max(FULL_MINIMUM, total // FULL_FRACTION):
            return None
        eips = {eip.name: eip for eip in (eip_change.eips if eip_change else last.state.eips)}
        context = RuleContext(eips, last.state.internal, scale_out=last.state.scale_out)
        added: list[Rule] = []
        for kind, position, item in sorted(arrivals, key=lambda arrival: RULE_KINDS.index(arrival[0])):
            if not item_shape_ok(kind, item) or _has_control_character(item):
                return None
            index.claim_name(kind, item["name"], position, problems)
            if kind == "fip":
                index.claim_fip_address(item, position, problems)
            rule = RULE_CHECKS[kind](item, position, context, problems)
            if problems or rule is None or not index.add(rule, position, problems) or problems:
                return None
            added.append(rule)
            if kind == "dnat" and _ports_include_integer_one(item):
                port_one.add(item["name"])
        if any(isinstance(rule, SnatRule | FipRule) for rule in (*removed, *added)):
            port_block_conflicts(index, problems)
            if problems:
                return None
        state = _with_rules(last, index, document, windows)
        if eip_change is None:
            return state, RuleDelta(tuple(removed), tuple(added)), frozenset(port_one)
        state = replace(state, eips=eip_change.eips)
        if eip_change.removed and names_removed_eip(rules_of(state), eip_change.removed):
            return None
        delta = RuleDelta(tuple(removed), tuple(added), eip_change.removed, eip_change.added)
        return state, delta, frozenset(port_one)


def _same_frame(old: dict[str, Any], new: dict[str, Any], but: Sequence[str] = ()) -> bool:
    """Everything outside the rule lists (and the keys `but`) is equal, types included (1,
    1.0 and true are equal in Python; a schema tells them apart)."""
    keys = (old.keys() | new.keys()) - {*RULE_KINDS, *but}
    for key in keys:
        if key in old and key in new and old[key] is new[key]:
            continue
        if key not in old or key not in new or old[key] != new[key]:
            return False
        # Every value of a valid EIP is a string: equal is the same there, and EIPs are
        # most of the frame.
        if key != "eips" and json.dumps(old[key]) != json.dumps(new[key]):
            return False
    return True


def _max_items(kind: RuleKind) -> int:
    return int(schema()["properties"][kind]["maxItems"])


def _equal_ends(old: Sequence[Any], new: Sequence[Any]) -> tuple[int, int]:
    """How many items at the head and at the tail of `new` equal those of `old` (the two
    runs do not overlap). The comparisons run in C: a few milliseconds at 10,000 rules."""
    return _ends(old, new, by_value=True)


def _same_ends(old: Sequence[Any], new: Sequence[Any]) -> tuple[int, int]:
    """How many items at the head and at the tail of `new` are the very objects of `old`
    (a document edited in memory keeps the objects it did not change)."""
    return _ends(old, new, by_value=False)


def _ends(old: Sequence[Any], new: Sequence[Any], by_value: bool) -> tuple[int, int]:
    shorter = min(len(old), len(new))
    head = _run(old, new, shorter, by_value)
    tail = _run(old[::-1], new[::-1], shorter, by_value)
    return head, min(tail, shorter - head)


def _run(old: Sequence[Any], new: Sequence[Any], shorter: int, by_value: bool) -> int:
    """How many items at the start of `new` are those of `old`: the very objects first
    (identity costs nothing), then, `by_value`, equal ones."""
    same = _first_difference(old, new, operator.is_not, shorter)
    if not by_value:
        return same
    return same + _first_difference(old[same:], new[same:], operator.ne, shorter - same)


def _first_difference(old: Sequence[Any], new: Sequence[Any], differ: Any, shorter: int) -> int:
    return next(itertools.compress(itertools.count(), map(differ, old, new)), shorter)


def _middle(items: Sequence[Any], head: int, tail: int) -> Sequence[Any]:
    return items[head : len(items) - tail]


def _types_differ(kind: RuleKind, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether two equal items differ in JSON (`true` equals 1 in Python): their ports,
    their timeouts."""
    if "timeouts" in old and json.dumps(old["timeouts"]) != json.dumps(new["timeouts"]):
        return True
    return kind == "dnat" and _port_types_differ(old, new)


def _port_types_differ(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return any(type(old.get(name)) is not type(new.get(name)) for name in PORT_FIELDS)


def _ports_typed_alike(old: Sequence[Any], new: Sequence[Any], window: tuple[int, int]) -> bool:
    """Whether the equal ends of a rule list give their ports the same JSON types; the
    very objects of the last document need no look."""
    head, tail = window
    same_head, same_tail = _same_ends(old, new)
    heads = zip(old[min(same_head, head) : head], new[min(same_head, head) : head], strict=True)
    tail_start = min(tail, same_tail)
    tails = zip(old[len(old) - tail : len(old) - tail_start], new[len(new) - tail : len(new) - tail_start], strict=True)
    return not any(_port_types_differ(a, b) for a, b in itertools.chain(heads, tails))


def _ports_include_integer_one(item: dict[str, Any]) -> bool:
    return any(type(item.get(name)) is int and item.get(name) == 1 for name in PORT_FIELDS)


def _port_one(document: dict[str, Any]) -> frozenset[str]:
    # `== 1` first: _ports_include_integer_one for the rare item that may, not for all 50,000.
    return frozenset(
        item["name"]
        for item in document.get("dnat", ())
        if (item.get("externalPort") == 1 or item.get("internalPort") == 1) and _ports_include_integer_one(item)
    )


def _has_control_character(item: dict[str, Any]) -> bool:
    # A SNAT pool's `eips` is a list of strings.
    values = (w for v in item.values() for w in (v if isinstance(v, list) else (v,)))
    return any(isinstance(v, str) and has_control_character(v) for v in values)


def _with_rules(last: Validated, index: RuleIndex, document: dict[str, Any], windows: Windows) -> DesiredState:
    """The last state with each rule list's middle replaced: a valid state has one rule
    per item, in the document's order."""
    lists: dict[RuleKind, tuple[Rule, ...]] = {}
    for kind in RULE_KINDS:
        head, tail = windows[kind]
        old: tuple[Rule, ...] = getattr(last.state, kind)
        rules = index.rules[kind]
        middle = tuple(rules[item["name"]] for item in _middle(document.get(kind, []), head, tail))
        lists[kind] = (*old[:head], *middle, *old[len(old) - tail :])
    snat: Any = lists["snat"]
    dnat: Any = lists["dnat"]
    fip: Any = lists["fip"]
    return replace(last.state, snat=snat, dnat=dnat, fip=fip)
