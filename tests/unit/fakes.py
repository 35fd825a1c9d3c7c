"""Stand-ins shared by the unit tests (no root, no kernel)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from natgwd.ha.controller import HaKernel
from natgwd.ha.render import HaPaths
from natgwd.ha.scale import ScaleController
from natgwd.ha.scale_metrics import ScaleMetrics
from natgwd.kernel.netlink import AddressChange, AddressChangeError, LinkReport
from natgwd.planning.links import LinkPlan
from natgwd.state.model import IPInterface

UPSTREAM = "10.115.55.254"


def _cni_links() -> dict[str, tuple[list[str], list[tuple[str, str]]]]:
    return {
        "net1": (["172.20.10.254/24"], [("10.55.0.0/16", "172.20.10.1"), ("10.115.48.0/21", "172.20.10.1")]),
        "net2": (["10.115.48.1/21"], [("0.0.0.0/0", UPSTREAM)]),
        "eth0": (["10.52.1.66/32"], []),
    }


@dataclass
class FakeLinks:
    """The gateway's links. For the reconciler: every plan recorded, the interfaces named in
    `missing` reported absent, `errors` reported by every apply. For the drop-in's kernel
    queries: the interfaces as the CNI left them (what `init` discovers), and natgwd's table
    as natgwd.kubeovn.kernelrules reads it."""

    missing: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    links: dict[str, tuple[list[str], list[tuple[str, str]]]] = field(default_factory=_cni_links)
    kernel_rules: dict[str, Any] | Exception | None = None
    plans: list[LinkPlan] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    address_changes: list[AddressChange] = field(default_factory=list)  # in effect
    refuse: tuple[str, ...] = ()  # addresses change_addresses is refused

    # the reconciler's link programmer

    def add(self, before: LinkPlan, after: LinkPlan) -> LinkReport | None:
        return None  # every plan through apply, recorded

    def change_addresses(
        self, interface: str, removed: Sequence[IPInterface], added: Sequence[IPInterface]
    ) -> AddressChange:
        """Recorded in `address_changes`; refused (nothing changed) for an address in `refuse`."""
        refused = [f"add address {a} dev {interface}: refused" for a in added if str(a.ip) in self.refuse]
        if refused:
            raise AddressChangeError(refused)
        change = AddressChange(interface, 0, list(removed), list(added))
        self.address_changes.append(change)
        return change

    def undo(self, change: AddressChange) -> None:
        self.address_changes.remove(change)

    def apply(self, plan: LinkPlan) -> LinkReport:
        self.plans.append(plan)
        changes, self.changes = self.changes, []
        return LinkReport(
            missing=[name for name in plan.interface_names if name in self.missing],
            changes=changes,
            errors=list(self.errors),
        )

    # the drop-in's kernel queries

    def exists(self, name: str) -> bool:
        return name in self.links

    def addresses(self, name: str) -> list[IPv4Interface]:
        return [IPv4Interface(a) for a in self.links.get(name, ([], []))[0]]

    def routes(self, name: str) -> list[tuple[IPv4Network, IPv4Address]]:
        return [(IPv4Network(d), IPv4Address(v)) for d, v in self.links.get(name, ([], []))[1]]

    def delete_routes(self, name: str, dst: IPv4Network) -> int:
        addresses, routes = self.links.get(name, ([], []))
        kept = [(d, v) for d, v in routes if IPv4Network(d) != dst]
        self.links[name] = (addresses, kept)
        return len(routes) - len(kept)

    def nat_rules(self) -> dict[str, Any] | None:
        if isinstance(self.kernel_rules, Exception):
            raise self.kernel_rules
        return self.kernel_rules


def quiet_ha_kernel(addresses: Callable[[str], list[IPv4Address]] = lambda _interface: []) -> HaKernel:
    """A member's kernel that takes every request and has nothing to tell but `addresses`."""
    return HaKernel(
        addresses,
        lambda: False,
        lambda _interface, _addresses: 0,
        lambda _table, _via, _interface: None,
        lambda _scope: False,
        lambda _interface, _open: False,
    )


class FakeAdvertListener:
    """Hears nothing by itself: a test hands it adverts through `on_advert`."""

    def __init__(self, interface: str, on_advert: Callable[[IPv4Address, int, int], None]) -> None:
        self.interface, self.on_advert = interface, on_advert

    def stop(self) -> None:
        pass


def scale_controller(
    directory: Path,
    address: IPv4Address,
    *,
    engine: str = "true",
    set_route: Callable[[int, IPv4Address | None, str], None] = lambda _table, _via, _interface: None,
    bfd_gate: Callable[[str, bool | None], bool] = lambda _interface, _open: False,
    listeners: list[FakeAdvertListener] | None = None,
) -> ScaleController:
    """A scaled-out member at `address` whose kernel requests all succeed; `engine` stands
    in for keepalived and conntrackd, and the advert listeners it opens are appended to
    `listeners`."""
    opened = listeners if listeners is not None else []

    def listen(interface: str, on_advert: Callable[[IPv4Address, int, int], None]) -> Any:
        opened.append(FakeAdvertListener(interface, on_advert))
        return opened[-1]

    return ScaleController(
        HaPaths(directory),
        ScaleMetrics(CollectorRegistry(), lambda: True),
        engine,
        engine,
        lambda _interface, _addresses: 0,
        lambda _interface, _frames: None,
        set_route=set_route,
        addresses_of=lambda _interface: [address],
        no_redirects=lambda _scope: False,
        bfd_gate=bfd_gate,
        listen=listen,
    )
