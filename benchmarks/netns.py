"""Running things inside a network namespace without `ip netns exec`.

`ip netns exec` costs a few milliseconds per call (it unshares a mount namespace and
remounts /sys), which would be charged to every baseline that runs a process per rule.
Here a child process enters the namespace with setns(2) between fork and exec, and a
socket is created in it by entering it briefly from this thread (a socket stays in the
namespace it was created in).
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import socket
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


class Netns:
    """A handle on /run/netns/NAME; close() releases it (the namespace stays)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _enter(self) -> None:  # runs in the child, between fork and exec
        _setns(self.fd)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(list(argv), preexec_fn=self._enter, **kwargs)

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | bytes | None = None,  # noqa: A002 (as subprocess.run)
        timeout: float | None = 120,
        text: bool = True,
    ) -> subprocess.CompletedProcess[Any]:
        result = subprocess.run(
            list(argv),
            preexec_fn=self._enter,
            input=input,
            capture_output=True,
            timeout=timeout,
            text=text,
            check=False,
        )
        if check and result.returncode != 0:
            err = result.stderr if text else result.stderr.decode(errors="replace")
            raise RuntimeError(f"[{self.name}] {' '.join(argv)} failed ({result.returncode}): {err.strip()[-2000:]}")
        return result

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """This thread inside the namespace for the duration (for creating sockets)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(self.fd)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)

    def http_get(self, port: int, path: str, timeout: float = 120) -> tuple[int, bytes]:
        """GET http://127.0.0.1:port/path inside the namespace."""
        with self.entered():
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        connection.sock = sock
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


@contextlib.contextmanager
def bare_gateway(prefix: str) -> Iterator[str]:
    """A fresh namespace with the gateway's net1 and net2 (veth pairs whose peers stay in
    it, up: there is no dummy module here) and nothing else; deleted afterwards."""
    name = prefix + os.urandom(3).hex()
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for command in (
            ["link", "set", "lo", "up"],
            ["link", "add", "net1", "type", "veth", "peer", "name", "net1-peer"],
            ["link", "add", "net2", "type", "veth", "peer", "name", "net2-peer"],
            ["link", "set", "net1-peer", "up"],
            ["link", "set", "net2-peer", "up"],
        ):
            subprocess.run(["ip", "-n", name, *command], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
