"""An in-memory stand-in for the kernel's natgwd table, for tests without root.

It applies transactions with the kernel's rules that matter to reconciliation: all or
nothing, adding an existing map key with another value fails, deleting a missing element
or object fails, references must resolve (as knftables' fake checks them), and counters
live on elements. The ruleset generation moves by one per commit, as the kernel's does.
It is as strict as the oldest kernel natgwd supports: before 6.2, a chain still counts as
referenced by a verdict-map element deleted in the same transaction.
"""

from __future__ import annotations

import copy
import errno
import re
from typing import TypeVar

from natgwd.kernel.nft import NftError
from natgwd.planning.bfdgate import BFD_OPEN
from natgwd.planning.counters import CountedElement
from natgwd.planning.layout import (
    POOL_CHAIN_PREFIX,
    RULE_CONNECTIONS,
    RULE_TRAFFIC,
    SHARE_CHAIN_PREFIX,
    key_shard,
    parts,
)
from natgwd.planning.table import (
    AddChain,
    AddElements,
    AddObject,
    AddRule,
    AddSet,
    AddTable,
    Counter,
    DeleteChain,
    DeleteElements,
    DeleteNamed,
    Element,
    FlushChain,
    TableContents,
    Transaction,
    verdict_targets,
)

T = TypeVar("T")


class FakeNft:
    def __init__(self) -> None:
        self.table: TableContents | None = None
        self.transactions: list[Transaction] = []
        self.fail_next: str | None = None
        self._generation = 1
        self._rule_text: dict[str, str] = {}  # tag -> rule, for reference checks

    def apply(self, tx: Transaction) -> None:
        if not tx:
            return
        if self.fail_next is not None:
            reason, self.fail_next = self.fail_next, None
            raise NftError(reason)
        if tx.made_first:
            # A commit of its own, as the kernel's (natgwd.kernel.ctobject): kept even if
            # the transaction after it is refused.
            self.table = self.table or TableContents()
            self.table.objects.update((spec.name, spec.keyword) for spec in tx.made_first)
            self._generation += 1
            if not tx.operations:
                return
        self.table = self._applied(tx)
        self.transactions.append(tx)
        self._generation += 1

    def foreign(self) -> TableContents:
        """The table for a test to change as another process would: the change counts as
        that process's commit, so the generation moves."""
        assert self.table is not None
        self._generation += 1
        return self.table

    def check(self, tx: Transaction) -> None:
        self._applied(tx)

    def read_table(self) -> TableContents | None:
        table = copy.deepcopy(self.table)
        if table is not None and BFD_OPEN in table.elements:
            table.elements[BFD_OPEN] = {}  # as natgwd.kernel.nft reads it
        return table

    def read_counters(self, names: tuple[str, ...]) -> dict[str, list[CountedElement]]:
        """As the kernel lists them: marks in hex."""
        if self.table is None:
            return {}
        found: dict[str, list[CountedElement]] = {}
        for name in names:
            for part in parts(name):
                if part in self.table.elements:
                    listing = found.setdefault(name, [])
                    listing.extend(_counted(key, element) for key, element in self.table.elements[part].items())
        return found

    def delete_table(self) -> bool:
        if self.table is None:
            return False
        self.table = None
        self._generation += 1
        return True

    def generation(self) -> int:
        return self._generation

    def count(self, set_name: str, key: str, packets: int, size: int) -> None:
        """Pretend the kernel matched `packets` packets of `size` bytes on an element (of a
        logical counting set: the element of its shard)."""
        assert self.table is not None
        if set_name in (RULE_CONNECTIONS, RULE_TRAFFIC) and set_name not in self.table.elements:
            set_name = key_shard(set_name, key)
        element = self.table.elements[set_name][key]
        old = element.counter or Counter(0, 0)
        new = Counter(old.packets + packets, old.bytes + packets * size)
        self.table.elements[set_name][key] = Element(element.value, element.comment, new)

    def _applied(self, tx: Transaction) -> TableContents:
        table = copy.deepcopy(self.table)
        jumped_to_before = verdict_targets(table) if table is not None else set()
        for op in tx.operations:
            if isinstance(op, AddTable):
                table = table or TableContents()
                continue
            if table is None:
                raise NftError(f"{op.render()}: No such file or directory (no table)", errno.ENOENT)
            if isinstance(op, AddRule):
                self._check_rule_references(table, op)
            elif isinstance(op, DeleteChain) and op.name in jumped_to_before | self._chains_referenced(table):
                raise NftError(f"{op.render()}: Device or resource busy (chain is referenced)", errno.EBUSY)
            elif isinstance(op, DeleteNamed) and not op.of_object and op.name in self._sets_referenced(table):
                raise NftError(f"{op.render()}: Device or resource busy (set is referenced)", errno.EBUSY)
            elif isinstance(op, DeleteNamed) and op.of_object and op.name in self._objects_referenced(table):
                raise NftError(f"{op.render()}: Device or resource busy (object is referenced)", errno.EBUSY)
            _apply(table, op)
        assert table is not None
        return table

    def _check_rule_references(self, table: TableContents, op: AddRule) -> None:
        for name in _SET_REFERENCE.findall(op.rule):
            _need(table.sets, name, op.render())
        for name in _CHAIN_REFERENCE.findall(op.rule):
            _need(table.chains, name, op.render())
        for name in _OBJECT_REFERENCE.findall(op.rule):
            _need(table.objects, name, op.render())
        self._rule_text[op.tag] = op.rule

    def _rules(self, table: TableContents) -> list[str]:
        return [self._rule_text.get(tag, "") for tags in table.chains.values() for tag in tags]

    def _sets_referenced(self, table: TableContents) -> set[str]:
        return {name for rule in self._rules(table) for name in _SET_REFERENCE.findall(rule)}

    def _objects_referenced(self, table: TableContents) -> set[str]:
        return {name for rule in self._rules(table) for name in _OBJECT_REFERENCE.findall(rule)}

    def _chains_referenced(self, table: TableContents) -> set[str]:
        by_rules = {name for rule in self._rules(table) for name in _CHAIN_REFERENCE.findall(rule)}
        return by_rules | verdict_targets(table)


_SET_REFERENCE = re.compile(r"@(\w+)")
_NUMGEN_MAP = re.compile(r"(?:numgen random|jhash ip6? saddr) mod [0-9]+(?: seed 0x[0-9a-f]+)? map \{ ([^}]*) \}")
_CHAIN_REFERENCE = re.compile(r"\b(?:jump|goto) (\w+)")
_OBJECT_REFERENCE = re.compile(r'ct timeout set "(\w+)"')


def _apply(table: TableContents, op: object) -> None:
    if isinstance(op, AddSet):
        if op.spec.name not in table.sets:
            table.sets[op.spec.name] = op.spec.keyword
            table.elements[op.spec.name] = {}
    elif isinstance(op, DeleteNamed) and not op.of_object:
        if op.name not in table.sets:
            raise NftError(f"{op.render()}: No such file or directory", errno.ENOENT)
        del table.sets[op.name]
        del table.elements[op.name]
    elif isinstance(op, AddObject):
        table.objects.setdefault(op.spec.name, op.spec.keyword)
    elif isinstance(op, DeleteNamed):
        _need(table.objects, op.name, op.render())
        del table.objects[op.name]
    elif isinstance(op, AddChain):
        table.chains.setdefault(op.name, ())
    elif isinstance(op, DeleteChain):
        if table.chains.get(op.name):
            raise NftError(f"{op.render()}: Device or resource busy (chain not empty)", errno.EBUSY)
        _need(table.chains, op.name, op.render())
        del table.chains[op.name]
        table.shares.pop(op.name, None)
    elif isinstance(op, FlushChain):
        _need(table.chains, op.name, op.render())
        table.chains[op.name] = ()
        table.shares.pop(op.name, None)
    elif isinstance(op, AddRule):
        _need(table.chains, op.chain, op.render())
        table.chains[op.chain] = (*table.chains[op.chain], op.tag)
        if op.chain.startswith((SHARE_CHAIN_PREFIX, POOL_CHAIN_PREFIX)) and (choices := _NUMGEN_MAP.search(op.rule)):
            # As the kernel lists a share or pool chain's rule: the ids of its map.
            table.shares[op.chain] = tuple(int(pair.split(" : ")[1]) for pair in choices[1].split(", "))
    elif isinstance(op, AddElements):
        elements = _need(table.elements, op.set_name, op.render())
        for key, element in op.elements:
            if element.value is not None and (jump := _CHAIN_REFERENCE.match(element.value)):
                _need(table.chains, jump.group(1), op.render())
            existing = elements.get(key)
            if existing is not None and existing.value != element.value:
                raise NftError(f"{op.render()}: File exists (key {key} maps elsewhere)", errno.EEXIST)
            if existing is None:
                seeded = element.counter or Counter(0, 0)
                elements[key] = Element(element.value, element.comment, seeded)
    elif isinstance(op, DeleteElements):
        elements = _need(table.elements, op.set_name, op.render())
        for key in op.keys:
            if key not in elements:
                raise NftError(f"{op.render()}: No such file or directory (element {key})", errno.ENOENT)
            del elements[key]


def _need(mapping: dict[str, T], name: str, command: str) -> T:
    if name not in mapping:
        raise NftError(f"{command}: No such file or directory", errno.ENOENT)
    return mapping[name]


def _counted(key: str, element: Element) -> CountedElement:
    listed = " . ".join(f"0x{int(part):08x}" if part.isdigit() else part for part in key.split(" . "))
    counter = element.counter or Counter(0, 0)
    return (listed, str(counter.packets), str(counter.bytes), element.comment or "")
