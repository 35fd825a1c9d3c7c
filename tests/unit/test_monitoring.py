"""monitoring/: the alert rules pass their promtool unit tests, and the dashboard and the
rules only use metrics natgwd exports (from every exporter, built here with sample data,
HA's and QoS's included); promtool accepts that exposition."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from natgwd.bgp.metrics import BgpCollector
from natgwd.bgp.speaker import Snapshot
from natgwd.bgp.status import NeighborStatus
from natgwd.ha.metrics import HaCollector, HaMetrics, HaSnapshot, parse_stats
from natgwd.ha.scale_metrics import ScaleMetrics
from natgwd.observability.connwatch import ConnectionWatch
from natgwd.observability.ctstats import STAT_FAMILIES, Pressure
from natgwd.observability.ctstats import exposition as pressure_exposition
from natgwd.observability.translog import Selection, TransLog
from natgwd.planning.counters import Listings
from natgwd.planning.handover import HANDED_OVER
from natgwd.planning.layout import INVALID_DROPS, RULE_CONNECTIONS, RULE_TRAFFIC
from natgwd.planning.portblocks import PORT_BLOCK_ATTEMPTS
from natgwd.process.supervisor import ChildStatus
from natgwd.qos.status import QosStatus
from natgwd.qos.status import exposition as qos_exposition
from natgwd.runtime.metrics import DaemonMetrics, RuleCounters
from tests.unit.test_ha import QUEUES, STATS

MONITORING = Path(__file__).parents[2] / "monitoring"
ALERTS = MONITORING / "natgwd-alerts.yml"
DASHBOARD = MONITORING / "natgwd-dashboard.json"

LISTINGS: Listings = {
    RULE_CONNECTIONS: [("0x00000001", "3", "0", "snat/my-snat/10.115.55.200")],
    RULE_TRAFFIC: [("original . 0x00000001", "5", "300", ""), ("reply . 0x00000001", "4", "200", "")],
    INVALID_DROPS: [('"net2"', "1", "40", "")],
    HANDED_OVER: [("0x000010cc", "9", "900", "")],
    PORT_BLOCK_ATTEMPTS: [("0x00000001 . 172.20.10.2", "3", "0", "")],
}
QOS_CLASS = QosStatus("egress", "eip", "my-eip", "10.115.55.200", 10_000_000, 3000, 2, 0, 1, 0)
# An HA member's collector, given `conntrackd -s` with every figure it reads.
CONNTRACKD_STATS = parse_stats(STATS, QUEUES)


BGP_SNAPSHOT = Snapshot(
    children={"zebra": ChildStatus(up=True), "bfdd": ChildStatus(up=True), "bgpd": ChildStatus(up=True)},
    configured=("10.115.55.254",),
    neighbors={"10.115.55.254": NeighborStatus("10.115.55.254", "Established", 2, 0, 1.7e9, None, "up")},
    owned=frozenset(),
    standby=frozenset(),
    originated=frozenset(),
    families={"10.115.55.254": 4},
)


def exposition() -> str:
    registry = CollectorRegistry()
    DaemonMetrics(registry)
    HaMetrics(registry, lambda: True)  # an HA member: its role figures are exported
    registry.register(HaCollector(lambda: HaSnapshot({}, True, True, CONNTRACKD_STATS)))
    registry.register(BgpCollector(lambda: BGP_SNAPSHOT))
    scale = ScaleMetrics(registry, lambda: True)  # a scaled-out member's
    scale.members_seen.set(2)
    scale.group_owned.labels("g0").set(1)
    watch = ConnectionWatch(lambda: LISTINGS, dict, TransLog(io.StringIO(), Selection(), 10))
    return b"".join(
        (
            generate_latest(registry),
            RuleCounters(lambda: LISTINGS).exposition(),
            pressure_exposition(Pressure(5, 262144, dict.fromkeys(STAT_FAMILIES, 0))),
            watch.exposition(LISTINGS),
            qos_exposition([QOS_CLASS], "fq_codel"),
        )
    ).decode()


def exported_names() -> set[str]:
    """Every sample's name, and every family's: a labelled family with no sample yet
    (gratuitous ARP frames of an interface before the first one) is exported all the same."""
    names = set()
    for line in exposition().splitlines():
        if family := re.fullmatch(r"# TYPE (\S+) (\S+)", line):
            name, kind = family.groups()
            names.add(name)
            if kind == "counter":
                names.add(name.removesuffix("_total") + "_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def referenced(expr: str) -> set[str]:
    return set(re.findall(r"\bnatgwd_[a-zA-Z0-9_]+", expr))


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("needs promtool (Debian package prometheus)")
    return found


def test_alert_rules_pass_their_unit_tests() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", "natgwd-alerts.test.yml"], cwd=MONITORING, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_prometheusrule_holds_the_tested_alert_rules() -> None:
    """The operator's PrometheusRule (beside the PodMonitor) carries the very groups that
    promtool tests here: an alert changed in one place only fails."""
    rule = yaml.safe_load((Path(__file__).parents[2] / "image" / "kubernetes" / "prometheusrule.yaml").read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_promtool_accepts_the_exposition() -> None:
    text = exposition()
    result = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_alert_rules_use_exported_metrics() -> None:
    exported = exported_names()
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    assert len({rule["alert"] for rule in rules}) == len(rules) == 17
    for rule in rules:
        names = referenced(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported, f"{rule['alert']}: {sorted(names - exported)} not exported"


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found += panel.get("panels", [])
    return found


def test_dashboard_panels_query_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_names()
    graphs = [panel for panel in panels(dashboard) if panel["type"] != "row"]
    assert len(graphs) >= 15
    assert len({panel["id"] for panel in panels(dashboard)}) == len(panels(dashboard))
    used: set[str] = set()
    for panel in graphs:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = referenced(target["expr"])
            assert names, f"{panel['title']}: {target['expr']}"
            assert names <= exported, f"{panel['title']}: {sorted(names - exported)} not exported"
            used |= names
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]
    # The figures the issue asks for are all on the dashboard.
    assert {
        "natgwd_rule_bytes_total",
        "natgwd_eip_open_connections",
        "natgwd_eip_max_ports_per_destination",
        "natgwd_eip_port_allocation_failures_total",
        "natgwd_conntrack_entries_limit",
        "natgwd_reconciles_total",
    } <= used
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "gateway", "instance"]
    # "All" matches any value and none: a Prometheus that scrapes without these labels.
    assert all(variables[name]["allValue"] == ".*" for name in ("namespace", "gateway", "instance"))
    # Every series the panels read is filtered by the three (vpc_nat_gw: the PodMonitor's label).
    selector = '{namespace=~"$namespace", vpc_nat_gw=~"$gateway", instance=~"$instance"}'
    for panel in graphs:
        for target in panel["targets"]:
            series = re.findall(r"\bnatgwd_[a-z0-9_]+(\{[^}]*\})?", target["expr"])
            assert series and all(labels == selector for labels in series), target["expr"]
