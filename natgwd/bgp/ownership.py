"""Which EIPs this member may announce: the hook between the speaker and whatever decides
ownership (the single gateway owns everything; an HA pair's active member owns every EIP and
its standby stands by for them; a scale-out member owns its share).

The speaker asks `claims` whenever it reconciles and when told by `on_change`, so an owner
only has to say what it owns now and call back when that changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Protocol

from natgwd.state.model import DesiredState


@dataclass(frozen=True)
class Claims:
    owned: frozenset[str]  # EIP names this member announces as their owner
    # EIP names this member would take over: announced with a worse preference when the
    # bgp section asks for it (standbyPrepend), so upstream already holds a second path.
    standby: frozenset[str] = frozenset()


NOTHING = Claims(frozenset())


class Ownership(Protocol):
    def claims(self, state: DesiredState) -> Claims: ...

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from any thread) whenever `claims` may answer differently."""

    def member_address(self) -> IPv4Address | None:
        """This member's own address (its BGP router id unless the state names one); None
        for a single gateway."""


class SoleOwner:
    """A single gateway: it owns every EIP of its state."""

    def claims(self, state: DesiredState) -> Claims:
        return Claims(frozenset(e.name for e in state.eips))

    def on_change(self, callback: Callable[[], None]) -> None:
        pass

    def member_address(self) -> IPv4Address | None:
        return None
