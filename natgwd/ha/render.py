"""keepalived.conf and conntrackd.conf for one member of an HA pair (pure text)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from natgwd.state.ha import CONNTRACKD_PORT, HaConfig, HaMember

INSTANCE = "natgwd"


@dataclass(frozen=True)
class HaPaths:
    """Where the children keep their run-time files: one directory per gateway, so two
    gateways on one host (the tests) never share a lock, socket or pid file."""

    directory: Path

    @property
    def keepalived_conf(self) -> Path:
        return self.directory / "keepalived.conf"

    @property
    def keepalived_pid(self) -> Path:
        return self.directory / "keepalived.pid"

    @property
    def vrrp_pid(self) -> Path:
        return self.directory / "keepalived-vrrp.pid"

    @property
    def notify_fifo(self) -> Path:
        return self.directory / "keepalived.fifo"

    @property
    def conntrackd_conf(self) -> Path:
        return self.directory / "conntrackd.conf"

    @property
    def conntrackd_lock(self) -> Path:
        return self.directory / "conntrackd.lock"

    @property
    def conntrackd_socket(self) -> Path:
        return self.directory / "conntrackd.ctl"


def keepalived_conf(
    ha: HaConfig,
    me: HaMember,
    peer: HaMember,
    addresses: dict[str, tuple[IPv4Interface, ...]],
    paths: HaPaths,
    internal_interface: str,
) -> str:
    """One VRRPv3 instance over unicast (multicast may not cross a Multus network). The
    internal gateway address goes into the adverts; every other address is `excluded`
    (moved, but not listed in the adverts, whose size it would otherwise limit)."""
    advertised = [f"{a} dev {internal_interface}" for a in addresses.get(internal_interface, ())]
    excluded = [
        f"{a} dev {name}" for name, values in sorted(addresses.items()) if name != internal_interface for a in values
    ]
    lines = [
        "# Written by natgwd from the desired state; changes here are overwritten.",
        "global_defs {",
        f"    router_id natgwd-{ha.virtual_router_id}",
        "    vrrp_version 3",
        f"    notify_fifo {paths.notify_fifo}",
        # One burst at takeover is enough: natgwd sends its own announcements too.
        "    vrrp_garp_master_delay 1",
        "    vrrp_garp_master_repeat 3",
        "}",
        "",
        f"vrrp_instance {INSTANCE} {{",
        # Both start as BACKUP: the election, not the config, picks the active member,
        # and `nopreempt` is only allowed on a BACKUP.
        "    state BACKUP",
        f"    interface {ha.interface}",
        # The sync link going down must not fault the member: with both members faulted
        # nobody holds the addresses. (net1 and net2, the addresses' links, stay tracked.)
        "    dont_track_primary",
        f"    virtual_router_id {ha.virtual_router_id}",
        f"    priority {me.priority}",
        f"    advert_int {ha.advert_interval}",
        # Hearing a lower priority while active means two were active (a healed split
        # brain): announce again so that traffic comes back to the one that stays.
        "    garp_lower_prio_repeat 3",
        *([] if ha.preempt else ["    nopreempt"]),
        f"    unicast_src_ip {me.address}",
        "    unicast_peer {",
        f"        {peer.address}",
        "    }",
        *_block("virtual_ipaddress", advertised),
        *_block("virtual_ipaddress_excluded", excluded),
        "}",
        "",
    ]
    return "\n".join(lines)


def conntrackd_conf(ha: HaConfig, me: HaMember, peer: HaMember, paths: HaPaths) -> str:
    """FTFW (reliable: recovers from loss and reordering) over unicast UDP on the sync
    link. The members' own sync traffic is not replicated."""
    ignored = ["127.0.0.1", str(me.address), str(peer.address)]
    lines = [
        "# Written by natgwd from the desired state; changes here are overwritten.",
        "Sync {",
        "    Mode FTFW {",
        # Entries from the peer go straight into the kernel, not into a cache to commit at
        # takeover: packets that reach a new active member in the first milliseconds
        # (right after its gratuitous ARP) must find their connection there already, or a
        # SNAT flow gets a new random port and the far end resets it.
        "        DisableExternalCache on",
        # Ask the peer for its whole table on start: a restarted member is complete at once.
        "        StartupResync on",
        "    }",
        "    UDP {",
        f"        IPv4_address {me.address}",
        f"        IPv4_Destination_Address {peer.address}",
        f"        Port {CONNTRACKD_PORT}",
        f"        Interface {ha.interface}",
        "        SndSocketBuffer 1249280",
        "        RcvSocketBuffer 1249280",
        "        Checksum on",
        "    }",
        "}",
        "",
        *conntrackd_general(paths, ignored),
    ]
    return "\n".join(lines)


def conntrackd_general(paths: HaPaths, ignored: Iterable[IPv4Address | str]) -> list[str]:
    """conntrackd's General section, the same for the pair and for scale-out; the sync
    members' own traffic (`ignored`) is not replicated."""
    return [
        "General {",
        "    HashSize 32768",
        "    HashLimit 131072",
        # Logs go to stdout, which natgwd reads into its own log.
        "    LogFile off",
        "    Syslog off",
        f"    LockFile {paths.conntrackd_lock}",
        "    UNIX {",
        f"        Path {paths.conntrackd_socket}",
        "    }",
        "    NetlinkBufferSize 2097152",
        "    NetlinkBufferSizeMaxGrowth 8388608",
        # A lost event would be a connection missing on the peer: resync instead.
        "    NetlinkEventsReliable On",
        "    Filter From Userspace {",
        "        Protocol Accept {",
        "            TCP",
        "            UDP",
        "            ICMP",
        "        }",
        "        Address Ignore {",
        *(f"            IPv4_address {address}" for address in ignored),
        "        }",
        "    }",
        "}",
        "",
    ]


def _block(name: str, entries: list[str]) -> list[str]:
    if not entries:
        return []
    return [f"    {name} {{", *(f"        {entry}" for entry in entries), "    }"]
