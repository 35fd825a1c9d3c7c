"""The deployment files: the Kubernetes manifests (image/kubernetes), the container image
recipes (image/Containerfile, image/build-offline.sh) and the systemd unit (systemd/).

Each command line is parsed with natgwd's own argument parser, so a renamed or removed option
fails here and not on a cluster; mounts, probes and ports are checked against the command
line that uses them; the unit goes through `systemd-analyze verify` and its exposure score
through `systemd-analyze security --offline=yes` (both skipped without systemd-analyze)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from natgwd.cli import parser
from natgwd.lab.topology import SEED_STATE
from natgwd.runtime.listeners import AUTO, LOOPBACK
from natgwd.runtime.startup import parse_address
from natgwd.state.validation import load_state

yaml = pytest.importorskip("yaml", reason="needs PyYAML (pip install pyyaml) to read the Kubernetes manifests")

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "image" / "kubernetes"
UNIT = ROOT / "systemd" / "natgwd.service"
DEFAULTS = ROOT / "systemd" / "natgwd.default"
NATGWD = "/opt/natgwd/bin/natgwd"
METRICS_PORT = 9469
# Exposure score of `systemd-analyze security --offline=yes` (0 = best, 10 = worst) that the
# unit must not exceed: 1.8 with systemd 252. A higher score means hardening was dropped.
MAX_EXPOSURE = 2.0

# The pod template of the seed's StatefulSet vpc-nat-gw-gw1, as Kube-OVN generated it.
SEED_LABELS = {"app": "vpc-nat-gw-gw1", "ovn.kubernetes.io/vpc-nat-gw": "true"}
SEED_ANNOTATIONS = {
    "externalvswitch.kube-system.ovn.kubernetes.io/routes": '[{"dst":"0.0.0.0/0","gw":"10.115.55.254"}]',
    "internalvswitch.default.ovn.kubernetes.io/ip_address": "172.20.10.254",
    "internalvswitch.default.ovn.kubernetes.io/logical_switch": "internalsubnet",
    "internalvswitch.default.ovn.kubernetes.io/routes": (
        '[{"dst":"10.55.0.0/16","gw":"172.20.10.1"},{"dst":"10.115.48.0/21","gw":"172.20.10.1"}]'
    ),
    "internalvswitch.default.ovn.kubernetes.io/vpc_nat_gw": "gw1",
    "k8s.v1.cni.cncf.io/networks": "default/internalvswitch, kube-system/externalvswitch",
    "ovn.kubernetes.io/ip_address": "172.20.10.254",
    "ovn.kubernetes.io/logical_switch": "internalsubnet",
    "ovn.kubernetes.io/vpc_nat_gw": "gw1",
}


# --- Kubernetes ----------------------------------------------------------------------------


def _manifest(name: str) -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all((KUBERNETES / name).read_text()) if d is not None]
    assert len(documents) == 1, f"{name}: expected one object, found {len(documents)}"
    return dict(documents[0])


@pytest.fixture(scope="module")
def statefulset() -> dict[str, Any]:
    return _manifest("statefulset.yaml")


@pytest.fixture(scope="module")
def configmap() -> dict[str, Any]:
    return _manifest("configmap.yaml")


@pytest.fixture(scope="module")
def pod(statefulset: dict[str, Any]) -> dict[str, Any]:
    return dict(statefulset["spec"]["template"]["spec"])


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in pod["containers"] if c["name"] == "vpc-nat-gw"]
    assert len(found) == 1, "the StatefulSet must have one container vpc-nat-gw (Kube-OVN's name)"
    return dict(found[0])


def _parse(words: list[str]) -> argparse.Namespace:
    """natgwd's parser, refusing the abbreviated options argparse would accept (a renamed
    option must fail here, not match as a prefix)."""
    top = parser()
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    options = {o for a in commands.choices[words[0]]._actions for o in a.option_strings}
    unknown = [w.split("=", 1)[0] for w in words[1:] if w.startswith("--") and w.split("=", 1)[0] not in options]
    assert not unknown, f"not options of `natgwd {words[0]}`: {unknown}"
    return top.parse_args(words)


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


@pytest.fixture(scope="module")
def run_args(container: dict[str, Any]) -> Any:
    """The container's command line, through natgwd's parser (env from a sample pod)."""
    command, args = container["command"], container.get("args", [])
    assert command[0] == NATGWD, "command must be the image's natgwd"
    declared = {v["name"]: v for v in container.get("env", [])}
    env = {name: str(v.get("value", "")) for name, v in declared.items()}
    if any("$(POD_IP)" in a for a in args):
        assert declared["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        env["POD_IP"] = "10.52.1.66"  # the seed pod's
    return _parse([_expand(a, env) for a in [*command[1:], *args]])


def test_statefulset_identity_and_labels_are_the_seeds(statefulset: dict[str, Any]) -> None:
    """Guards against a StatefulSet Kube-OVN would not recognise as gw1's (name, namespace,
    labels, selector)."""
    assert statefulset["apiVersion"] == "apps/v1"
    assert statefulset["kind"] == "StatefulSet"
    assert statefulset["metadata"]["name"] == "vpc-nat-gw-gw1"
    assert statefulset["metadata"]["namespace"] == "kube-system"
    assert statefulset["metadata"]["labels"] == SEED_LABELS
    spec = statefulset["spec"]
    assert spec["replicas"] == 1
    assert spec["selector"]["matchLabels"] == SEED_LABELS
    assert spec["template"]["metadata"]["labels"] == SEED_LABELS


def test_pod_annotations_preserved_from_the_seed(statefulset: dict[str, Any]) -> None:
    """Guards against losing the Multus attachments or Kube-OVN's addresses and routes (the
    CNI would not give the pod net1/net2 as the state expects) and against annotation values
    that are not strings (the API server rejects them)."""
    annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert {k: annotations.get(k) for k in SEED_ANNOTATIONS} == SEED_ANNOTATIONS
    assert all(isinstance(v, str) for v in annotations.values())
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)


def test_container_runs_natgwd_on_the_mounted_state(
    pod: dict[str, Any], container: dict[str, Any], configmap: dict[str, Any], run_args: Any
) -> None:
    """Guards against natgwd reading a state file the ConfigMap is not mounted at, a subPath
    mount (never updated), a ConfigMap key other than the file natgwd reads, and an applied
    record on the read-only root file system."""
    assert run_args.command == "run"
    state = PurePosixPath(run_args.state)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    state_mounts = [m for m in mounts.values() if m["mountPath"] == str(state.parent)]
    assert len(state_mounts) == 1, f"nothing is mounted at {state.parent}"
    mount = state_mounts[0]
    assert mount.get("readOnly") is True
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    volume = volumes[mount["name"]]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"] == "vpc-nat-gw-gw1-state"
    assert "items" not in volume["configMap"]
    assert state.name in configmap["data"]
    assert configmap["metadata"]["namespace"] == "kube-system"
    # natgwd refuses a state file that others than root can write.
    assert volume["configMap"].get("defaultMode", 0o644) & 0o022 == 0

    applied = PurePosixPath(run_args.applied_state)
    applied_mounts = [m for m in mounts.values() if applied.is_relative_to(m["mountPath"])]
    assert applied_mounts and not applied_mounts[0].get("readOnly")
    assert {"emptyDir", "hostPath"} & set(volumes[applied_mounts[0]["name"]])


def test_configmap_state_is_the_seed_and_valid(configmap: dict[str, Any]) -> None:
    """Guards against shipping a state natgwd rejects (the pod would never be Ready)."""
    raw = configmap["data"]["state.json"]
    state = load_state(raw.encode())
    assert len(state.snat) == len(state.dnat) == len(state.fip) == 1
    assert json.loads(raw) == SEED_STATE


def test_probes_and_metrics_port(container: dict[str, Any], run_args: Any) -> None:
    """Guards against probes or scrapes aimed at a path or port natgwd does not serve."""
    ports = {p["name"]: p for p in container["ports"]}
    assert ports["metrics"]["containerPort"] == METRICS_PORT
    assert ports["metrics"].get("protocol", "TCP") == "TCP"
    assert run_args.metrics_address.rpartition(":")[2] == str(METRICS_PORT)
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in ("metrics", METRICS_PORT)
    # The kubelet probes, and Prometheus scrapes, the pod IP: natgwd listens there only
    # (every address would include the EIPs and the external network).
    host = run_args.metrics_address.rpartition(":")[0]
    assert host == "10.52.1.66"


def test_container_is_unprivileged_with_two_capabilities(pod: dict[str, Any], container: dict[str, Any]) -> None:
    """Guards against natgwd's container running privileged or with more than NET_ADMIN and
    NET_RAW."""
    context = container["securityContext"]
    assert context["privileged"] is False
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    assert sorted(context["capabilities"]["add"]) == ["NET_ADMIN", "NET_RAW"]
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod.get("hostNetwork", False) is False
    assert pod.get("automountServiceAccountToken") is False


def test_no_privileged_container(pod: dict[str, Any]) -> None:
    """Guards against a privileged helper creeping back: natgwd sets forwarding and
    promote_secondaries over netlink with CAP_NET_ADMIN, so nothing in the pod needs more."""
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        assert not container.get("securityContext", {}).get("privileged", False), container["name"]


def test_podmonitor_scrapes_the_metrics_port(statefulset: dict[str, Any], container: dict[str, Any]) -> None:
    """Guards against a PodMonitor that selects no pod or names a port the pod lacks."""
    monitor = _manifest("podmonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "PodMonitor"
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector == {"app": "vpc-nat-gw-gw1"}
    assert selector.items() <= labels.items()
    assert statefulset["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    port_names = {p["name"] for p in container["ports"]}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"


@pytest.mark.parametrize("version", ["1.29.0", None])
def test_manifests_match_the_kubernetes_schema(version: str | None) -> None:
    """Guards against a misspelt or misplaced field (the API server rejects the object, or
    drops the field). kubernetes-validate (test extras) carries the Kubernetes OpenAPI
    schemas in its package: no network needed."""
    files = [str(KUBERNETES / "statefulset.yaml"), str(KUBERNETES / "configmap.yaml")]
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", *(["-k", version] if version else []), *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(files), result.stdout


# --- container image -----------------------------------------------------------------------


def _containerfile_instruction(name: str) -> str:
    text = (ROOT / "image" / "Containerfile").read_text().replace("\\\n", " ")
    found = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith(f"{name} ")]
    assert found, f"no {name} in the Containerfile"
    return found[-1]


def test_image_entrypoints_agree_and_parse() -> None:
    """Guards against the Containerfile and the offline build drifting apart, or an
    entrypoint natgwd's parser rejects."""
    entrypoint = json.loads(_containerfile_instruction("ENTRYPOINT"))
    script = (ROOT / "image" / "build-offline.sh").read_text()
    match = re.search(r"--entrypoint \"(\[.*\])\"", script)
    assert match, "no --entrypoint in build-offline.sh"
    offline = json.loads(match.group(1).replace('\\"', '"').replace("$VENV", "/opt/natgwd"))
    assert entrypoint == offline
    assert entrypoint[0] == NATGWD
    args = _parse(entrypoint[1:])
    assert args.state == "/etc/natgwd/state.json"
    assert args.applied_state == "/var/lib/natgwd/applied.json"
    healthcheck = _containerfile_instruction("HEALTHCHECK")
    assert "/readyz" in script and "NATGWD_HEALTH_URL" in healthcheck


def test_the_image_and_the_drop_in_serve_metrics_on_loopback_and_the_pod_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Guards against the image's entrypoint or the Kube-OVN drop-in's `sleep infinity`
    (whose pod spec the controller writes: no flag can be added) serving every rule name
    and counter on the EIPs and the external network (issue 21, item 1), or nowhere
    Prometheus can scrape: `auto` (natgwd.runtime.listeners) is loopback and the pod's own
    address, and the image's HEALTHCHECK and `natgwd top` ask loopback."""
    monkeypatch.delenv("NATGWD_METRICS_ADDRESS", raising=False)
    entrypoint = json.loads(_containerfile_instruction("ENTRYPOINT"))
    drop_in = (ROOT / "image" / "sleep-infinity.sh").read_text()
    command = re.search(r'exec "\$\{NATGWD_PROGRAM:-/opt/natgwd/bin/natgwd\}" (run .*?)\n\s*fi', drop_in, re.S)
    assert command, "no natgwd run in sleep-infinity.sh"
    defaults = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", command.group(1).replace("\\\n", " "))
    words = shlex.split(defaults)
    for argv in (entrypoint[1:], words):
        assert parse_address(_parse(argv).metrics_address) == (AUTO, METRICS_PORT), argv
    assert f"NATGWD_HEALTH_URL=http://{LOOPBACK}:{METRICS_PORT}/readyz" in _containerfile_instruction("ENV")
    assert _parse(["top"]).metrics_address == f"{LOOPBACK}:{METRICS_PORT}"
    monkeypatch.setenv("NATGWD_METRICS_ADDRESS", "10.52.1.66:9469")
    assert _parse(entrypoint[1:]).metrics_address == "10.52.1.66:9469"


def test_both_image_recipes_install_the_kube_ovn_drop_in() -> None:
    """Guards against an image without /kube-ovn/nat-gateway.sh, /kube-ovn/lb-svc.sh (which
    runs nat-gateway.sh beside it) or the `sleep infinity` starter from one of the two
    recipes, or a Docker context that leaves them out."""
    containerfile = (ROOT / "image" / "Containerfile").read_text()
    script = (ROOT / "image" / "build-offline.sh").read_text()
    ignore = (ROOT / "image" / "Containerfile.dockerignore").read_text().split()
    for source, target in (
        ("image/sleep-infinity.sh", "/opt/natgwd/bin/sleep"),
        ("image/nat-gateway.sh", "/kube-ovn/nat-gateway.sh"),
        ("image/lb-svc.sh", "/kube-ovn/lb-svc.sh"),
    ):
        assert (ROOT / source).is_file()
        assert re.search(rf"^COPY --chmod=0755 {re.escape(source)} {re.escape(target)}$", containerfile, re.M)
        offline_target = target.replace("/opt/natgwd", "$VENV")
        assert f'"$ROOT/{source}" "$rootfs{offline_target}"' in script
        assert f"!{source}" in ignore


@pytest.mark.parametrize("name", ["build-offline.sh", "nat-gateway.sh", "lb-svc.sh", "sleep-infinity.sh"])
def test_image_scripts_pass_shellcheck(name: str) -> None:
    """shellcheck is one of the Makefile's APT_PACKAGES: missing, it fails (not skips)."""
    script = ROOT / "image" / name
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert shutil.which("shellcheck"), "shellcheck is not installed (make deps installs it)"
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --- systemd -------------------------------------------------------------------------------


def _unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in order; systemd allows a key more than once."""
    entries, section = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def _service(key: str) -> list[str]:
    return [v for s, k, v in _unit_entries(UNIT) if s == "Service" and k == key]


def _defaults() -> dict[str, str]:
    values = {}
    for line in DEFAULTS.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = " ".join(shlex.split(value))
    return values


def test_unit_command_line_parses_with_the_defaults() -> None:
    """Guards against an ExecStart (with /etc/default/natgwd expanded) that natgwd rejects,
    and an applied record outside the StateDirectory (read-only under ProtectSystem=strict)."""
    env = {}
    for assignment in _service("Environment"):
        key, _, value = assignment.partition("=")
        env[key] = value
    assert _service("EnvironmentFile") == ["-/etc/default/natgwd"]
    env.update(_defaults())
    (exec_start,) = _service("ExecStart")
    words = []
    for word in exec_start.split():
        if re.fullmatch(r"\$[A-Z_]+", word):  # $VAR: split on white space
            words += env[word[1:]].split()
        else:  # ${VAR} within a word
            words.append(re.sub(r"\$\{([A-Z_]+)\}", lambda m: env[m.group(1)], word))
    assert words[0] == NATGWD
    args = _parse(words[1:])
    assert args.command == "run"
    assert args.state == "/etc/natgwd/state.json"
    (state_directory,) = _service("StateDirectory")
    assert PurePosixPath(args.applied_state).is_relative_to(f"/var/lib/{state_directory}")


def test_unit_lifecycle_and_privileges() -> None:
    """Guards against losing sd_notify readiness or the watchdog, restarting a clean stop,
    and more privileges than NET_ADMIN and NET_RAW."""
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
    }
    assert {key: _service(key)[-1] for key in expected} == expected
    assert set(_service("CapabilityBoundingSet")[-1].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(_service("AmbientCapabilities")[-1].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(_service("RestrictAddressFamilies")[-1].split()) == {
        "AF_NETLINK",
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
        "AF_PACKET",
    }
    assert "@system-service" in _service("SystemCallFilter")


def test_unit_leaves_proc_sys_net_writable() -> None:
    """Guards against hardening that breaks natgwd's writes under /proc/sys/net (ip_forward,
    promote_secondaries): ProtectKernelTunables=yes needs ReadWritePaths=/proc/sys/net, and
    ProcSubset=pid hides /proc/sys altogether."""
    if _service("ProtectKernelTunables")[-1:] == ["yes"]:
        writable = " ".join(_service("ReadWritePaths")).split()
        assert any(PurePosixPath("/proc/sys/net").is_relative_to(p.lstrip("-+")) for p in writable)
    assert _service("ProcSubset")[-1:] != ["pid"]


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart's binary replaced by one that exists (verify checks it)."""
    binary = tmp_path / "natgwd"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(NATGWD, str(binary)))
    return copy


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("needs systemd-analyze (apt-get install systemd)")
    return found


def test_unit_verifies(tmp_path: Path) -> None:
    """Guards against unknown or misspelt directives and bad values (systemd ignores them
    with a warning, silently dropping hardening)."""
    analyze = _systemd_analyze()
    unit = _unit_copy(tmp_path)
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    complaints = [line for line in output.splitlines() if unit.name in line or str(tmp_path) in line]
    assert result.returncode == 0, output
    assert not complaints, "\n".join(complaints)


def test_unit_security_exposure(tmp_path: Path, record_property: Any) -> None:
    """Guards against hardening quietly dropped from the unit: the exposure score of
    `systemd-analyze security --offline=yes` must stay at or below MAX_EXPOSURE."""
    analyze = _systemd_analyze()
    unit = _unit_copy(tmp_path)
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0 and "offline" in result.stderr:
        pytest.skip(f"systemd-analyze security --offline is not supported here: {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    score = float(match.group(1))
    record_property("systemd_exposure", score)
    print(f"systemd-analyze security --offline=yes: {score} {match.group(2)}")
    assert score <= MAX_EXPOSURE, result.stdout
