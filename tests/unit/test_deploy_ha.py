"""The HA pair's deployment files (image/kubernetes/ha) and the image recipes carrying
keepalived and conntrackd: what the integration tests proved must be what is deployed."""

from __future__ import annotations

import json
import re
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from natgwd.cli import parser
from natgwd.state.validation import load_state

yaml = pytest.importorskip("yaml", reason="needs PyYAML to read the Kubernetes manifests")

ROOT = Path(__file__).resolve().parents[2]
HA = ROOT / "image" / "kubernetes" / "ha"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((HA / name).read_text()) if d]


@pytest.fixture(scope="module")
def statefulset() -> dict[str, Any]:
    (found,) = documents("statefulset.yaml")
    assert found["kind"] == "StatefulSet"
    return found


@pytest.fixture(scope="module")
def pod(statefulset: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = statefulset["spec"]["template"]["spec"]
    return spec


def test_two_replicas_never_on_one_node(statefulset: dict[str, Any], pod: dict[str, Any]) -> None:
    assert statefulset["spec"]["replicas"] == 2
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()


def test_minimal_capabilities_and_liberal_tcp(pod: dict[str, Any]) -> None:
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert {"name": "net.netfilter.nf_conntrack_tcp_be_liberal", "value": "1"} in pod["securityContext"]["sysctls"]


def test_run_directory_is_writable_and_passed(pod: dict[str, Any]) -> None:
    (container,) = pod["containers"]
    args = parser().parse_args([*container["command"][1:], *container["args"]])
    assert args.ha_run_dir == "/run/natgwd"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert not mounts["/run/natgwd"].get("readOnly", False)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_sync_network_addresses_are_the_members(statefulset: dict[str, Any]) -> None:
    annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert "kube-system/syncvswitch" in annotations["k8s.v1.cni.cncf.io/networks"]
    pool = [IPv4Address(a) for a in annotations["syncvswitch.kube-system.ovn.kubernetes.io/ip_pool"].split(",")]
    (configmap,) = documents("configmap.yaml")
    state = load_state(configmap["data"]["state.json"].encode())
    assert state.ha is not None
    assert [m.address for m in state.ha.members] == pool
    assert state.ha.interface == "net3"  # the third attachment
    subnet = next(d for d in documents("sync-network.yaml") if d["kind"] == "Subnet")
    assert all(a in IPv4Network(subnet["spec"]["cidrBlock"]) for a in pool)


def test_state_is_the_seed_plus_ha() -> None:
    (configmap,) = documents("configmap.yaml")
    single = yaml.safe_load((ROOT / "image" / "kubernetes" / "configmap.yaml").read_text())
    pair = json.loads(configmap["data"]["state.json"])
    assert {k: v for k, v in pair.items() if k != "ha"} == json.loads(single["data"]["state.json"])


def test_both_image_recipes_carry_keepalived_and_conntrackd() -> None:
    containerfile = (ROOT / "image" / "Containerfile").read_text()
    runtime = containerfile[containerfile.rindex("FROM ") :]
    assert re.search(r"install -y --no-install-recommends \\\n\s+.*\bkeepalived conntrackd\b", runtime)
    script = (ROOT / "image" / "build-offline.sh").read_text()
    packages = re.search(r"^PACKAGES=(\S+)$", script, re.M)
    assert packages is not None
    assert {"keepalived", "conntrackd"} <= set(packages.group(1).split(","))
