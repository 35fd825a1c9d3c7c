"""natgwd.kubeovn.importer (`natgwd import`): Kube-OVN objects as kubectl prints them -> the desired
state of one gateway, with everything not carried over reported.

The seed's objects are transcribed verbatim in tests/data/kubeovn-seed (including the seed
document's own naming drift between the Subnets/NADs and the pod's annotations)."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from natgwd.kubeovn import importer as kubeovn
from natgwd.kubeovn.importer import (
    Finding,
    ImportFailedError,
    ImportOptions,
    import_objects,
    parse_documents,
    read_inputs,
)
from natgwd.lab.topology import SEED_STATE
from natgwd.state.validation import load_state

SEED_DIR = Path(__file__).resolve().parents[1] / "data" / "kubeovn-seed"
POD = "pod-vpc-nat-gw-gw1-0.yaml"
STATEFULSET = "statefulset-vpc-nat-gw-gw1.yaml"


def seed_objects(*leave_out: str) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for path in sorted(SEED_DIR.glob("*.yaml")):
        if path.name not in leave_out:
            objects.extend(yaml.safe_load_all(path.read_text()))
    return objects


def expected_seed_state() -> dict[str, Any]:
    """SEED_STATE without its floating IP part (the seed document has no FIP and no second
    EIP): internal net1 172.20.10.254/24 with the route to 10.55.0.0/16, external net2
    10.115.48.1/21 via 10.115.55.254, my-eip, my-snat, dnat01."""
    expected = copy.deepcopy(SEED_STATE)
    expected["eips"] = [e for e in expected["eips"] if e["name"] == "my-eip"]
    del expected["fip"]
    return expected


def reasons(findings: list[Finding], kind: str, name: str) -> list[str]:
    return [f"{f.severity}: {f.reason}" for f in findings if f.kind == kind and f.name == name]


# --- the seed -------------------------------------------------------------------------


def test_the_seed_gives_the_seed_state() -> None:
    result = import_objects(seed_objects(), ImportOptions(gateway="gw1"))
    # The pod's routes annotation also lists 10.115.48.0/21 via 172.20.10.1 (the controller
    # routes "the other VPC subnets" through the VPC router, and subnetexternal says vpc:
    # custom-vpc). That is the external subnet itself: net2 is connected to it, and the
    # seed's `ip route` in the pod shows only `10.115.48.0/21 dev net2 proto kernel` (the CNI
    # could not add the route over the connected one). Decision: a route inside an external
    # subnet is left out, with a warning, so natgwd never fights the connected route (and
    # EIP traffic never goes into the VPC).
    assert result.state == expected_seed_state()
    load_state(json.dumps(result.state).encode())
    pod = "kube-system/vpc-nat-gw-gw1-0"
    assert [str(f) for f in result.warnings] == [
        f"warning: Pod/{pod}: route 10.115.48.0/21 via 172.20.10.1: inside the external subnet 10.115.48.0/21, "
        "which the external interface reaches directly; skipped (the kernel keeps the connected route there)"
    ]
    # The document's naming drift (vswitchinternal vs internalvswitch) is noted, not fatal:
    # the pod's annotations are matched to the Subnets by CIDR and address.
    assert reasons(result.findings, "Pod", pod)[:2] == [
        "note: no annotations for Subnet subnetinternal's provider vswitchinternal.default.ovn; used those of "
        "provider internalvswitch.default.ovn, which match its cidr 172.20.10.0/24 and address 172.20.10.254",
        "note: no annotations for Subnet subnetexternal's provider vswitchexternal.kube-system.ovn; used those of "
        "provider externalvswitch.kube-system.ovn, which match its cidr 10.115.48.0/21 and address 10.115.48.1 "
        "and default route via 10.115.55.254",
    ]
    notes = {(f.kind, f.name): f.reason for f in result.findings if f.severity == "note"}
    assert notes[("StatefulSet", "kube-system/vpc-nat-gw-gw1")] == f"{pod} was used instead"
    for context in (
        ("Vpc", "custom-vpc"),
        ("NetworkAttachmentDefinition", "default/vswitchinternal"),
        ("NetworkAttachmentDefinition", "kube-system/vswitchexternal"),
    ):
        assert notes[context] == "not needed for this gateway's state; ignored"
    # Every object of the input is either used or reported.
    assert len(result.findings) == 7


def test_the_seed_without_the_pod_uses_the_statefulset_template() -> None:
    result = import_objects(seed_objects(POD), ImportOptions(external_address="10.115.48.1"))
    assert result.state == expected_seed_state()
    assert reasons(result.findings, "StatefulSet", "kube-system/vpc-nat-gw-gw1")[-1].startswith(
        "warning: route 10.115.48.0/21 via 172.20.10.1: inside the external subnet"
    )


def test_without_any_workload_the_routes_come_from_the_vpc_and_spec_routes() -> None:
    objects = seed_objects(POD, STATEFULSET)
    gw = next(o for o in objects if o["kind"] == "VpcNatGateway")
    gw["spec"]["routes"] = [{"cidr": "10.55.0.0/16", "nextHopIP": "gateway"}]
    objects.append(
        {
            "apiVersion": "kubeovn.io/v1",
            "kind": "Subnet",
            "metadata": {"name": "subnet2"},
            "spec": {"cidrBlock": "10.56.0.0/16", "gateway": "10.56.0.1", "vpc": "custom-vpc"},
        }
    )
    result = import_objects(objects, ImportOptions(external_address="10.115.48.1/21"))
    assert result.state["internal"]["routes"] == [
        {"dst": "10.56.0.0/16", "via": "172.20.10.1"},
        {"dst": "10.55.0.0/16", "via": "172.20.10.1"},
    ]
    assert result.state["external"] == {
        "interface": "net2",
        "addresses": ["10.115.48.1/21"],
        "gateway": "10.115.55.254",
    }


def test_without_an_external_address_the_eips_get_host_prefixes_and_it_is_said() -> None:
    result = import_objects(seed_objects(POD, STATEFULSET))
    assert result.state["external"]["addresses"] == []
    assert any("the external address is unknown" in f.reason for f in result.warnings)


def test_interface_options_override_network_status_with_a_warning() -> None:
    result = import_objects(seed_objects(), ImportOptions(internal_interface="vpc0", external_interface="net2"))
    assert result.state["internal"]["interface"] == "vpc0"
    assert "warning: network-status puts the internal side on net1; using vpc0" in reasons(
        result.findings, "Pod", "kube-system/vpc-nat-gw-gw1-0"
    )


# --- input formats --------------------------------------------------------------------


def test_kubectl_json_list_yaml_stream_and_single_object_all_read() -> None:
    objects = seed_objects()
    as_list = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects, "metadata": {}}, indent=4)
    as_stream = yaml.safe_dump_all(objects)
    nested = {"kind": "IptablesEIPList", "items": [o for o in objects if o["kind"] == "IptablesEIP"]}
    for text in (as_list, as_stream):
        parsed, problems = parse_documents(text)
        assert problems == [] and len(parsed) == len(objects)
        assert import_objects(parsed).state == expected_seed_state()
    parsed, _ = parse_documents(json.dumps(nested))
    assert [o["metadata"]["name"] for o in parsed] == ["my-eip"]
    parsed, problems = parse_documents("---\n- 1\n---\nfoo: bar\n")
    assert parsed == [] and len(problems) == 2


def test_unreadable_input_is_an_error() -> None:
    with pytest.raises(ImportFailedError, match="neither JSON nor YAML"):
        parse_documents("a: [b\n", "x.yaml")


def test_two_kubectl_outputs_appended_without_a_separator_are_an_error() -> None:
    """YAML's "last key wins" would silently drop the first output's objects."""
    objects = seed_objects()
    first = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": objects[:5]})
    second = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": objects[5:]})
    with pytest.raises(ImportFailedError, match=r"key 'apiVersion' twice in one mapping .*'---'"):
        parse_documents(first + second, "gw.yaml")
    parsed, _ = parse_documents(first + "---\n" + second, "gw.yaml")
    assert parsed == objects


def test_a_directory_files_and_stdin(tmp_path: Path) -> None:
    objects, problems = read_inputs([str(SEED_DIR)], io.StringIO())
    assert len(objects) == 11 and problems == []
    (tmp_path / "all.json").write_text(json.dumps({"kind": "List", "items": objects}))
    again, _ = read_inputs([str(tmp_path / "all.json")], io.StringIO())
    assert again == objects
    piped, _ = read_inputs(["-"], io.StringIO(yaml.safe_dump_all(objects)))
    assert piped == objects


# --- what is carried over, and what is reported -------------------------------------------


def obj(kind: str, name: str, spec: dict[str, Any], created: str = "", **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if created:
        meta["creationTimestamp"] = created
    meta.update(extra.pop("metadata", {}))
    return {"apiVersion": "kubeovn.io/v1", "kind": kind, "metadata": meta, "spec": spec, **extra}


def eip(name: str, v4ip: str, gw: str = "gw1", metadata: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return obj("IptablesEIP", name, {"natGwDp": gw, "v4ip": v4ip, **spec}, metadata=metadata or {})


def dnat(name: str, eip_name: str, port: str, ip: str, internal: str, created: str = "", **spec: Any) -> dict[str, Any]:
    body = {"eip": eip_name, "externalPort": port, "internalIp": ip, "internalPort": internal, "protocol": "tcp"}
    return obj("IptablesDnatRule", name, {**body, **spec}, created)


def with_seed(*extra: dict[str, Any]) -> kubeovn.ImportResult:
    """The seed (created first, as kubectl would show it) plus `extra` objects."""
    seed = seed_objects(STATEFULSET)
    for item in seed:
        item["metadata"].setdefault("creationTimestamp", "2026-03-06T22:33:47Z")
    return import_objects([*seed, *extra], ImportOptions(gateway="gw1"))


def test_eips_from_status_other_gateways_ipv6_qos_and_missing_addresses() -> None:
    result = with_seed(
        obj("IptablesEIP", "from-status", {"natGwDp": "gw1", "v4ip": ""}, status={"ip": "10.115.55.201"}),
        eip("other", "10.115.55.210", gw="gw2"),
        obj("IptablesEIP", "v6-only", {"natGwDp": "gw1", "v6ip": "fd00::10"}),
        obj("IptablesEIP", "pending", {"natGwDp": "gw1"}),
        eip("limited", "10.115.55.202", qosPolicy="slow"),
        obj("IptablesEIP", "dup", {"natGwDp": "gw1", "v4ip": "10.115.55.200"}, "2026-03-08T00:00:00Z"),
        eip("going", "10.115.55.203", metadata={"deletionTimestamp": "2026-03-07T00:00:00Z"}),
    )
    assert result.state["eips"] == [
        {"name": "from-status", "v4ip": "10.115.55.201"},
        {"name": "limited", "v4ip": "10.115.55.202"},
        {"name": "my-eip", "v4ip": "10.115.55.200"},
        {"name": "v6-only", "v6ip": "fd00::10"},
    ]
    expect = {
        "other": "note: EIP of gateway gw2, not gw1",
        "pending": "warning: has no address yet; skipped",
        "limited": "warning: QoS policy slow is not in the input; no bandwidth limit carried over",
        "going": "warning: being deleted; skipped",
    }
    for name, reason in expect.items():
        assert reasons(result.findings, "IptablesEIP", name) == [reason]
    assert reasons(result.findings, "IptablesEIP", "dup")[0].startswith("warning: 10.115.55.200 is already EIP")


def test_rules_are_selected_by_their_eip() -> None:
    result = with_seed(
        eip("other", "10.115.55.210", gw="gw2"),
        obj("IptablesSnatRule", "theirs", {"eip": "other", "internalCIDR": "10.0.0.0/24"}),
        obj("IptablesSnatRule", "lost", {"eip": "nope", "internalCIDR": "172.20.10.0/25"}),
        obj("QoSPolicy", "slow", {"bindingType": "EIP"}),
        obj("OvnEip", "ovn1", {}),
        obj("Widget", "w", {}),
    )
    assert [s["name"] for s in result.state["snat"]] == ["my-snat"]
    assert reasons(result.findings, "IptablesSnatRule", "theirs") == ["note: uses EIP other of gateway gw2"]
    assert reasons(result.findings, "IptablesSnatRule", "lost") == [
        "warning: names EIP nope, which is not in the input; skipped"
    ]
    assert reasons(result.findings, "QoSPolicy", "slow") == ["note: not needed for this gateway's state; ignored"]
    assert reasons(result.findings, "OvnEip", "ovn1")[0].startswith("warning: OVN NAT")
    assert reasons(result.findings, "Widget", "w") == [
        "warning: kind Widget is not something natgwd import knows; ignored"
    ]


def test_a_kube_ovn_lb_service_is_a_note_other_services_a_warning() -> None:
    """A LoadBalancer Service of Kube-OVN's lb-svc is another pod's (lb-svc.sh), set up by
    the controller: nothing of it goes into a NAT gateway's state, and `--strict` passes."""
    annotations = {"ovn.kubernetes.io/attachmentprovider": "lb-svc-attachment.kube-system"}
    service = obj("Service", "web", {"type": "LoadBalancer"}, metadata={"namespace": "app", "annotations": annotations})
    plain = obj("Service", "db", {"type": "ClusterIP"}, metadata={"namespace": "app"})
    result = with_seed(service, plain)
    assert result.state == with_seed().state
    assert reasons(result.findings, "Service", "app/web") == [
        "note: a LoadBalancer Service served by its own lb-svc pod, which kube-ovn-controller sets up through "
        "lb-svc.sh whenever the pod starts; not part of a NAT gateway's state"
    ]
    assert reasons(result.findings, "Service", "app/db") == [
        "warning: kind Service is not something natgwd import knows; ignored"
    ]


def test_snat_cidrs_are_normalised_and_conflicts_resolved_in_creation_order() -> None:
    result = with_seed(
        eip("e2", "10.115.55.201"),
        obj("IptablesSnatRule", "host", {"eip": "e2", "internalCIDR": "172.20.10.3"}),
        obj("IptablesSnatRule", "bits", {"eip": "e2", "internalCIDR": "172.20.0.9/16"}),
        obj("IptablesSnatRule", "again", {"eip": "e2", "internalCIDR": "172.20.10.0/24"}, "2026-03-08T00:00:00Z"),
        obj("IptablesSnatRule", "v6", {"eip": "e2", "internalCIDR": "fd00::/64"}),
    )
    cidrs = {s["name"]: s["internalCIDR"] for s in result.state["snat"]}
    assert cidrs == {"bits": "172.20.0.0/16", "host": "172.20.10.3/32", "my-snat": "172.20.10.0/24"}
    assert reasons(result.findings, "IptablesSnatRule", "bits") == [
        "warning: internalCIDR 172.20.0.9/16 has host bits set; imported as 172.20.0.0/16"
    ]
    assert reasons(result.findings, "IptablesSnatRule", "again") == [
        "warning: 172.20.10.0/24 is already translated by my-snat; skipped"
    ]
    # e2 has no v6ip: an IPv6 rule on it is refused as mixing families.
    assert "fd00::/64 is IPv6 but EIP 'e2' has no v6ip" in reasons(result.findings, "IptablesSnatRule", "v6")[0]


def test_share_dnat_and_the_webhook_conflicts() -> None:
    early, late = "2026-03-07T00:00:00Z", "2026-03-08T00:00:00Z"
    result = with_seed(
        eip("lb", "10.115.55.202"),
        eip("fipped", "10.115.55.203"),
        dnat("web-a", "lb", "80", "172.20.10.2", "80", early, type="share"),
        dnat("web-b", "lb", "80", "172.20.10.3", "80", early, type="share"),
        dnat("web-x", "lb", "80", "172.20.10.4", "80", late),
        dnat("range-share", "lb", "90-99", "172.20.10.4", "90-99", type="share"),
        dnat("dup", "my-eip", "8888", "172.20.10.4", "80", late),
        dnat("udp", "my-eip", "8888", "172.20.10.4", "80", protocol="UDP"),
        obj("IptablesFIPRule", "fip1", {"eip": "fipped", "internalIp": "172.20.10.4"}, early),
        dnat("on-fip", "fipped", "22", "172.20.10.2", "22", late),
        obj("IptablesFIPRule", "fip2", {"eip": "fipped", "internalIp": "172.20.10.3"}, late),
        eip("e3", "10.115.55.204"),
        dnat("dnat-first", "e3", "22", "172.20.10.2", "22", early),
        obj("IptablesFIPRule", "fip-late", {"eip": "e3", "internalIp": "172.20.10.5"}, late),
    )
    # Every rule left out says so at the rule itself, not only in the summary's counts.
    kept = {rule["name"] for section in ("snat", "dnat", "fip") for rule in result.state.get(section, [])}
    for finding in result.findings:
        if finding.kind.startswith("Iptables") and finding.name not in kept:
            assert finding.reason.endswith("; skipped"), finding
    assert reasons(result.findings, "IptablesFIPRule", "fip-late") == ["warning: EIP e3 has DNAT dnat-first; skipped"]
    by_name = {d["name"]: d for d in result.state["dnat"]}
    assert sorted(by_name) == ["dnat-first", "dnat01", "udp", "web-a", "web-b"]
    assert by_name["web-a"]["type"] == by_name["web-b"]["type"] == "share"
    assert "type" not in by_name["dnat01"] and by_name["udp"]["protocol"] == "udp"
    assert result.state["fip"] == [{"name": "fip1", "eip": "fipped", "internalIp": "172.20.10.4"}]
    found = {name: reasons(result.findings, "IptablesDnatRule", name) for name in ("web-x", "range-share", "dup")}
    assert found == {
        "web-x": ["warning: tcp/80 on EIP lb is already taken by share DNAT web-a; skipped"],
        "range-share": ["warning: a share DNAT takes single ports, not ranges; skipped"],
        "dup": ["warning: tcp/8888 on EIP my-eip is already taken by exclusive DNAT dnat01; skipped"],
    }
    assert reasons(result.findings, "IptablesDnatRule", "on-fip") == ["warning: EIP fipped has FIP fip1; skipped"]
    assert reasons(result.findings, "IptablesFIPRule", "fip2") == ["warning: EIP fipped already has FIP fip1; skipped"]
    load_state(json.dumps(result.state).encode())


def test_what_natgwd_refuses_is_left_out_and_reported() -> None:
    result = with_seed(
        dnat("far", "my-eip", "2222", "192.168.50.5", "22"),
        dnat("bad-port", "my-eip", "http", "172.20.10.2", "80"),
        dnat("mismatch", "my-eip", "100-110", "172.20.10.2", "100-105"),
    )
    assert [d["name"] for d in result.state["dnat"]] == ["dnat01"]
    assert reasons(result.findings, "IptablesDnatRule", "far") == [
        "warning: natgwd refuses it: 192.168.50.5 is in no internal address's subnet and no internal route; skipped"
    ]
    assert reasons(result.findings, "IptablesDnatRule", "bad-port") == [
        "warning: externalPort 'http' is not a port or range; skipped"
    ]
    assert reasons(result.findings, "IptablesDnatRule", "mismatch")[0].startswith("warning: natgwd refuses it: range")


def test_long_and_dotted_names_become_labels() -> None:
    long_name = "a" * 70
    result = with_seed(
        eip("eip.with.dots", "10.115.55.201"),
        obj("IptablesSnatRule", long_name, {"eip": "eip.with.dots", "internalCIDR": "172.20.0.0/16"}),
    )
    eip_name = next(e["name"] for e in result.state["eips"] if e["v4ip"] == "10.115.55.201")
    assert eip_name.startswith("eip-with-dots-") and len(eip_name) <= 63
    snat = next(s for s in result.state["snat"] if s["internalCIDR"] == "172.20.0.0/16")
    assert snat["eip"] == eip_name and len(snat["name"]) <= 63 and snat["name"].startswith("aaaa")
    load_state(json.dumps(result.state).encode())


def test_gateway_choice() -> None:
    objects = [*seed_objects(), obj("VpcNatGateway", "gw2", {"subnet": "subnetinternal", "lanIp": "172.20.10.253"})]
    with pytest.raises(ImportFailedError, match=r"choose the gateway with --gateway .*gw1, gw2"):
        import_objects(objects)
    with pytest.raises(ImportFailedError, match="'gw3' is not in the input"):
        import_objects(objects, ImportOptions(gateway="gw3"))
    result = import_objects(objects, ImportOptions(gateway="gw1"))
    assert reasons(result.findings, "VpcNatGateway", "gw2") == ["note: another gateway (importing gw1)"]
    with pytest.raises(ImportFailedError, match=r"^the input holds no VpcNatGateway: give the gateway's object"):
        import_objects([o for o in objects if o["kind"] != "VpcNatGateway"])


def test_a_missing_internal_subnet_is_fatal_without_a_pod() -> None:
    objects = [o for o in seed_objects(POD, STATEFULSET) if o["metadata"]["name"] != "subnetinternal"]
    with pytest.raises(ImportFailedError, match="internal subnet's CIDR is unknown"):
        import_objects(objects)
    # With the pod, its cidr annotation says it.
    objects = [o for o in seed_objects(STATEFULSET) if o["metadata"]["name"] != "subnetinternal"]
    assert import_objects(objects).state["internal"]["addresses"] == ["172.20.10.254/24"]


# --- the command ----------------------------------------------------------------------


def test_main_writes_the_file_atomically(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "deep" / "state.json"
    assert kubeovn.main(["-g", "gw1", "-o", str(out), str(SEED_DIR)]) == 0
    assert json.loads(out.read_text()) == expected_seed_state()
    assert [p.name for p in out.parent.iterdir()] == ["state.json"]
    err = capsys.readouterr().err
    assert "natgwd import: warning: Pod/kube-system/vpc-nat-gw-gw1-0: route 10.115.48.0/21" in err
    assert f"gateway gw1: 1 eips, 1 snat, 1 dnat, 0 fip; 1 warnings; wrote {out}" in err


def test_main_to_stdout_strict_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert kubeovn.main(["-o", "-", str(SEED_DIR)]) == 0
    assert json.loads(capsys.readouterr().out) == expected_seed_state()
    out = tmp_path / "state.json"
    assert kubeovn.main(["--strict", "-o", str(out), str(SEED_DIR)]) == 2
    assert not out.exists()
    assert "nothing written (--strict)" in capsys.readouterr().err
    assert kubeovn.main([str(SEED_DIR / "vpc-custom-vpc.yaml")]) == 1
    assert capsys.readouterr().err == (
        "natgwd import: the input holds no VpcNatGateway: give the gateway's object too "
        "(kubectl get vpc-nat-gateway NAME -o yaml), with its EIPs and rules\n"
    )
    assert kubeovn.main([str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_qos_policies_of_the_eips_and_the_gateway_are_carried_over() -> None:
    objects = seed_objects(STATEFULSET)
    gateway = next(o for o in objects if o["kind"] == "VpcNatGateway")
    gateway["spec"]["qosPolicy"] = "gw-limits"
    for item in objects:
        if item["kind"] == "IptablesEIP":
            item["spec"]["qosPolicy"] = "eip-limit"
    in_rule = {"name": "In", "interface": "net2", "rateMax": "10", "burstMax": "1", "priority": 1}
    gw_rule = {"name": "to-vpc", "rateMax": "20", "direction": "egress", "matchType": "ip"}
    result = import_objects(
        [
            *objects,
            obj(
                "QoSPolicy",
                "eip-limit",
                {
                    "bindingType": "EIP",
                    "shared": True,
                    "bandwidthLimitRules": [
                        {**in_rule, "direction": "ingress"},
                        {"name": "out", "rateMax": "2.5", "direction": "egress", "matchValue": ""},
                    ],
                },
            ),
            obj(
                "QoSPolicy",
                "gw-limits",
                {
                    "bindingType": "NATGW",
                    "bandwidthLimitRules": [
                        {**gw_rule, "matchValue": "dst 10.0.0.0/24", "priority": 2},
                    ],
                },
            ),
            obj("QoSPolicy", "unrelated", {"bindingType": "EIP", "bandwidthLimitRules": []}),
        ],
        ImportOptions(gateway="gw1"),
    )
    state = result.state
    assert [e.get("qosPolicy") for e in state["eips"]] == ["eip-limit"]
    assert state["qosPolicy"] == "gw-limits"
    assert state["qosPolicies"] == [
        {
            "name": "eip-limit",
            "bandwidthLimitRules": [
                {**in_rule, "name": kubeovn.state_name("In"), "direction": "ingress"},
                {"name": "out", "rateMax": "2.5", "direction": "egress"},
            ],
            "bindingType": "EIP",
            "shared": True,
        },
        {
            "name": "gw-limits",
            "bandwidthLimitRules": [{**gw_rule, "matchValue": "dst 10.0.0.0/24", "priority": 2}],
            "bindingType": "NATGW",
        },
    ]
    assert load_state(json.dumps(state).encode()).qos_policies[0].rules[0].rate_bits == 10_000_000
    assert reasons(result.findings, "QoSPolicy", "unrelated") == ["note: not needed for this gateway's state; ignored"]
    assert not reasons(result.findings, "QoSPolicy", "eip-limit")


def test_a_qos_policy_natgwd_refuses_is_left_out_with_the_reason() -> None:
    result = with_seed(
        eip("limited", "10.115.55.202", qosPolicy="zero"),
        obj("QoSPolicy", "zero", {"bandwidthLimitRules": [{"name": "r", "rateMax": "0", "direction": "ingress"}]}),
    )
    assert "qosPolicies" not in result.state
    assert {"name": "limited", "v4ip": "10.115.55.202"} in result.state["eips"]
    assert reasons(result.findings, "QoSPolicy", "zero") == [
        "warning: natgwd refuses it: $.qosPolicies[0].bandwidthLimitRules[0].rateMax: is 0: a limit of nothing "
        "stops all traffic (unbind the policy to remove a limit); no bandwidth limit carried over"
    ]


# --- dual stack -----------------------------------------------------------------------


def _dual_stack_seed() -> list[dict[str, Any]]:
    """The seed's objects as a dual-stack gateway would show them: dual-stack Subnets and
    pod annotations ("v4,v6"), an IPv6 route to the VPC, EIPs with v6ip and IPv6 rules."""
    objects = seed_objects(STATEFULSET)
    for item in objects:
        item["metadata"].setdefault("creationTimestamp", "2026-03-06T22:33:47Z")
        spec = item.get("spec", {})
        if item["kind"] == "Subnet" and item["metadata"]["name"] == "subnetinternal":
            spec.update(cidrBlock="172.20.10.0/24,fd00:10::/64", gateway="172.20.10.1,fd00:10::1", protocol="Dual")
        if item["kind"] == "Subnet" and item["metadata"]["name"] == "subnetexternal":
            spec.update(cidrBlock="10.115.48.0/21,fd00:115::/64", gateway="10.115.55.254,fd00:115::fe")
        if item["kind"] == "Pod":
            notes = item["metadata"]["annotations"]
            for provider, v6 in (
                ("internalvswitch.default", "fd00:10::fe"),
                ("externalvswitch.kube-system", "fd00:115::1"),
            ):
                key = f"{provider}.ovn.kubernetes.io/ip_address"
                notes[key] += f",{v6}"
            routes = "internalvswitch.default.ovn.kubernetes.io/routes"
            notes[routes] = json.dumps([*json.loads(notes[routes]), {"dst": "fd00:55::/64", "gw": "fd00:10::1"}])
        if item["kind"] == "IptablesEIP":
            spec["v6ip"] = "fd00:115::200"
    return [
        *objects,
        eip("my-eip2", "10.115.55.201", v6ip="fd00:115::201"),
        obj("IptablesSnatRule", "my-snat6", {"eip": "my-eip", "internalCIDR": "fd00:10::/64"}),
        dnat("dnat01-6", "my-eip", "8888", "fd00:10::2", "80"),
        obj("IptablesFIPRule", "fip01", {"eip": "my-eip2", "internalIp": "172.20.10.3"}),
        obj("IptablesFIPRule", "fip01-6", {"eip": "my-eip2", "internalIp": "fd00:10::3"}),
    ]


def test_a_dual_stack_gateway_imports_as_the_dual_stack_seed() -> None:
    from natgwd.lab.topology import DUAL_STACK_STATE

    result = import_objects(_dual_stack_seed(), ImportOptions(gateway="gw1"))
    assert result.state == DUAL_STACK_STATE
    load_state(json.dumps(result.state).encode())
    assert not any("IPv6" in f.reason for f in result.findings)


def test_an_ipv6_route_without_an_ipv6_vpc_address_is_reported() -> None:
    objects = _dual_stack_seed()
    for item in objects:
        if item["kind"] == "Subnet" and item["metadata"]["name"] == "subnetinternal":
            item["spec"]["cidrBlock"] = "172.20.10.0/24"
    result = import_objects(objects, ImportOptions(gateway="gw1"))
    assert result.state["internal"]["addresses"] == ["172.20.10.254/24"]
    assert "note: route fd00:55::/64 via fd00:10::1: IPv6, and the gateway has no IPv6 VPC address; skipped" in reasons(
        result.findings, "Pod", "kube-system/vpc-nat-gw-gw1-0"
    )
    # Its IPv6 rules cannot reach their backends: refused, each with the reason.
    assert reasons(result.findings, "IptablesFIPRule", "fip01-6") == [
        "warning: natgwd refuses it: fd00:10::3 is in no internal address's subnet and no internal route; skipped"
    ]


# --- BGP speaker ------------------------------------------------------------------------


def with_speaker(speaker: dict[str, Any], annotated: bool = True) -> kubeovn.ImportResult:
    objects = seed_objects(STATEFULSET)
    gateway = next(o for o in objects if o["kind"] == "VpcNatGateway")
    gateway["spec"]["bgpSpeaker"] = speaker
    for item in objects:
        if item["kind"] == "IptablesEIP" and annotated:
            item["metadata"].setdefault("annotations", {})["ovn.kubernetes.io/bgp"] = "true"
    return import_objects(objects, ImportOptions(gateway="gw1"))


SPEAKER = {
    "enabled": True,
    "asn": 65001,
    "remoteAsn": 65000,
    "neighbors": ["10.115.55.254"],
    "holdTime": "1m30s",
    "routerId": "10.115.48.1",
    "password": "s3cret",
    "enableGracefulRestart": True,
    "extraArgs": ["--log-level=5"],
}


def test_the_bgp_speaker_and_the_eip_annotation_are_carried_over() -> None:
    result = with_speaker(SPEAKER)
    assert result.state["bgp"] == {
        "asn": 65001,
        "announce": "marked",
        "routerId": "10.115.48.1",
        "neighbors": [
            {"address": "10.115.55.254", "remoteAsn": 65000, "holdTime": 90, "password": "s3cret"}
            | {"gracefulRestart": True}
        ],
    }
    assert [e.get("bgp") for e in result.state["eips"]] == [True]
    state = load_state(json.dumps(result.state).encode())
    assert state.bgp is not None and [e.name for e in state.bgp.announced(state.eips)] == ["my-eip"]
    gateway = reasons(result.findings, "VpcNatGateway", "gw1")
    assert "warning: bgpSpeaker.extraArgs ['--log-level=5'] are GoBGP's; not carried over" in gateway
    assert any("add bgp.neighbors[].bfd" in r for r in gateway)


def test_a_speaker_natgwd_refuses_or_that_is_off_leaves_no_bgp_section() -> None:
    assert "bgp" not in with_speaker({**SPEAKER, "enabled": False}).state
    refused = with_speaker({**SPEAKER, "asn": 0, "holdTime": "2.5s"})
    assert "bgp" not in refused.state
    assert "eips" in refused.state and all("bgp" not in e for e in refused.state["eips"])
    gateway = reasons(refused.findings, "VpcNatGateway", "gw1")
    assert "warning: bgpSpeaker.holdTime '2.5s' is not whole seconds; the default (90 s) is used" in gateway
    assert any(r.startswith("warning: natgwd refuses the BGP speaker: $.bgp.asn: must be between 1") for r in gateway)


def test_without_the_annotation_nothing_is_marked_and_it_is_said() -> None:
    result = with_speaker(SPEAKER, annotated=False)
    assert result.state["bgp"]["announce"] == "marked"
    assert all("bgp" not in e for e in result.state["eips"])
    assert any("nothing is announced until one does" in r for r in reasons(result.findings, "VpcNatGateway", "gw1"))


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("1m30s", 90), ("1h", 3600), ("", None), ("90", None)])
def test_go_durations(text: str, seconds: float | None) -> None:
    from natgwd.kubeovn.importer.bgp import duration_seconds

    assert duration_seconds(text) == seconds
