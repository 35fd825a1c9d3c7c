"""`natgwd import` of Kube-OVN's BGP speaker: VpcNatGateway.spec.bgpSpeaker becomes the
state's `bgp` section, and an EIP annotated ovn.kubernetes.io/bgp=true is marked
(`bgp: true`) for it, as kube-ovn-speaker announces only those (`announce: "marked"`).

Kube-OVN gives every neighbour the one remoteAsn, holdTime, password and graceful-restart
flag; its speaker has no BFD, so none is set (the field to add is named in a note). A
section natgwd's validation refuses is left out with the reasons; the rest of the state
is not affected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from natgwd.kubeovn.importer.objects import Obj, annotations_of, section_of
from natgwd.kubeovn.importer.qos import Report
from natgwd.state.validation import InvalidStateError, load_state

ANNOTATION = "ovn.kubernetes.io/bgp"
# Go's time.Duration text, as metav1.Duration prints it ("1m30s", "90s", "1.5m").
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|m|s|ms|us|µs|ns)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def duration_seconds(text: str) -> float | None:
    """Seconds of a Go duration ("90s", "1m30s"), or None when it is not one."""
    text = text.strip()
    if not text or _DURATION.sub("", text):
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION.findall(text))


def bgp_section(speaker: dict[str, Any], gateway: Obj, report: Report) -> dict[str, Any] | None:
    """The state's `bgp` section for an enabled bgpSpeaker (values as they are: validation
    judges them), or None when there is nothing to carry."""
    neighbors = [str(n) for n in speaker.get("neighbors") or [] if str(n).strip()]
    if not neighbors:
        report("warning", gateway, "bgpSpeaker is enabled but names no neighbors; no bgp section")
        return None
    common: dict[str, Any] = {"remoteAsn": speaker.get("remoteAsn")}
    hold = speaker.get("holdTime")
    if hold not in (None, ""):
        seconds = duration_seconds(str(hold))
        if seconds is None or seconds != int(seconds):
            report("warning", gateway, f"bgpSpeaker.holdTime {hold!r} is not whole seconds; the default (90 s) is used")
        else:
            common["holdTime"] = int(seconds)
    if speaker.get("password"):
        common["password"] = str(speaker["password"])
    if speaker.get("enableGracefulRestart"):
        common["gracefulRestart"] = True
    section: dict[str, Any] = {
        "asn": speaker.get("asn"),
        "announce": "marked",
        "neighbors": [{"address": n.strip(), **common} for n in neighbors],
    }
    if speaker.get("routerId"):
        section["routerId"] = str(speaker["routerId"])
    if speaker.get("extraArgs"):
        report("warning", gateway, f"bgpSpeaker.extraArgs {speaker['extraArgs']} are GoBGP's; not carried over")
    report(
        "note", gateway, "BGP without BFD, as Kube-OVN's speaker; add bgp.neighbors[].bfd for fast failure detection"
    )
    return section


def carry_bgp(state: dict[str, Any], gateway: Obj, eip_sources: Mapping[str, Obj], report: Report) -> None:
    """Add the gateway's BGP speaker and the EIPs' marks to `state` (in place), unless
    natgwd's validation refuses the section."""
    speaker = section_of(gateway, "spec").get("bgpSpeaker")
    if not isinstance(speaker, dict) or not speaker.get("enabled"):
        return
    section = bgp_section(speaker, gateway, report)
    if section is None:
        return
    candidate: dict[str, Any] = json.loads(json.dumps(state))
    candidate["bgp"] = section
    marked = []
    for entry in candidate.get("eips", []):
        source = eip_sources.get(entry["name"])
        if source is not None and str(annotations_of(source).get(ANNOTATION, "")).lower() == "true":
            entry["bgp"] = True
            marked.append(entry["name"])
    try:
        load_state(json.dumps(candidate).encode())
    except InvalidStateError as err:
        reasons = "; ".join(str(p) for p in err.problems if p.path.startswith("$.bgp"))
        report("warning", gateway, f"natgwd refuses the BGP speaker: {reasons or err}; no bgp section")
        return
    if not marked:
        report("note", gateway, f"no EIP carries {ANNOTATION}=true: nothing is announced until one does")
    state.clear()
    state.update(candidate)
