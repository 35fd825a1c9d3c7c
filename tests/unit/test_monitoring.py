"""monitoring/: the alert rules pass their promtool unit tests, and the dashboard and the
rules only use metrics natgwd exports (from every exporter, built here with sample data);
promtool accepts that exposition."""

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

from natgwd.ha.scale_metrics import ScaleMetrics
from natgwd.observability.connwatch import ConnectionWatch
from natgwd.observability.ctstats import STAT_FAMILIES, Pressure
from natgwd.observability.ctstats import exposition as pressure_exposition
from natgwd.observability.translog import Selection, TransLog
from natgwd.planning.counters import Listings
from natgwd.planning.handover import HANDED_OVER
from natgwd.planning.plan import INVALID_DROPS, RULE_CONNECTIONS, RULE_TRAFFIC
from natgwd.runtime.metrics import DaemonMetrics, RuleCounters

MONITORING = Path(__file__).parents[2] / "monitoring"
ALERTS = MONITORING / "natgwd-alerts.yml"
DASHBOARD = MONITORING / "natgwd-dashboard.json"
# Exported by an HA member (natgwd's HA mode), not by the exporters built here.
HA_METRICS = {"natgwd_ha_role"}

LISTINGS: Listings = {
    RULE_CONNECTIONS: [("0x00000001", "3", "0", "snat/my-snat/10.115.55.200")],
    RULE_TRAFFIC: [("original . 0x00000001", "5", "300", ""), ("reply . 0x00000001", "4", "200", "")],
    INVALID_DROPS: [('"net2"', "1", "40", "")],
    HANDED_OVER: [("0x000010cc", "9", "900", "")],
}


def exposition() -> str:
    registry = CollectorRegistry()
    DaemonMetrics(registry)
    scale = ScaleMetrics(registry)  # a scaled-out member's
    scale.members_seen.set(2)
    scale.group_owned.labels("g0").set(1)
    watch = ConnectionWatch(lambda: LISTINGS, dict, TransLog(io.StringIO(), Selection(), 10))
    return b"".join(
        (
            generate_latest(registry),
            RuleCounters(lambda: LISTINGS).exposition(),
            pressure_exposition(Pressure(5, 262144, dict.fromkeys(STAT_FAMILIES, 0))),
            watch.exposition(LISTINGS),
        )
    ).decode()


def exported_names() -> set[str]:
    names = set()
    for line in exposition().splitlines():
        if line and not line.startswith("#"):
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


def test_promtool_accepts_the_exposition() -> None:
    text = exposition()
    result = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_alert_rules_use_exported_metrics() -> None:
    exported = exported_names() | HA_METRICS
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    assert len({rule["alert"] for rule in rules}) == len(rules) == 14
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
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert variables == {"datasource", "instance"}
