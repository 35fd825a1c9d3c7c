"""The shell around libnftables: apply a transaction, read the table back.

Scripts are written as text and read back as JSON, the same split kube-proxy's knftables
makes: libnftables 1.0.6 JSON input mishandles concatenated map types, while one text
`cmd()` call is one atomic kernel transaction.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from natgwd.kernel.ctobject import make_ct_timeouts
from natgwd.kernel.setdump import (
    NETLINK_NETFILTER,
    NFNL_SUBSYS_NFTABLES,
    NFPROTO_INET,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    SetDumper,
    SetDumpError,
    key_layout,
)
from natgwd.planning.bfdgate import BFD_OPEN
from natgwd.planning.counters import CountedElement
from natgwd.planning.layout import POOL_CHAIN_PREFIX, SHARE_CHAIN_PREFIX, parts
from natgwd.planning.plan import set_key_type
from natgwd.planning.table import FAMILY, TABLE, Counter, Element, TableContents, Transaction


class NftError(Exception):
    """A refusal of nftables, with the kernel's errno when one is known (as knftables'
    error.go): callers ask `is_not_found()`, never the message's words."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code

    @classmethod
    def from_libnftables(cls, message: str) -> NftError:
        """The error of libnftables' message. It reports the kernel's refusal as the C
        library's English strerror on the first line ("Error: Could not process rule: No
        such file or directory"), and no errno beside it: read here, and only here."""
        first = message.partition("\n")[0]
        code = next((code for code, text in _STRERRORS.items() if text in first), None)
        return cls(message, code)

    def is_not_found(self) -> bool:
        """The table, chain, set or element named does not exist."""
        return self.errno == errno.ENOENT

    def is_already_exists(self) -> bool:
        return self.errno == errno.EEXIST


# Enough for the kernel to build a dump while Python decodes others, on this 2-core kind of machine.
_DUMP_THREADS = 4

# libnftables does not call setlocale(): its messages are English whatever the locale.
_STRERRORS = {
    errno.ENOENT: "No such file or directory",
    errno.EEXIST: "File exists",
    errno.EBUSY: "Device or resource busy",
}


class Nft(Protocol):
    def apply(self, tx: Transaction) -> None: ...

    def check(self, tx: Transaction) -> None: ...

    def read_table(self) -> TableContents | None: ...

    def read_counters(self, names: tuple[str, ...]) -> dict[str, list[CountedElement]]: ...

    def delete_table(self) -> bool:
        """Whether there was a table to delete."""
        ...

    def generation(self) -> int: ...


class KernelNft:
    """libnftables through Debian's python3-nftables binding; counters straight over
    netlink (natgwd.kernel.setdump), so that a scrape neither waits for nor delays a transaction."""

    def __init__(self) -> None:
        from nftables import Nftables  # only importable where libnftables is installed

        self._run = _Context(Nftables(), json_output=True)
        self._sets = SetDumper(NFPROTO_INET, TABLE)
        self._generation_socket: socket.socket | None = None
        self._generation_lock = threading.Lock()
        self._sequence = 0

    def apply(self, tx: Transaction) -> None:
        if tx.made_first:
            made = [(spec.name, *spec.netlink) for spec in tx.made_first if spec.netlink is not None]
            try:
                make_ct_timeouts(TABLE, made)
            except OSError as err:
                raise NftError(str(err), err.errno) from err
        if tx.operations:
            self._run(tx.script())

    def check(self, tx: Transaction) -> None:
        # A dry run makes nothing, so a transaction naming an object made over netlink
        # (made_first) is refused here unless that object exists already.
        if tx.operations:
            self._run(tx.script(), dry_run=True)

    def read_table(self) -> TableContents | None:
        try:
            output = self._run(f"list table {FAMILY} {TABLE}")
        except NftError as err:
            if err.is_not_found():
                return None
            raise
        return parse_table(_load(output))

    def gate_open(self, interface: str) -> bool:
        """Whether the BFD gate's set holds `interface` (natgwd.planning.bfdgate); a read,
        which moves no ruleset generation."""
        try:
            output = self._run(f"list set {FAMILY} {TABLE} {BFD_OPEN}")
        except NftError as err:
            if err.is_not_found():
                return False
            raise
        return any(interface in body.get("elem", ()) for obj in _load(output) for body in obj.values())

    def read_counters(self, names: tuple[str, ...]) -> dict[str, list[CountedElement]]:
        """The elements of counting sets (logical ones: a split set is listed from its
        shards), with their counters and comments. The sets are dumped on a few threads:
        the kernel builds one dump while Python decodes another (a socket's read releases
        the GIL), a quarter off a scrape at 10,000 rules."""

        def read(name: str) -> list[CountedElement] | None:
            return self._sets.read(name, key_layout(set_key_type(name)))

        dumped = [(name, part) for name in names for part in parts(name)]
        try:
            with ThreadPoolExecutor(max_workers=_DUMP_THREADS, thread_name_prefix="natgwd-sets") as pool:
                listed = list(pool.map(read, [part for _, part in dumped]))
        except SetDumpError as err:
            raise NftError(str(err)) from err
        found: dict[str, list[CountedElement]] = {}
        for (name, _), elements in zip(dumped, listed, strict=True):
            if elements is not None:
                found.setdefault(name, []).extend(elements)
        return found

    def delete_table(self) -> bool:
        try:
            self._run(f"delete table {FAMILY} {TABLE}")
        except NftError as err:
            if not err.is_not_found():
                raise
            return False
        return True

    def generation(self) -> int:
        """The kernel's ruleset generation: it moves with every commit to any table.
        Asked on a bare netlink socket kept open: a change asks twice, and opening (or
        closing) a netlink socket costs a millisecond on a busy machine."""
        with self._generation_lock:
            try:
                return self._ask_generation()
            except OSError:
                self._close_generation_socket()  # a broken socket: one more try on a new one
                return self._ask_generation()

    def _ask_generation(self) -> int:
        if self._generation_socket is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
            sock.bind((0, 0))
            self._generation_socket = sock
        self._sequence += 1
        request = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
        kind = (NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETGEN
        self._generation_socket.send(
            struct.pack("=IHHII", 16 + len(request), kind, NLM_F_REQUEST, self._sequence, 0) + request
        )
        while True:
            reply = self._generation_socket.recv(4096)
            length, kind_seen, _, sequence = struct.unpack_from("=IHHI", reply)
            if sequence == self._sequence:  # not a late answer to an earlier try
                break
        if kind_seen == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", reply, 16)
            raise NftError(f"reading the ruleset generation: {os.strerror(-code)}", -code)
        offset = 20  # netlink header, then nfgenmsg
        while offset + 4 <= length:
            size, attribute = struct.unpack_from("=HH", reply, offset)
            if attribute & 0x3FFF == _NFTA_GEN_ID:
                return int(struct.unpack_from("!I", reply, offset + 4)[0])
            offset += (size + 3) & ~3
        raise NftError("the kernel's answer names no ruleset generation")

    def _close_generation_socket(self) -> None:
        if self._generation_socket is not None:
            self._generation_socket.close()
            self._generation_socket = None


_NFT_MSG_GETGEN = 16


_NFTA_GEN_ID = 1


class _Context:
    """One libnftables context; its calls are serialised because a context is not safe to
    share between threads."""

    def __init__(self, nft: Any, json_output: bool) -> None:
        self._nft = nft
        self._nft.set_json_output(json_output)
        self._nft.set_handle_output(False)
        self._lock = threading.Lock()

    def __call__(self, script: str, dry_run: bool = False) -> Any:
        with self._lock:
            self._nft.set_dry_run(dry_run)
            try:
                rc, output, error = self._nft.cmd(script)
            finally:
                self._nft.set_dry_run(False)
        if rc != 0:
            raise NftError.from_libnftables(error.strip() or f"libnftables returned {rc}")
        return output


def _load(output: str) -> list[dict[str, Any]]:
    import json

    objects: list[dict[str, Any]] = json.loads(output)["nftables"]
    return objects


def _canonical(value: Any, quoted: bool) -> str:
    if isinstance(value, dict) and "concat" in value:
        return " . ".join(_canonical(v, quoted) for v in value["concat"])
    if isinstance(value, dict) and "prefix" in value:  # an interval map's network
        return f"{value['prefix']['addr']}/{value['prefix']['len']}"
    if isinstance(value, dict) and "range" in value:  # a port block
        first, last = value["range"]
        return f"{first}-{last}"
    if isinstance(value, dict) and ("goto" in value or "jump" in value):
        verdict, target = next(iter(value.items()))
        return f"{verdict} {target['target']}"
    if isinstance(value, str) and quoted:
        return f'"{value}"'
    return str(value)


def _parse_element(item: Any, is_map: bool, quoted: bool) -> tuple[str, Element]:
    value = None
    if is_map:
        item, mapped = item
        value = _canonical(mapped, quoted=False)
    comment = None
    counter = None
    if isinstance(item, dict) and "elem" in item:
        wrapped = item["elem"]
        item = wrapped["val"]
        comment = wrapped.get("comment")
        if "counter" in wrapped:
            counter = Counter(wrapped["counter"]["packets"], wrapped["counter"]["bytes"])
    return _canonical(item, quoted), Element(value, comment, counter)


def parse_table(objects: list[dict[str, Any]]) -> TableContents:
    """TableContents from `nft -j list table|set` output."""
    contents = TableContents()
    chains: dict[str, list[str]] = {}
    for obj in objects:
        kind, body = next(iter(obj.items()))
        if kind in ("set", "map"):
            contents.sets[body["name"]] = kind
            # ifname keys come back bare but must be written quoted.
            quoted = body.get("type") == "ifname"
            elements = (_parse_element(i, kind == "map", quoted) for i in body.get("elem", ()))
            # The BFD gate's element is natgwd.ha.scale's, never the reconciler's.
            contents.elements[body["name"]] = {} if body["name"] == BFD_OPEN else dict(elements)
        elif kind == "ct timeout":
            contents.objects[body["name"]] = kind
        elif kind == "chain":
            chains.setdefault(body["name"], [])
        elif kind == "rule":
            chains.setdefault(body["chain"], []).append(body.get("comment", ""))
            if str(body["chain"]).startswith((SHARE_CHAIN_PREFIX, POOL_CHAIN_PREFIX)):
                marks = _share_marks(body)
                if marks is not None:
                    contents.shares[body["chain"]] = marks
    contents.chains = {name: tuple(tags) for name, tags in chains.items()}
    return contents


def _share_marks(rule: dict[str, Any]) -> tuple[int, ...] | None:
    """The rule ids a share (or SNAT pool) chain's first rule picks among: it sets the ct
    mark from `numgen random mod N map { 0 : id, 1 : id, ... }` (`jhash ip saddr mod N ...`
    for a pool), in the map's order (libnftables 1.0.6's JSON)."""
    for expr in rule.get("expr", ()):
        mapping = (expr.get("mangle") or {}).get("value", {}).get("map", {}) if isinstance(expr, dict) else {}
        pairs = (mapping.get("data") or {}).get("set") if isinstance(mapping, dict) else None
        if isinstance(pairs, list):
            return tuple(int(mark) for _, mark in sorted(pairs))
    return None
