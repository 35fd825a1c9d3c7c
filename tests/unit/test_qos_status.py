"""natgwd.qos.status: the kernel's per-class counters labelled from the desired state, as
Prometheus samples and as `natgwd status` rows."""

from __future__ import annotations

import json
from typing import Any

from natgwd.lab.topology import SEED_STATE
from natgwd.qos.plan import ClassKey, ClassStats
from natgwd.qos.status import QosStatus, exposition, format_table, qos_statuses, shaping_exposition
from natgwd.state.validation import load_state

EIP2 = "10.115.55.201"


def shaped_state() -> Any:
    doc: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    doc["qosPolicies"] = [
        {"name": "fip", "bandwidthLimitRules": [{"name": "in", "direction": "ingress", "rateMax": 8}]},
        {"name": "gw", "bandwidthLimitRules": [{"name": "all", "direction": "egress", "rateMax": 100}]},
    ]
    doc["eips"][1]["qosPolicy"] = "fip"
    doc["qosPolicy"] = "gw"
    return load_state(json.dumps(doc).encode())


STATS = [
    ClassStats("egress", ClassKey("default"), 1_250_000_000, 5, 1, 0, 0, 0),
    ClassStats("egress", ClassKey("nic"), 12_500_000, 300, 2, 1, 4, 60),
    ClassStats("ingress", ClassKey("eip", EIP2), 1_000_000, 1420, 10, 0, 3, 0),
]


def test_rows_are_labelled_from_the_state() -> None:
    assert qos_statuses(STATS, shaped_state()) == [
        QosStatus("ingress", "eip", "my-eip2", EIP2, 8_000_000, 1420, 10, 0, 3, 0),
        QosStatus("egress", "nic", "gw/all", "", 100_000_000, 300, 2, 1, 4, 60),
        QosStatus("egress", "default", "", "", 10_000_000_000, 5, 1, 0, 0, 0),
    ]
    # without a state (status with no applied record): the kernel's own view, unnamed
    assert [r.name for r in qos_statuses(STATS, None)] == ["", "", ""]


def test_exposition() -> None:
    text = exposition(qos_statuses(STATS[2:], shaped_state()), "default").decode()
    labels = f'direction="ingress",kind="eip",name="my-eip2",match="{EIP2}"'
    assert text.splitlines() == [
        "# HELP natgwd_qos_sent_bytes_total Bytes a QoS class sent (whole frames).",
        "# TYPE natgwd_qos_sent_bytes_total counter",
        f"natgwd_qos_sent_bytes_total{{{labels}}} 1420",
        "# HELP natgwd_qos_sent_packets_total Packets a QoS class sent.",
        "# TYPE natgwd_qos_sent_packets_total counter",
        f"natgwd_qos_sent_packets_total{{{labels}}} 10",
        "# HELP natgwd_qos_dropped_packets_total Packets a QoS class dropped (its queue was full).",
        "# TYPE natgwd_qos_dropped_packets_total counter",
        f"natgwd_qos_dropped_packets_total{{{labels}}} 0",
        "# HELP natgwd_qos_overlimits_total Times a QoS class delayed a packet to keep its rate.",
        "# TYPE natgwd_qos_overlimits_total counter",
        f"natgwd_qos_overlimits_total{{{labels}}} 3",
        "# HELP natgwd_qos_backlog_bytes Bytes queued in a QoS class now.",
        "# TYPE natgwd_qos_backlog_bytes gauge",
        f"natgwd_qos_backlog_bytes{{{labels}}} 0",
        "# HELP natgwd_qos_rate_limit_bytes_per_second The rate a QoS class is configured to (bytes per second).",
        "# TYPE natgwd_qos_rate_limit_bytes_per_second gauge",
        f"natgwd_qos_rate_limit_bytes_per_second{{{labels}}} 1000000",
        "# HELP natgwd_qos_leaf_qdisc_info The qdisc under each QoS class: fq_codel, or the kernel's default where "
        "it has no fq_codel.",
        "# TYPE natgwd_qos_leaf_qdisc_info gauge",
        'natgwd_qos_leaf_qdisc_info{kind="default"} 1',
    ]


class FailingShaper:
    leaf = None

    def stats(self, external: str) -> list[ClassStats]:
        raise OSError(1, "Operation not permitted")


def test_scrape_without_qos_or_with_an_unreadable_kernel_is_empty() -> None:
    assert shaping_exposition(None, shaped_state()) == b""
    assert shaping_exposition(FailingShaper(), shaped_state()) == b""


def test_status_table() -> None:
    table = format_table(qos_statuses(STATS[1:], shaped_state()))
    assert table.splitlines() == [
        "QOS  NAME     MATCH          DIRECTION  RATE     SENT BYTES  SENT PKTS  DROPS  OVERLIMITS  BACKLOG",
        "eip  my-eip2  10.115.55.201  ingress    8Mbit    1420        10         0      3           0",
        "nic  gw/all                  egress     100Mbit  300         2          1      4           60",
    ]
