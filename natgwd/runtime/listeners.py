"""Where /metrics, /healthz and /readyz listen.

An explicit --metrics-address is one fixed address. The default, `auto`, serves where
Prometheus scrapes a pod without ever serving on an EIP or an external network:
127.0.0.1, and the global addresses of the pod network's interface (eth0: in Kube-OVN's
Multus mode the pod network, in its primary-CNI mode the VPC side; in both the pod's own
address), which the drop-in's pod spec, written by kube-ovn-controller, cannot name.
eth0 is served only once a desired state says which interfaces are external, and never
when it is one of them, holds an EIP, or the address lies in an external network. The
decision is made again before every change of the EIPs or the external side is applied
(closing what the change forbids), once it is applied (opening what it allows), and at
every resync (eth0's addresses may change). A pod address's socket takes only the
connections that arrive on eth0: the gateway forwards between its interfaces, and without
that a host on the external network could reach the pod address through the gateway.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from http.server import ThreadingHTTPServer

import structlog

from natgwd.state.model import DesiredState, IPAddress

log = structlog.get_logger("natgwd.runtime.listeners")

AUTO = "auto"  # the host of --metrics-address that asks for loopback and the pod's address
LOOPBACK = "127.0.0.1"
POD_INTERFACE = "eth0"

Listen = Callable[[tuple[str, int], str | None], ThreadingHTTPServer]  # address, device
Close = Callable[[ThreadingHTTPServer], None]
# What the pod interface's addresses depend on in a state: the external side and the EIPs.
Key = tuple[tuple[tuple[str, tuple[str, ...]], ...], frozenset[IPAddress]] | None


def pod_addresses(state: DesiredState | None, present: Sequence[IPAddress]) -> tuple[IPAddress, ...]:
    """Which of the pod interface's addresses (`present`) may serve under `state`: none
    without a state, when the interface is external or holds an EIP; else those outside
    every external network."""
    if state is None or POD_INTERFACE in {network.interface for network in state.externals}:
        return ()
    eips = {address for eip in state.eips for address in eip.addresses}
    if eips.intersection(present):
        return ()
    return tuple(a for a in present if not any(network.contains(a) for network in state.externals))


def _key(state: DesiredState | None) -> Key:
    if state is None:
        return None
    externals = tuple((n.interface, tuple(str(a) for a in n.addresses)) for n in state.externals)
    return externals, frozenset(a for eip in state.eips for a in eip.addresses)


class MetricsListeners:
    """The listening sockets of the HTTP endpoints: one fixed address, or with `auto`
    loopback and the pod addresses the applied state allows."""

    def __init__(
        self,
        address: tuple[str, int],
        listen: Listen,
        close: Close,
        read_addresses: Callable[[str], Sequence[IPAddress]],
    ) -> None:
        self._address = address
        self._listen = listen
        self._close = close
        self._read = read_addresses
        self._main: ThreadingHTTPServer | None = None
        self._pod: dict[IPAddress, ThreadingHTTPServer] = {}
        self._followed: Key = None  # the state the pod addresses were last opened for
        self._keyed: tuple[object, object, object, Key] | None = None  # the last key, by what it was made of

    @property
    def auto(self) -> bool:
        return self._address[0] == AUTO

    def start(self) -> None:
        """Listen on the fixed address, or on loopback. Raises what binding raises."""
        host, port = self._address
        self._main = self._listen((LOOPBACK if self.auto else host, port), None)

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        """Every address listened on, (host, port)."""
        servers = [self._main, *self._pod.values()] if self._main is not None else []
        return tuple((str(s.server_address[0]), int(s.server_address[1])) for s in servers)

    def follow(self, state: DesiredState | None, widen: bool, reread: bool = False) -> bool:
        """Stop listening where `state` forbids it; with `widen` (`state` is applied) also
        start where it allows. Unless `reread`, a state with the same external side and
        EIPs as the last one followed changes nothing (eth0 is not read for every rule
        change). Whether the addresses listened on changed."""
        key = self._key_of(state)
        if not self.auto or self._main is None or (key == self._followed and not reread):
            return False  # a fixed address, not listening (yet, or any more), or nothing new
        if widen:
            self._followed = key
        try:
            present = self._read(POD_INTERFACE)
        except OSError as err:
            # Unread, eth0 may hold anything: keep only what the state still allows.
            log.warning("cannot read the pod interface's addresses", interface=POD_INTERFACE, error=str(err))
            present, widen = tuple(self._pod), False
        wanted = pod_addresses(state, present)
        changed = False
        for address in [a for a in self._pod if a not in wanted]:
            self._close(self._pod.pop(address))
            log.info("metrics no longer served on a pod address", address=str(address))
            changed = True
        for address in [a for a in wanted if a not in self._pod] if widen else []:
            changed |= self._open(address)
        return changed

    def _key_of(self, state: DesiredState | None) -> Key:
        """_key, made again only when the state's EIPs or external sides are other objects:
        a change of rules keeps the very objects of the state before it, and a set of
        every EIP address at each change would grow with the EIPs (twice a change)."""
        if state is None:
            return None
        parts = (state.eips, state.external, state.more_externals)
        if self._keyed is not None and all(a is b for a, b in zip(self._keyed[:3], parts, strict=True)):
            return self._keyed[3]
        key = _key(state)
        self._keyed = (*parts, key)
        return key

    def _open(self, address: IPAddress) -> bool:
        assert self._main is not None  # follow() checked
        port = int(self._main.server_address[1])  # loopback's, also when asked for port 0
        try:
            self._pod[address] = self._listen((str(address), port), POD_INTERFACE)
        except OSError as err:  # tried again at the next resync
            log.warning("cannot serve metrics on a pod address", address=str(address), port=port, error=str(err))
            return False
        log.info("metrics served on a pod address", address=str(address), port=port, interface=POD_INTERFACE)
        return True

    def stop(self) -> None:
        for server in [*self._pod.values(), *([self._main] if self._main is not None else [])]:
            self._close(server)
        self._pod.clear()
        self._main = None
