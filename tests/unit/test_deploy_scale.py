"""The scaled-out gateway's deployment files (image/kubernetes/scale): the replicas, their
addresses and the state's members agree, and the pod is what the lab ran."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from natgwd.cli import parser
from natgwd.state.validation import load_state

yaml = pytest.importorskip("yaml", reason="needs PyYAML to read the Kubernetes manifests")

SCALE = Path(__file__).resolve().parents[2] / "image" / "kubernetes" / "scale"


def document(name: str) -> dict[str, Any]:
    (found,) = [d for d in yaml.safe_load_all((SCALE / name).read_text()) if d]
    return found  # type: ignore[no-any-return]


def test_replicas_addresses_and_members_agree() -> None:
    deployment = document("deployment.yaml")
    state = load_state(document("configmap.yaml")["data"]["state.json"].encode())
    assert deployment["kind"] == "Deployment" and state.scale_out is not None
    template = deployment["spec"]["template"]
    pool = template["metadata"]["annotations"]["internalvswitch.default.ovn.kubernetes.io/ip_pool"]
    assert [IPv4Address(a) for a in pool.split(",")] == list(state.scale_out.members)
    assert deployment["spec"]["replicas"] == len(state.scale_out.members)
    assert state.scale_out.interface == state.internal.interface == "net1"
    # One replica replaced at a time, never two on one node.
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    (term,) = template["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"


def test_the_pod_runs_natgwd_as_the_lab_did() -> None:
    pod = document("deployment.yaml")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    args = parser().parse_args([*container["command"][1:], *container["args"]])
    assert (args.state, args.ha_run_dir) == ("/etc/natgwd/state.json", "/run/natgwd")
    assert {"name": "net.netfilter.nf_conntrack_tcp_be_liberal", "value": "1"} in pod["securityContext"]["sysctls"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/natgwd"]["name"] == "state" and not mounts["/run/natgwd"].get("readOnly", False)
    assert json.loads(document("configmap.yaml")["data"]["state.json"])["version"] == 1
