"""What natgwd's nftables table holds, and the transaction that turns one content into
another.

The same TableContents type describes the kernel (read back as JSON), the in-memory fake
and the desired table, so drift detection, partial syncs and the fake share one diff.
Chains are compared by the tags of their rules: every rule carries a comment that is a
digest of its own text, so "the tags match" means "the rules match" without parsing
rules back from the kernel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

FAMILY = "inet"
TABLE = "natgwd"
ELEMENTS_PER_COMMAND = 2048


@dataclass(frozen=True)
class Counter:
    packets: int
    bytes: int


@dataclass(frozen=True)
class Element:
    """A set element (value None) or a map element. `counter` is only known when read
    from the kernel, or when seeding a re-created element; it never makes elements differ."""

    value: str | None = None
    comment: str | None = None
    counter: Counter | None = field(default=None, compare=False)


@dataclass(frozen=True)
class SetSpec:
    name: str
    body: str  # e.g. "type ipv4_addr : mark;" or "type mark; counter;"

    @property
    def keyword(self) -> str:
        return "map" if " : " in self.body else "set"


SET_KEYWORDS = ("set", "map")  # SetSpec.keyword's values; any other keyword is an object's


@dataclass(frozen=True)
class ObjectSpec:
    """A stateful object (`ct timeout`). Named by its content: the kernel cannot change
    one in place, so a changed object is another one."""

    name: str
    keyword: str  # "ct timeout"
    body: str  # e.g. "protocol tcp; policy = { established: 120 };"
    # (IP protocol number, seconds) of a ct timeout nftables 1.0.6 cannot write (ICMP, ICMPv6:
    # it knows no such protocol there): made over netlink (natgwd.kernel.ctobject) just
    # before the transaction that names it; its body only describes it.
    netlink: tuple[int, int] | None = None


@dataclass(frozen=True)
class ChainSpec:
    name: str
    header: str  # e.g. "type nat hook prerouting priority dstnat; policy accept;"
    rules: tuple[str, ...]

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(rule_tag(self.header, rule) for rule in self.rules)


def rule_tag(header: str, rule: str) -> str:
    # The header takes part so that a changed hook or priority also re-creates the rules.
    return "natgwd:" + hashlib.sha256(f"{header}\n{rule}".encode()).hexdigest()[:16]


@dataclass
class TableContents:
    """The parts of the table that reconciliation compares."""

    sets: dict[str, str] = field(default_factory=dict)  # name -> "set" | "map"
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)  # chain -> rule tags
    elements: dict[str, dict[str, Element]] = field(default_factory=dict)
    # Share chain -> the rule ids it picks among (its first rule's map), in the map's order:
    # which rules form a share group is written nowhere else.
    shares: dict[str, tuple[int, ...]] = field(default_factory=dict)
    objects: dict[str, str] = field(default_factory=dict)  # name -> keyword ("ct timeout")

    def element_count(self) -> int:
        return sum(len(e) for e in self.elements.values())


@dataclass(frozen=True)
class DesiredTable:
    sets: tuple[SetSpec, ...]
    chains: tuple[ChainSpec, ...]
    elements: Mapping[str, Mapping[str, Element]]
    shares: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    objects: tuple[ObjectSpec, ...] = ()
    # How many objects no longer wanted may stay (natgwd.planning.timeouts.RETAINED_OBJECTS).
    retained_objects: int = 0

    def contents(self) -> TableContents:
        return TableContents(
            sets={s.name: s.keyword for s in self.sets},
            chains={c.name: c.tags for c in self.chains},
            elements={name: dict(elems) for name, elems in self.elements.items()},
            shares=dict(self.shares),
            objects={o.name: o.keyword for o in self.objects},
        )


# --- transaction ----------------------------------------------------------------------


@dataclass(frozen=True)
class AddTable:
    def render(self) -> str:
        return f"add table {FAMILY} {TABLE}"


@dataclass(frozen=True)
class AddSet:
    spec: SetSpec

    def render(self) -> str:
        return f"add {self.spec.keyword} {FAMILY} {TABLE} {self.spec.name} {{ {self.spec.body} }}"


@dataclass(frozen=True)
class DeleteNamed:
    """Delete a set, a map or a stateful object (`keyword`: "set", "map", "ct timeout")."""

    name: str
    keyword: str

    @property
    def of_object(self) -> bool:
        return self.keyword not in SET_KEYWORDS

    def render(self) -> str:
        return f"delete {self.keyword} {FAMILY} {TABLE} {self.name}"


@dataclass(frozen=True)
class AddObject:
    spec: ObjectSpec

    def render(self) -> str:
        return f"add {self.spec.keyword} {FAMILY} {TABLE} {self.spec.name} {{ {self.spec.body} }}"


@dataclass(frozen=True)
class AddChain:
    name: str
    header: str  # empty for a regular (non-base) chain

    def render(self) -> str:
        body = f" {{ {self.header} }}" if self.header else ""
        return f"add chain {FAMILY} {TABLE} {self.name}{body}"


@dataclass(frozen=True)
class DeleteChain:
    name: str

    def render(self) -> str:
        return f"delete chain {FAMILY} {TABLE} {self.name}"


@dataclass(frozen=True)
class FlushChain:
    name: str

    def render(self) -> str:
        return f"flush chain {FAMILY} {TABLE} {self.name}"


@dataclass(frozen=True)
class AddRule:
    chain: str
    rule: str
    tag: str

    def render(self) -> str:
        return f'add rule {FAMILY} {TABLE} {self.chain} {self.rule} comment "{self.tag}"'


@dataclass(frozen=True)
class AddElements:
    set_name: str
    elements: tuple[tuple[str, Element], ...]

    def render(self) -> str:
        body = ", ".join([render_element(key, element) for key, element in self.elements])
        return f"add element {FAMILY} {TABLE} {self.set_name} {{ {body} }}"


@dataclass(frozen=True)
class DeleteElements:
    set_name: str
    keys: tuple[str, ...]

    def render(self) -> str:
        return f"delete element {FAMILY} {TABLE} {self.set_name} {{ {', '.join(self.keys)} }}"


Operation = (
    AddTable
    | AddSet
    | DeleteNamed
    | AddObject
    | AddChain
    | DeleteChain
    | FlushChain
    | AddRule
    | AddElements
    | DeleteElements
)


@dataclass
class Transaction:
    """An ordered batch of operations, applied as one kernel transaction (all or nothing)."""

    operations: list[Operation] = field(default_factory=list)
    changed_elements: int = 0
    # Chains no longer wanted: emptied now, deleted by a later transaction.
    emptied_chains: list[str] = field(default_factory=list)
    # Operations that only finish an earlier transaction's work (deleting emptied chains).
    finishing: int = 0
    # Objects to make over netlink before the script (ObjectSpec.netlink): one commit of
    # their own, of objects nothing names yet; deleting them is the script's work.
    made_first: list[ObjectSpec] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.operations or self.made_first)

    def add(self, operation: Operation) -> None:
        self.operations.append(operation)

    def add_elements(self, set_name: str, elements: list[tuple[str, Element]]) -> None:
        self.changed_elements += len(elements)
        for start in range(0, len(elements), ELEMENTS_PER_COMMAND):
            self.add(AddElements(set_name, tuple(elements[start : start + ELEMENTS_PER_COMMAND])))

    def delete_elements(self, set_name: str, keys: list[str]) -> None:
        self.changed_elements += len(keys)
        for start in range(0, len(keys), ELEMENTS_PER_COMMAND):
            self.add(DeleteElements(set_name, tuple(keys[start : start + ELEMENTS_PER_COMMAND])))

    def objects_after(self, before: Mapping[str, str]) -> dict[str, str]:
        """The table's objects once this transaction is applied to one holding `before`
        (objects no longer wanted may stay: DesiredTable.retained_objects)."""
        after = dict(before)
        after.update((spec.name, spec.keyword) for spec in self.made_first)
        for operation in self.operations:
            if isinstance(operation, AddObject):
                after[operation.spec.name] = operation.spec.keyword
            elif isinstance(operation, DeleteNamed) and operation.of_object:
                after.pop(operation.name, None)
        return after

    def script(self) -> str:
        made = "".join(f"# made over netlink first: {AddObject(spec).render()}\n" for spec in self.made_first)
        return made + "".join(f"{operation.render()}\n" for operation in self.operations)


def render_element(key: str, element: Element) -> str:
    text = key
    if element.counter is not None:
        text += f" counter packets {element.counter.packets} bytes {element.counter.bytes}"
    if element.comment is not None:
        text += f' comment "{element.comment}"'
    if element.value is not None:
        text += f" : {element.value}"
    return text


class KnownCounters(Protocol):
    """The last known counters of a counting set's elements, by key."""

    def of(self, set_name: str, /) -> Mapping[str, Counter]: ...


class _NoCounters:
    def of(self, set_name: str, /) -> Mapping[str, Counter]:
        return {}


def plan_transaction(
    current: TableContents | None,
    desired: DesiredTable,
    counters: KnownCounters | None = None,
) -> Transaction:
    """The smallest transaction that makes `current` equal to `desired`.

    `current` None means the table does not exist. Elements whose key or content changed
    are deleted and re-added (the kernel refuses to overwrite a map value); all others are
    left alone, so their per-element counters keep counting. A re-created counting element
    is seeded from `counters` (its last known value) so that a table deleted by hand does
    not send a rule's counters backwards.
    """
    tx = Transaction()
    if counters is None:
        counters = _NoCounters()
    if current is None:
        current = TableContents()
        tx.add(AddTable())
    for spec in desired.sets:
        if spec.name not in current.sets:
            tx.add(AddSet(spec))
    # Objects before the rules that name them.
    for obj in desired.objects:
        if obj.name not in current.objects:
            if obj.netlink is None:
                tx.add(AddObject(obj))
            else:
                tx.made_first.append(obj)
    for chain in desired.chains:
        if current.chains.get(chain.name) == chain.tags:
            continue
        if chain.name in current.chains:
            tx.add(FlushChain(chain.name))
        else:
            tx.add(AddChain(chain.name, chain.header))
        for rule, tag in zip(chain.rules, chain.tags, strict=True):
            tx.add(AddRule(chain.name, rule, tag))
    counting = {spec.name for spec in desired.sets if "counter;" in spec.body}
    for name, wanted in desired.elements.items():
        have = current.elements.get(name, {})
        # Plans reuse element objects, so most elements are found unchanged by identity
        # (dict equality checks identity first, in C), not by comparing their fields.
        if have == wanted:
            continue
        # `is None` first: comparing an Element with None costs two refused __eq__ calls,
        # and a full apply asks it of every new element (250,000 at 50,000 rules).
        stale = [k for k, e in have.items() if (w := wanted.get(k)) is not e and (w is None or w != e)]
        if have:
            added = [(k, e) for k, e in wanted.items() if (h := have.get(k)) is not e and (h is None or h != e)]
        else:
            added = list(wanted.items())
        known = counters.of(name) if name in counting else None
        if known:
            # A re-created counting element keeps counting from where the kernel's was.
            added = [(k, e if (c := known.get(k)) is None else _seeded(e, c)) for k, e in added]
        if stale:
            tx.delete_elements(name, stale)
        if added:
            tx.add_elements(name, added)
    stale_chains = sorted(current.chains.keys() - {c.name for c in desired.chains})
    jumped_to = verdict_targets(current) if stale_chains else set()
    for name in stale_chains:
        # Kernels before 6.2 still count a chain as referenced by a verdict-map element
        # deleted in the same transaction (as above): empty the chain now and delete it
        # once nothing jumps to it, in a later transaction, as kube-proxy does.
        if current.chains[name] or name in jumped_to:
            if current.chains[name]:
                tx.add(FlushChain(name))
            tx.emptied_chains.append(name)
        else:
            tx.add(DeleteChain(name))
            tx.finishing += 1
    desired_sets = {s.name for s in desired.sets}
    for name in sorted(current.sets.keys() - desired_sets):
        # Rules that referenced it were replaced above, in this same transaction.
        tx.add(DeleteNamed(name, current.sets[name]))
    # Last: the rules that named them were flushed or replaced above, in this transaction.
    unwanted = sorted(current.objects.keys() - {o.name for o in desired.objects})
    for name in unwanted[: max(0, len(unwanted) - desired.retained_objects)]:
        tx.add(DeleteNamed(name, current.objects[name]))
    return tx


def verdict_targets(contents: TableContents) -> set[str]:
    """Chains that some map element jumps to."""
    return {
        element.value.split(" ", 1)[1]
        for elements in contents.elements.values()
        for element in elements.values()
        if element.value is not None and element.value.startswith(("goto ", "jump "))
    }


def _seeded(element: Element, counter: Counter | None) -> Element:
    if counter is None or element.counter is not None:
        return element
    return Element(element.value, element.comment, counter)
