"""keepalived.conf and conntrackd.conf for one member of a scaled-out group (pure text).

One VRRPv3 instance per EIP group, named by the group (`g0`, `g1`...), each with this
member's priority for the group; a member whose priority is 0 runs no instance for it and
never owns it. Every instance advertises to every other member, so that each member hears
who owns each group (natgwd.ha.adverts) and knows where to hand its packets.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Interface

from natgwd.ha.hello import HELLO_GROUP
from natgwd.ha.render import HaPaths, conntrackd_general
from natgwd.state.ha import CONNTRACKD_PORT
from natgwd.state.scaleout import EipGroup, ScaleOutConfig

INSTANCE_PREFIX = "g"


def instance_name(group: EipGroup) -> str:
    return f"{INSTANCE_PREFIX}{group.index}"


def marker_address(group: EipGroup) -> IPv4Address:
    """The address a group's adverts carry: 169.254.0.VRID, link-local, held by the owner."""
    return IPv4Address(f"169.254.0.{group.virtual_router_id}")


def group_of_instance(name: str) -> int | None:
    """The group index of an instance name natgwd wrote, else None."""
    digits = name.removeprefix(INSTANCE_PREFIX)
    return int(digits) if name.startswith(INSTANCE_PREFIX) and digits.isdigit() else None


def keepalived_conf(
    config: ScaleOutConfig,
    me: int,
    addresses: Mapping[int, tuple[IPv4Interface, ...]],
    external_interface: str,
    paths: HaPaths,
) -> str:
    """`addresses`: per group index, the addresses its owner holds on the external
    interface (its EIPs; group 0 also the gateway's own external addresses)."""
    source = config.members[me]
    peers = [address for index, address in enumerate(config.members) if index != me]
    lines = [
        "# Written by natgwd from the desired state; changes here are overwritten.",
        "global_defs {",
        f"    router_id natgwd-{source}",
        "    vrrp_version 3",
        f"    notify_fifo {paths.notify_fifo}",
        "    vrrp_garp_master_delay 1",
        "    vrrp_garp_master_repeat 3",
        "}",
        "",
    ]
    for group in config.groups:
        priority = group.priorities[me]
        if not priority:
            continue
        vips = [f"{a} dev {external_interface}" for a in addresses.get(group.index, ())]
        lines += [
            f"vrrp_instance {instance_name(group)} {{",
            "    state BACKUP",
            f"    interface {config.interface}",
            # The members' link going down must not fault every instance at once.
            "    dont_track_primary",
            f"    virtual_router_id {group.virtual_router_id}",
            f"    priority {priority}",
            f"    advert_int {config.advert_interval}",
            # A returning first choice takes its group back only after this delay, time
            # for conntrackd to bring it the group's connections (StartupResync).
            f"    preempt_delay {config.preempt_delay}",
            "    garp_lower_prio_repeat 3",
            f"    unicast_src_ip {source}",
            "    unicast_peer {",
            # A lone discovered member has no peer yet: without one keepalived would
            # advertise by multicast, to other gateways' members on the LAN too.
            *(f"        {peer}" for peer in peers or [IPv4Address("127.0.0.1")]),
            "    }",
            # VRRPv3 wants one address in the adverts even for a group without EIPs: a
            # link-local marker of the group on the members' link.
            "    virtual_ipaddress {",
            f"        {marker_address(group)}/32 dev {config.interface}",
            "    }",
            # Excluded: not listed in the adverts (whose size they would limit), moved all the same.
            *(["    virtual_ipaddress_excluded {", *(f"        {v}" for v in vips), "    }"] if vips else []),
            "}",
            "",
        ]
    return "\n".join(lines)


def conntrackd_conf(config: ScaleOutConfig, me: int, paths: HaPaths) -> str:
    """Two members: FTFW (reliable) over unicast UDP to the other one. More: multicast on
    the members' link, since a conntrackd UDP transport has one destination (its further
    UDP blocks are fail-over links, not more peers); and NOTRACK, because FTFW tracks one
    sequence of messages per link: with three senders on one group, each receiver took
    the others' interleaved sequence numbers for old messages and dropped them (measured
    here: a third of the connections never reached one member)."""
    source = config.members[me]
    # Discovered members: always multicast, so that members coming and going restart nothing.
    two = len(config.members) == 2 and config.discovery_scope is None
    if two:
        peer = config.members[1 - me]
        transport = [
            "    UDP {",
            f"        IPv4_address {source}",
            f"        IPv4_Destination_Address {peer}",
            f"        Port {CONNTRACKD_PORT}",
        ]
    else:
        transport = [
            "    Multicast {",
            f"        IPv4_address {config.multicast_group}",
            f"        Group {CONNTRACKD_PORT}",
            f"        IPv4_interface {source}",
        ]
    ignored: list[IPv4Address] = [IPv4Address("127.0.0.1"), *config.members]
    if config.discovery_scope is not None:
        # A configuration that names no other member; the traffic between members is
        # left out by its multicast groups (the other members leave out their own).
        ignored = [IPv4Address("127.0.0.1"), source, config.multicast_group, HELLO_GROUP]
    lines = [
        "# Written by natgwd from the desired state; changes here are overwritten.",
        "Sync {",
        f"    Mode {'FTFW' if two else 'NOTRACK'} {{",
        # Straight into the kernel: the member that takes a group over must find the
        # group's connections there the moment it holds the EIPs.
        "        DisableExternalCache on",
        "        StartupResync on",
        "    }",
        *transport,
        f"        Interface {config.interface}",
        "        SndSocketBuffer 1249280",
        "        RcvSocketBuffer 1249280",
        "        Checksum on",
        "    }",
        "}",
        "",
        *conntrackd_general(paths, ignored),
    ]
    return "\n".join(lines)
