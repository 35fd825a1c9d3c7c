"""The shipped container image, end to end: build it with no registry (image/build-offline.sh:
debootstrap + buildah), run it with podman in the lab's gateway namespace with every
capability dropped except NET_ADMIN and NET_RAW and the seed state mounted read-only, prove
SNAT out and DNAT in with real traffic and per-rule counters, then stop the container and
prove the data plane stays up. Traffic stays between the lab's namespaces.

The image also stands in for Kube-OVN's vpc-nat-gateway image with the controller unchanged:
started as `sleep infinity`, driven by `bash /kube-ovn/nat-gateway.sh ...` execs.

The same image, with Debian's systemd added, also boots under systemd-nspawn in the gateway
namespace to run natgwd through systemd/natgwd.service: proof that the unit's sandbox
(DynamicUser, two capabilities, MemoryDenyWriteExecute, SystemCallFilter,
ProtectKernelTunables with /proc/sys/net writable, ...) lets natgwd work, with sd_notify
readiness, reload and a stop that leaves the data plane.

Slow (the first build debootstraps a rootfs: about two minutes; with the cached base about
20 s; the systemd test adds about 10 s), hence the `image` marker. The image, containers,
machine root directories and namespaces are removed afterwards, also on failure; the build
script keeps only its download/base cache (/var/cache/natgwd-image).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from natgwd.lab.topology import EXTERNAL_HOST, SEED_STATE, Lab
from tests.integration.helpers import pod_network

pytestmark = [pytest.mark.image]

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "image" / "build-offline.sh"
UNIT = ROOT / "systemd" / "natgwd.service"
UNIT_DEFAULTS = ROOT / "systemd" / "natgwd.default"
EIP1 = "10.115.55.200"  # my-eip: SNAT of the VPC, dnat01 (tcp 8888 -> vm1:80)
METRICS_PORT = 9469
# What this machine's podman needs (see the reference notes); harmless elsewhere.
PODMAN_RUN = ("podman", "run", "--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
TOOLS = {"podman": "podman", "buildah": "buildah", "debootstrap": "debootstrap", "runc": "runc"}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _run(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


def _missing_tools(tools: dict[str, str]) -> list[str]:
    return [package for tool, package in tools.items() if shutil.which(tool) is None]


def _tools_or_skip(tools: dict[str, str] = TOOLS) -> None:
    """The tools (command: Debian package), installed with apt-get when missing."""
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, buildah, podman, network namespaces)")
    missing = _missing_tools(tools)
    if missing and shutil.which("apt-get") and os.environ.get("NATGWD_NO_APT") != "1":
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=300, check=False)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *missing], capture_output=True, env=env, timeout=600, check=False
        )
        missing = _missing_tools(tools)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (not installed and apt-get could not install them)")


@dataclass(frozen=True)
class BuiltImage:
    name: str
    seconds: float
    size: int


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> Iterator[BuiltImage]:
    """The image built from this checkout by image/build-offline.sh, under a tag of its own;
    removed afterwards. NATGWD_TEST_IMAGE=name tests that image instead (e.g. one built
    from image/Containerfile) and leaves it."""
    _tools_or_skip()
    given = os.environ.get("NATGWD_TEST_IMAGE")
    if given:
        size = int(_run("podman", "image", "inspect", "--format", "{{.Size}}", given).stdout)
        yield BuiltImage(given, 0.0, size)
        return
    name = f"localhost/natgwd:test-{secrets.token_hex(4)}"
    env = {**os.environ, "NATGWD_IMAGE": name, "PYTHON": sys.executable}
    started = time.monotonic()
    try:
        result = subprocess.run(
            ["bash", str(BUILD_SCRIPT)], env=env, capture_output=True, text=True, timeout=900, check=False
        )
        seconds = time.monotonic() - started
        assert result.returncode == 0, f"build-offline.sh failed:\n{result.stdout}\n{result.stderr[-6000:]}"
        size = int(_run("podman", "image", "inspect", "--format", "{{.Size}}", name).stdout)
        report = f"image {name}: built in {seconds:.0f} s, {size / 1e6:.0f} MB"
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"\n{report}")
        else:
            print(report)
        yield BuiltImage(name, seconds, size)
    finally:
        _run("podman", "rmi", "--force", name, check=False)


@dataclass
class Container:
    """natgwd's container, seen from the gateway namespace it runs in."""

    lab: Lab
    name: str

    def inspect(self) -> dict[str, Any]:
        result = _run("podman", "container", "inspect", self.name, check=False)
        found = json.loads(result.stdout or "[]") if result.returncode == 0 else []
        return dict(found[0]) if found else {}

    def running(self) -> bool:
        state = self.inspect().get("State")
        return isinstance(state, dict) and bool(state.get("Running"))

    def logs(self) -> str:
        result = _run("podman", "logs", self.name, check=False)
        return result.stdout + result.stderr

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{METRICS_PORT}{path}"
        result = self.lab.exec("gw", "curl", "-s", "-m", "5", "-w", "\n%{http_code}", url, check=False)
        body, _, status = result.stdout.rpartition("\n")
        return int(status or 0), body

    def wait_ready(self, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        body = ""
        while time.monotonic() < deadline:
            status, body = self.get("/readyz")
            if status == 200:
                return dict(json.loads(body))
            if not self.running():
                break
            time.sleep(0.2)
        pytest.fail(f"natgwd in the container not ready: {body or 'no answer'}\n--- logs ---\n{self.logs()}")

    def rule_counter(self, metric: str, kind: str, name: str, eip: str, **labels: str) -> float:
        wanted = {"kind": kind, "name": name, "eip": eip, **labels}
        _, body = self.get("/metrics")
        for line in body.splitlines():
            match = _SAMPLE.match(line)
            if match and match.group(1) == metric and dict(_LABEL.findall(match.group(2) or "")) == wanted:
                return float(match.group(3))
        return 0.0


def _client_address(answer: str) -> str:
    """The address part of natgwd.lab.servers's "ip:port" answer."""
    host, sep, port = answer.strip().rpartition(":")
    assert sep and port.isdigit(), f"not an ip:port answer: {answer!r}"
    return host


def _assert_nat_works(lab: Lab) -> None:
    # SNAT: vm3 (no FIP) reaches the upstream host as the SNAT EIP.
    assert _client_address(lab.http_get("vm3", EXTERNAL_HOST, 80)) == EIP1
    # DNAT: the upstream host reaches vm1:80 through EIP1:8888, with its own address.
    assert _client_address(lab.http_get("ext", EIP1, 8888)) == EXTERNAL_HOST


def test_image_runs_the_gateway_and_leaves_it_up(image: BuiltImage, lab: Lab, tmp_path: Path) -> None:
    """Guards against an image that cannot run natgwd with only NET_ADMIN and NET_RAW (a
    missing binding, binary or capability), an entrypoint that ignores the mounted state,
    a healthcheck or metrics endpoint that does not work in the image, a SIGTERM that is not
    honoured promptly (PID 1 in a container) and a stop that tears the NAT down."""
    inspected = json.loads(_run("podman", "image", "inspect", image.name).stdout)[0]
    config = inspected["Config"]
    assert config["Entrypoint"] == [
        "/opt/natgwd/bin/natgwd",
        *("run", "--state", "/etc/natgwd/state.json", "--applied-state", "/var/lib/natgwd/applied.json"),
    ]
    assert inspected["Healthcheck"]["Test"][:2] == ["CMD", "/opt/natgwd/bin/python"]

    state = tmp_path / "state.json"
    state.write_text(json.dumps(SEED_STATE, indent=1))
    state.chmod(0o644)
    container = Container(lab, f"natgwd-test-{lab.prefix}")
    try:
        _run(
            *PODMAN_RUN,
            "--detach",
            "--name",
            container.name,
            "--network",
            f"ns:/run/netns/{lab.ns('gw')}",
            "--cap-drop",
            "all",
            "--cap-add",
            "NET_ADMIN",
            "--cap-add",
            "NET_RAW",
            # /proc/sys is read-only in an unprivileged container: the runtime sets what natgwd
            # would otherwise write there (Kubernetes: see image/kubernetes/statefulset.yaml).
            "--volume",
            f"{state}:/etc/natgwd/state.json:ro",
            # As in Kubernetes (readOnlyRootFilesystem, an emptyDir for the applied record).
            "--read-only",
            "--read-only-tmpfs=false",
            "--mount",
            "type=tmpfs,destination=/var/lib/natgwd",
            image.name,
            "--log-format",
            "console",
        )
        ready = container.wait_ready()
        assert ready["ready"] is True
        caps = container.inspect()["EffectiveCaps"]
        assert sorted(caps) == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
        # The image's HEALTHCHECK (python3 urllib against /readyz), run by hand: no systemd here.
        health = _run("podman", "healthcheck", "run", container.name, check=False)
        assert health.returncode == 0, f"healthcheck failed: {health.stdout}{health.stderr}"
        applied = json.loads(_run("podman", "exec", container.name, "cat", "/var/lib/natgwd/applied.json").stdout)
        assert applied["sha256"] == ready["applied_sha256"]

        lab.serve("ext", tcp=[80])
        lab.serve("vm1", tcp=[80])
        _assert_nat_works(lab)
        for kind, rule in (("snat", "my-snat"), ("dnat", "dnat01")):
            connections = container.rule_counter("natgwd_rule_connections_total", kind, rule, EIP1)
            packets = container.rule_counter("natgwd_rule_packets_total", kind, rule, EIP1, direction="original")
            assert connections > 0, f"{kind}/{rule}: no connections counted\n{container.get('/metrics')[1]}"
            assert packets > 0, f"{kind}/{rule}: no packets counted"

        # SIGTERM: natgwd (PID 1) exits at once, cleanly, and leaves the data plane.
        started = time.monotonic()
        _run("podman", "stop", "--time", "10", container.name, timeout=30)
        stop_seconds = time.monotonic() - started
        finished = container.inspect()["State"]
        assert finished["ExitCode"] == 0, f"exit code {finished['ExitCode']}\n{container.logs()}"
        assert stop_seconds < 5, f"podman stop took {stop_seconds:.1f} s"
        assert "data plane stays in place" in container.logs()
        assert container.get("/healthz")[0] == 0  # nothing serves any more
        assert EIP1 in lab.exec("gw", "nft", "list", "table", "inet", "natgwd").stdout
        _assert_nat_works(lab)  # new connections, with natgwd gone
    except BaseException:
        print(f"--- container logs ---\n{container.logs()}")
        raise
    finally:
        _run("podman", "rm", "--force", "--time", "0", container.name, check=False)


def test_image_as_kube_ovn_drop_in(image: BuiltImage, lab: Lab) -> None:
    """Guards against an image that cannot run under kube-ovn-controller's own pod spec
    (genNatGwStatefulSet): command `sleep infinity`, privileged, env GATEWAY_V4/GATEWAY_V6,
    and a postStart hook `sh -c "sysctl -w net.ipv4.ip_forward=1"` that kubelet runs in the
    container right after it starts and that must succeed (else kubelet kills the
    container: a crash loop). Then the controller's `init` and rules through
    `bash /kube-ovn/nat-gateway.sh` must become applied NAT; any other sleep must still sleep."""
    # What the CNI does before the container starts: the pod's addresses and routes.
    for cmd in (
        ("ip", "link", "set", "net1", "up"),
        ("ip", "addr", "add", "172.20.10.254/24", "dev", "net1"),
        ("ip", "route", "add", "10.55.0.0/16", "via", "172.20.10.1"),
        ("ip", "link", "set", "net2", "up"),
        ("ip", "addr", "add", "10.115.48.1/21", "dev", "net2"),
        ("ip", "route", "add", "default", "via", EXTERNAL_HOST),
        ("sysctl", "-qw", "net.ipv4.ip_forward=0"),  # a new network namespace's default
    ):
        lab.exec("gw", *cmd)
    pod = pod_network(lab)  # eth0: the pod network, where Prometheus scrapes
    container = Container(lab, f"natgwd-dropin-{lab.prefix}")
    try:
        _run(
            *PODMAN_RUN,
            "--detach",
            "--name",
            container.name,
            "--network",
            f"ns:/run/netns/{lab.ns('gw')}",
            "--privileged",
            "--env",
            f"GATEWAY_V4={EXTERNAL_HOST}",
            "--env",
            "GATEWAY_V6=",
            # The controller's command for the vpc-nat-gw container.
            "--entrypoint",
            "sleep",
            image.name,
            "infinity",
        )
        # kubelet's postStart exec, at once: it fails the container if the command fails.
        hook = _run("podman", "exec", container.name, "sh", "-c", "sysctl -w net.ipv4.ip_forward=1", check=False)
        assert hook.returncode == 0, f"postStart hook failed: {hook.stdout}{hook.stderr}"
        assert hook.stdout.strip() == "net.ipv4.ip_forward = 1"
        assert lab.exec("gw", "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
        assert container.running()
        for rule in (
            ("init", "net1,net2"),
            ("get-iptables-version",),
            ("subnet-route-add", "10.55.0.0/16,172.20.10.1"),
            ("snat-add", f"{EIP1},172.20.10.0/24,--random-fully"),  # a replay may send rules first
            ("eip-add", f"{EIP1}/21"),
            ("dnat-add", f"{EIP1},8888,tcp,172.20.10.2,80"),
        ):
            # As kube-ovn-controller execs it; returns once natgwd has applied the change.
            result = _run("podman", "exec", container.name, "bash", "/kube-ovn/nat-gateway.sh", *rule, check=False)
            assert result.returncode == 0, f"{rule}: {result.stdout}{result.stderr}\n{container.logs()}"
            # The controller fails a call on any stderr line that is not a warning.
            assert all(line.startswith("Warning:") for line in result.stderr.splitlines()), result.stderr
        # A LoadBalancer Service's pod (same image) execs /kube-ovn/lb-svc.sh: it reaches
        # natgwd through the nat-gateway.sh beside it.
        usage = _run("podman", "exec", container.name, "bash", "/kube-ovn/lb-svc.sh", "help", check=False)
        assert (usage.returncode, usage.stdout.splitlines()[:1]) == (
            0,
            ["Usage: lb-svc.sh COMMAND RULE...   (natgwd: each call edits the desired state)"],
        ), f"{usage.stdout}{usage.stderr}"
        assert container.wait_ready()["ready"] is True
        # Rule names and counters are served on loopback and the pod's address (eth0), for
        # Prometheus as before; nothing listens on the EIP or net2.
        listening = lab.exec("gw", "ss", "-Hltn", "sport", f"= :{METRICS_PORT}").stdout.split()
        served = {f"127.0.0.1:{METRICS_PORT}", f"{pod}%eth0:{METRICS_PORT}"}
        assert {w for w in listening if w.endswith(f":{METRICS_PORT}")} == served
        scraped = lab.exec("pod", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{pod}:9469/metrics")
        assert scraped.stdout == "200"
        for address in (EIP1, "10.115.48.1"):
            refused = lab.exec("ext", "curl", "-s", "-m", "3", f"http://{address}:{METRICS_PORT}/metrics", check=False)
            assert refused.returncode == 7, f"/metrics on {address}: curl exit {refused.returncode}"
        lab.serve("ext", tcp=[80])
        lab.serve("vm1", tcp=[80])
        _assert_nat_works(lab)
        assert _run("podman", "exec", container.name, "sleep", "0.1", timeout=10).returncode == 0
    except BaseException:
        print(f"--- container logs ---\n{container.logs()}")
        raise
    finally:
        _run("podman", "rm", "--force", "--time", "0", container.name, check=False)


# --- the systemd unit, under systemd ---------------------------------------------------------


@dataclass
class Machine:
    """A systemd-nspawn container booted with systemd, in the lab's gateway namespace."""

    process: subprocess.Popen[bytes]
    log_path: Path
    leader: str = ""

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command inside the machine (all its namespaces)."""
        return _run("nsenter", "-t", self.leader, "-m", "-u", "-i", "-n", "-p", "--", *cmd, check=check)

    def unit(self, *properties: str) -> dict[str, str]:
        args = [arg for p in properties for arg in ("-p", p)]
        shown = self.run("systemctl", "show", *args, "natgwd.service").stdout
        return dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)

    def journal(self) -> str:
        if not self.leader:
            return self.log_path.read_text(errors="replace")
        return self.run("journalctl", "--no-pager", "-u", "natgwd", "-n", "60", check=False).stdout

    def wait_booted(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"systemd-nspawn exited:\n{self.log_path.read_text(errors='replace')[-4000:]}")
            children = _run("pgrep", "-P", str(self.process.pid), check=False).stdout.split()
            if children:
                self.leader = children[0]
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.2)
        pytest.fail(f"the machine did not boot:\n{self.log_path.read_text(errors='replace')[-4000:]}")

    def poweroff(self) -> None:
        if self.leader and self.process.poll() is None:
            self.run("systemctl", "poweroff", "--no-block", check=False)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def _chroot(root: Path, *cmd: str, timeout: float = 600) -> None:
    """Run a command in `root` with /proc and /dev mounted (unmounted after, also on failure)."""
    mounted: list[Path] = []
    try:
        for target, args in ((root / "proc", ["-t", "proc", "proc"]), (root / "dev", ["--bind", "/dev"])):
            _run("mount", *args, str(target))
            mounted.append(target)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
        result = subprocess.run(
            ["chroot", str(root), *cmd], capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
        assert result.returncode == 0, f"{' '.join(cmd)}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    finally:
        for target in reversed(mounted):
            _run("umount", "-l", str(target), check=False)


def _machine_root(image: BuiltImage, root: Path, state: dict[str, Any]) -> None:
    """The image's file system plus Debian's systemd, with natgwd.service enabled."""
    name = f"natgwd-export-{secrets.token_hex(4)}"
    try:
        _run("podman", "create", "--name", name, image.name)
        with subprocess.Popen(["podman", "export", name], stdout=subprocess.PIPE) as export:
            subprocess.run(["tar", "-C", str(root), "-xf", "-"], stdin=export.stdout, check=True, timeout=300)
        assert export.returncode == 0
    finally:
        _run("podman", "rm", "--force", name, check=False)
    shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
    _chroot(root, "apt-get", "-qq", "update")
    _chroot(root, "apt-get", "-qq", "install", "-y", "--no-install-recommends", "systemd")
    system = root / "etc" / "systemd" / "system"
    shutil.copy(UNIT, system / "natgwd.service")
    (system / "multi-user.target.wants").mkdir(exist_ok=True)
    (system / "multi-user.target.wants" / "natgwd.service").symlink_to("/etc/systemd/system/natgwd.service")
    shutil.copy(UNIT_DEFAULTS, root / "etc" / "default" / "natgwd")
    state_path = root / "etc" / "natgwd" / "state.json"
    state_path.write_text(json.dumps(state, indent=1))
    state_path.chmod(0o644)


def test_systemd_unit_runs_natgwd_hardened(image: BuiltImage, lab: Lab) -> None:
    """Guards against a unit whose sandbox breaks natgwd (W^X memory for ctypes/libffi, a
    filtered system call, a socket family, /proc/sys/net read-only, a state directory the
    dynamic user cannot write), against losing sd_notify readiness or the watchdog, a
    broken ExecReload, and a stop that tears the NAT down."""
    _tools_or_skip({"systemd-nspawn": "systemd-container", "nsenter": "util-linux", "pgrep": "procps"})
    root = Path(tempfile.mkdtemp(prefix="natgwd-machine-", dir="/var/tmp"))
    root.chmod(0o755)  # the machine's "/": the dynamic user must be able to enter it
    machine = None
    try:
        _machine_root(image, root, SEED_STATE)
        log_path = root.parent / f"{root.name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--quiet",
                    f"--directory={root}",
                    f"--machine=natgwd-test-{secrets.token_hex(4)}",  # hostname rules: no "_"
                    "--boot",
                    "--register=no",
                    "--keep-unit",
                    f"--network-namespace-path=/run/netns/{lab.ns('gw')}",
                    "--capability=CAP_NET_ADMIN",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        machine = Machine(process, log_path)
        machine.wait_booted()
        unit = machine.unit("ActiveState", "SubState", "MainPID", "NRestarts", "WatchdogUSec")
        # Type=notify: active means natgwd said READY=1, i.e. applied the desired state.
        assert unit["ActiveState"] == "active", f"{unit}\n{machine.journal()}"
        assert unit["WatchdogUSec"] == "30s"
        status = dict(
            line.split(":", 1) for line in machine.run("cat", f"/proc/{unit['MainPID']}/status").stdout.splitlines()
        )
        assert int(status["Uid"].split()[0]) != 0  # DynamicUser
        assert int(status["CapEff"], 16) == (1 << 12) | (1 << 13)  # CAP_NET_ADMIN | CAP_NET_RAW
        assert status["NoNewPrivs"].strip() == "1"
        assert status["Seccomp"].strip() == "2"  # SystemCallFilter, MemoryDenyWriteExecute, ...

        ready = lab.exec("gw", "curl", "-s", "-m", "5", f"http://127.0.0.1:{METRICS_PORT}/readyz").stdout
        assert json.loads(ready)["ready"] is True
        lab.serve("ext", tcp=[80])
        lab.serve("vm1", tcp=[80])
        _assert_nat_works(lab)

        reload = machine.run("systemctl", "reload", "natgwd", check=False)
        assert reload.returncode == 0, f"{reload.stderr}\n{machine.journal()}"
        assert machine.unit("NRestarts")["NRestarts"] == "0"

        machine.run("systemctl", "stop", "natgwd")
        stopped = machine.unit("ActiveState", "Result")
        assert stopped == {"ActiveState": "inactive", "Result": "success"}, machine.journal()
        _assert_nat_works(lab)  # the data plane stays
    except BaseException:
        if machine is not None:
            print(f"--- natgwd.service journal ---\n{machine.journal()}")
        raise
    finally:
        if machine is not None:
            machine.poweroff()
        for leftover in (root / "proc", root / "dev"):
            _run("umount", "-l", str(leftover), check=False)
        _run("rm", "-rf", "--one-file-system", str(root), str(root.parent / f"{root.name}.log"), check=False)
