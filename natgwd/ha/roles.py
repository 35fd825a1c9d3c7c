"""The words of an HA member: keepalived's roles as its notify FIFO tells them, its event
for a healed split brain, and the names of the children natgwd supervises."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """A VRRP role, lower case as natgwd exports and sends it to the peer."""

    INIT = "init"  # natgwd's own: keepalived has told no role yet, or exited
    MASTER = "master"  # holds the addresses
    BACKUP = "backup"
    FAULT = "fault"
    STOP = "stop"


class Event(StrEnum):
    # keepalived's event for an active member that hears a lower priority: another member
    # was active too (a healed split brain). This one stays active and announces its
    # addresses again (garp_lower_prio_repeat in keepalived.conf).
    HEALED = "master_rx_lower_pri"


KEEPALIVED = "keepalived"
CONNTRACKD = "conntrackd"
CHILDREN = (KEEPALIVED, CONNTRACKD)
