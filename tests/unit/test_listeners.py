"""natgwd.runtime.listeners: where the default (`auto`) serves /metrics: loopback, and the pod
interface's addresses only while the applied state makes none of them an EIP or external."""

from __future__ import annotations

import json
from ipaddress import ip_address
from typing import Any

import pytest

from natgwd.lab.topology import SEED_STATE
from natgwd.runtime.listeners import MetricsListeners, pod_addresses
from natgwd.state.model import DesiredState, IPAddress
from natgwd.state.validation import load_state

POD = ip_address("10.244.7.5")
POD6 = ip_address("fd00:244::5")


def state(**changes: Any) -> DesiredState:
    return load_state(json.dumps({**SEED_STATE, **changes}).encode())


def test_the_pod_addresses_serve_when_eth0_is_neither_external_nor_an_eips() -> None:
    """Guards against the drop-in being unscrapable (Multus mode: eth0 is the pod network;
    primary-CNI mode: eth0 is the VPC side, still the pod's own address)."""
    assert pod_addresses(state(), [POD, POD6]) == (POD, POD6)
    internal = {**SEED_STATE["internal"], "interface": "eth0"}
    assert pod_addresses(state(internal=internal), [POD]) == (POD,)


@pytest.mark.parametrize(
    ("changes", "present"),
    [
        ({}, []),  # no global address on eth0 (or no eth0)
        ({"external": {**SEED_STATE["external"], "interface": "eth0"}}, [POD]),  # eth0 is the external side
        ({"eips": [*SEED_STATE["eips"], {"name": "pod", "v4ip": str(POD)}]}, [POD, POD6]),  # eth0 holds an EIP
    ],
)
def test_nothing_on_eth0_where_it_is_external_or_holds_an_eip(changes: dict[str, Any], present: list[Any]) -> None:
    """Guards against /metrics on the external network or an EIP (issue 21, item 1)."""
    assert pod_addresses(state(**changes), present) == ()


def test_no_state_no_pod_address() -> None:
    """Guards against serving on eth0 before natgwd knows which interfaces are external."""
    assert pod_addresses(None, [POD]) == ()


def test_an_address_in_an_external_network_is_left_out() -> None:
    inside = ip_address("10.115.48.7")  # in external 10.115.48.1/21
    assert pod_addresses(state(), [POD, inside]) == (POD,)


class Kernel:
    """Fake listen/close and eth0's addresses."""

    def __init__(self) -> None:
        self.eth0: list[IPAddress] = [POD]
        self.open: dict[tuple[str, int], str | None] = {}
        self.reads = 0
        self.refuse: set[str] = set()
        self.unreadable = False

    def listen(self, address: tuple[str, int], device: str | None) -> Any:
        if address[0] in self.refuse:
            raise OSError(99, "Cannot assign requested address")
        port = address[1] or 40000
        self.open[(address[0], port)] = device

        class Server:
            server_address = (address[0], port)

        return Server()

    def close(self, server: Any) -> None:
        del self.open[server.server_address]

    def read(self, name: str) -> list[IPAddress]:
        assert name == "eth0"
        if self.unreadable:
            raise OSError(105, "No buffer space available")
        self.reads += 1
        return list(self.eth0)


def listeners(kernel: Kernel, address: tuple[str, int] = ("auto", 9469)) -> MetricsListeners:
    made = MetricsListeners(address, kernel.listen, kernel.close, kernel.read)
    made.start()
    return made


def test_auto_serves_loopback_then_the_pod_address_once_a_state_is_applied() -> None:
    kernel = Kernel()
    made = listeners(kernel)
    assert kernel.open == {("127.0.0.1", 9469): None}
    assert not made.follow(None, widen=True)
    assert made.follow(state(), widen=True)
    assert kernel.open == {("127.0.0.1", 9469): None, ("10.244.7.5", 9469): "eth0"}
    assert made.addresses == (("127.0.0.1", 9469), ("10.244.7.5", 9469))
    made.stop()
    assert kernel.open == {}


def test_closed_before_a_change_that_makes_eth0_external_is_applied() -> None:
    """Guards against listening, even for a moment, on an address that becomes external:
    the apply path closes before the change (widen=False) and opens only after it."""
    kernel = Kernel()
    made = listeners(kernel)
    made.follow(state(), widen=True)
    external = state(external={**SEED_STATE["external"], "interface": "eth0"})
    assert made.follow(external, widen=False)
    assert kernel.open == {("127.0.0.1", 9469): None}
    assert not made.follow(external, widen=True)
    assert made.follow(state(), widen=False) is False  # nothing opens before the change is applied
    assert made.follow(state(), widen=True)
    assert ("10.244.7.5", 9469) in kernel.open


def test_an_eip_on_the_pod_address_closes_it() -> None:
    kernel = Kernel()
    made = listeners(kernel)
    made.follow(state(), widen=True)
    with_eip = state(eips=[*SEED_STATE["eips"], {"name": "pod", "v4ip": str(POD)}])
    assert made.follow(with_eip, widen=False)
    assert kernel.open == {("127.0.0.1", 9469): None}


def test_eth0_is_read_again_only_when_the_external_side_or_the_eips_change_or_at_resync() -> None:
    """Guards against a netlink read per nat-gateway.sh call, and against missing a new
    address on eth0 for ever."""
    kernel = Kernel()
    made = listeners(kernel)
    made.follow(state(), widen=True)
    reads = kernel.reads
    more_rules = state(snat=[*SEED_STATE["snat"], {"name": "s2", "eip": "my-eip", "internalCIDR": "10.9.0.0/16"}])
    assert not made.follow(more_rules, widen=False)
    assert not made.follow(more_rules, widen=True)
    assert kernel.reads == reads
    kernel.eth0 = [POD, POD6]
    assert made.follow(more_rules, widen=True, reread=True)
    assert ("fd00:244::5", 9469) in kernel.open
    kernel.eth0 = [POD6]  # the pod address went away
    assert made.follow(more_rules, widen=True, reread=True)
    assert set(kernel.open) == {("127.0.0.1", 9469), ("fd00:244::5", 9469)}


def test_a_pod_address_that_cannot_be_bound_is_tried_again() -> None:
    kernel = Kernel()
    kernel.refuse = {"10.244.7.5"}
    made = listeners(kernel)
    assert not made.follow(state(), widen=True)
    kernel.refuse = set()
    assert made.follow(state(), widen=True, reread=True)
    assert ("10.244.7.5", 9469) in kernel.open


def test_port_zero_gives_the_pod_address_loopbacks_port() -> None:
    kernel = Kernel()
    made = listeners(kernel, ("auto", 0))
    made.follow(state(), widen=True)
    assert set(kernel.open) == {("127.0.0.1", 40000), ("10.244.7.5", 40000)}


def test_an_explicit_address_is_all_there_is() -> None:
    """Guards against --metrics-address / NATGWD_METRICS_ADDRESS changing meaning."""
    kernel = Kernel()
    made = listeners(kernel, ("10.244.7.5", 9469))
    assert not made.follow(state(), widen=True, reread=True)
    assert kernel.open == {("10.244.7.5", 9469): None}
    assert kernel.reads == 0


def test_unreadable_eth0_keeps_only_what_the_state_allows() -> None:
    """Guards against a failed netlink read leaving natgwd on an address that became an
    EIP, or opening addresses nobody saw."""
    kernel = Kernel()
    made = listeners(kernel)
    made.follow(state(), widen=True)
    kernel.unreadable = True
    kernel.eth0 = [POD, POD6]
    assert not made.follow(state(), widen=True, reread=True)  # kept, and nothing opened
    assert set(kernel.open) == {("127.0.0.1", 9469), ("10.244.7.5", 9469)}
    assert made.follow(state(eips=[*SEED_STATE["eips"], {"name": "pod", "v4ip": str(POD)}]), widen=False)
    assert set(kernel.open) == {("127.0.0.1", 9469)}


def test_nothing_is_opened_before_start_or_after_stop() -> None:
    """Guards against a state applied outside `natgwd run`'s loop (or after it stopped)
    opening a socket nobody closes."""
    kernel = Kernel()
    made = MetricsListeners(("auto", 9469), kernel.listen, kernel.close, kernel.read)
    assert not made.follow(state(), widen=True)
    made.start()
    made.stop()
    assert not made.follow(state(), widen=True, reread=True)
    assert kernel.open == {}


def test_a_change_of_rules_alone_reuses_the_key_and_other_eips_make_it_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key (every EIP address) is made once per EIPs and external sides, not twice per
    change: a change of rules keeps their very objects. Equal EIPs of another document
    are keyed again, and an added EIP still closes the pod address it lands on."""
    import dataclasses

    import natgwd.runtime.listeners as module

    made_keys: list[object] = []
    real_key = module._key
    monkeypatch.setattr(module, "_key", lambda s: made_keys.append(s) or real_key(s))
    kernel = Kernel()
    made = listeners(kernel)
    applied = state()
    made.follow(applied, widen=True)
    for rules in range(3):
        changed = dataclasses.replace(applied, snat=applied.snat[:rules])
        made.follow(changed, widen=False)
        made.follow(changed, widen=True)
    assert len(made_keys) == 1
    made.follow(state(), widen=True)  # equal, other objects
    assert len(made_keys) == 2
    with_eip = state(eips=[*SEED_STATE["eips"], {"name": "pod", "v4ip": str(POD)}])
    assert made.follow(with_eip, widen=False)
    assert kernel.open == {("127.0.0.1", 9469): None}
