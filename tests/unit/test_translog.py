"""natgwd.observability.translog: translation log lines, selection and rate cap; the endings
natgwd caused (natgwd.observability.endings)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

from natgwd.observability.ctevents import CtEvent, CtTuple, Traffic
from natgwd.observability.endings import Endings
from natgwd.observability.translog import RateCap, Selection, TransLog, line
from natgwd.planning.plan import RuleLabels

SNAT = RuleLabels("snat", "my-snat", "10.115.55.200")
DNAT = RuleLabels("dnat", "dnat01", "10.115.55.200")
WHEN = datetime(2026, 11, 30, 3, 0, tzinfo=UTC).isoformat()


def snat_event(kind: str = "new") -> CtEvent:
    return CtEvent(
        kind,  # type: ignore[arg-type]
        7,
        1,
        CtTuple(17, "172.20.10.2", 40001, "10.115.55.254", 53),
        CtTuple(17, "10.115.55.254", 53, "10.115.55.200", 61234),
        counters_orig=Traffic(1, 33),
        counters_reply=Traffic(1, 45),
    )


def test_snat_start_line_has_gcp_fields() -> None:
    logged = json.loads(line(snat_event(), SNAT, WHEN))
    assert logged["connection"] == {
        "src_ip": "172.20.10.2",
        "src_port": 40001,
        "dest_ip": "10.115.55.254",
        "dest_port": 53,
        "protocol": 17,
        "nat_ip": "10.115.55.200",
        "nat_port": 61234,
    }
    assert logged["translated"]["src_ip"] == "10.115.55.200" and logged["translated"]["dest_port"] == 53
    assert (logged["event"], logged["rule"], logged["eip"]) == ("start", {"kind": "snat", "name": "my-snat"}, SNAT.eip)
    assert "bytes_sent" not in logged


def test_dnat_end_line_names_the_new_destination_and_counts() -> None:
    event = CtEvent(
        "destroy",
        8,
        2,
        CtTuple(6, "10.115.55.254", 50000, "10.115.55.200", 8888),
        CtTuple(6, "172.20.10.2", 80, "10.115.55.254", 50000),
        counters_orig=Traffic(6, 400),
        counters_reply=Traffic(4, 300),
    )
    logged = json.loads(line(event, DNAT, WHEN))
    assert (logged["connection"]["nat_ip"], logged["connection"]["nat_port"]) == ("172.20.10.2", 80)
    assert logged["translated"] == {
        "src_ip": "10.115.55.254",
        "src_port": 50000,
        "dest_ip": "172.20.10.2",
        "dest_port": 80,
        "protocol": 6,
    }
    assert (logged["packets_sent"], logged["bytes_sent"], logged["packets_received"], logged["bytes_received"]) == (
        6,
        400,
        4,
        300,
    )


def test_selection() -> None:
    assert Selection().wants(SNAT)
    assert Selection(rules=frozenset({"snat/my-snat"})).wants(SNAT)
    assert not Selection(rules=frozenset({"snat/my-snat"})).wants(DNAT)
    assert Selection(eips=frozenset({"10.115.55.200"})).wants(DNAT)
    assert not Selection(eips=frozenset({"10.115.55.201"})).wants(DNAT)


def test_rate_cap_drops_and_counts_lines_over_the_rate() -> None:
    now = [100.0]
    out = io.StringIO()
    log = TransLog(out, Selection(rules=frozenset({"snat/my-snat"})), rate=3, clock=lambda: now[0])
    dnat_event = CtEvent("new", 9, 2, CtTuple(6, "a", 1, "b", 2), CtTuple(6, "c", 3, "d", 4))
    log.write([snat_event()] * 5 + [dnat_event], {1: SNAT, 2: DNAT})
    assert (log.written, log.dropped) == (3, 2)  # the DNAT line was not selected
    now[0] += 0.5  # one and a half tokens back
    log.write([snat_event("destroy")] * 2, {1: SNAT})
    assert (log.written, log.dropped) == (4, 3)
    lines = [json.loads(text) for text in out.getvalue().splitlines()]
    assert [logged["event"] for logged in lines] == ["start", "start", "start", "end"]
    assert "natgwd_translation_log_dropped_lines_total 3" in log.exposition()


def test_rate_cap_refills_to_at_most_one_second() -> None:
    now = [0.0]
    cap = RateCap(2, clock=lambda: now[0])
    now[0] = 60.0
    assert [cap.allow() for _ in range(3)] == [True, True, False]


def test_an_end_natgwd_caused_says_why_once() -> None:
    out = io.StringIO()
    endings = Endings()
    log = TransLog(out, Selection(), rate=100, endings=endings)
    ended = CtEvent(
        "destroy",
        8,
        2,
        CtTuple(6, "10.115.55.254", 50000, "10.115.55.200", 8888),
        CtTuple(6, "172.20.10.2", 80, "10.115.55.254", 50000),
    )
    endings.ending(8, "dnat")
    endings.ending(9, "removed")
    removed = CtEvent("destroy", 9, 7, ended.orig, ended.reply)
    log.write([ended, removed, ended], {2: DNAT, 7: RuleLabels("dnat", "gone", "10.115.55.200")})
    lines = [json.loads(text) for text in out.getvalue().splitlines()]
    assert [logged.get("end_reason") for logged in lines] == ["rule_changed", "rule_removed", None]
    assert endings.take(8) is None  # each record serves one event


def test_endings_are_bounded() -> None:
    endings = Endings(limit=2)
    for conntrack_id in (1, 2, 3):
        endings.ending(conntrack_id, "snat")
    assert [endings.take(conntrack_id) for conntrack_id in (1, 2, 3)] == [None, "snat", "snat"]
