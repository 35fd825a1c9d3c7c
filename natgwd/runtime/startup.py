"""Why `natgwd run` could not start: one line naming the cause and the value, a log event,
and an exit code of its own for each cause (documented in docs/running.md), never a traceback.

Exit codes of `natgwd run`: 0 stopped by a signal, 2 command line not understood (argparse),
and the codes below.
"""

from __future__ import annotations

import errno
import socket
import sys
from enum import IntEnum

import structlog

log = structlog.get_logger("natgwd.runtime.startup")


class Exit(IntEnum):
    ADDRESS_SYNTAX = 3  # --metrics-address is not HOST:PORT
    ADDRESS_PORT = 4  # its port is not 0-65535
    ADDRESS_IN_USE = 5  # another socket listens there
    ADDRESS_NOT_HERE = 6  # no interface of this host has the address (or it is down)
    ADDRESS_UNKNOWN_HOST = 7  # the host name does not resolve
    ADDRESS_FORBIDDEN = 8  # binding needs a privilege natgwd lacks
    ADDRESS_OTHER = 9  # any other reason the socket cannot listen
    KERNEL = 10  # libnftables or netlink cannot be opened
    OBSERVE_OPTION = 11  # a connection-event or translation-log option is invalid
    ALREADY_RUNNING = 12  # another natgwd runs in this network namespace


class StartupError(Exception):
    def __init__(self, code: Exit, message: str, value: str) -> None:
        super().__init__(message)
        self.code = code
        self.value = value


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (the host may be empty, meaning 0.0.0.0, or an IPv6 address in brackets)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise StartupError(
            Exit.ADDRESS_SYNTAX, f"--metrics-address {text!r} is not HOST:PORT (e.g. 127.0.0.1:9469)", text
        )
    if not 0 <= int(port) <= 65535:
        raise StartupError(Exit.ADDRESS_PORT, f"--metrics-address {text!r}: port {port} is not in 0-65535", text)
    return host.strip("[]") or "0.0.0.0", int(port)


_LISTEN_ERRORS = {
    errno.EADDRINUSE: (Exit.ADDRESS_IN_USE, "the address is already in use (another process listens there)"),
    errno.EADDRNOTAVAIL: (Exit.ADDRESS_NOT_HERE, "no interface of this host has that address"),
    errno.EACCES: (Exit.ADDRESS_FORBIDDEN, "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"),
}


def listen_error(address: tuple[str, int], err: OSError | TypeError | UnicodeError) -> StartupError:
    """What binding `address` raised, as the cause a user can act on."""
    value = "{}:{}".format(*address) if ":" not in address[0] else "[{}]:{}".format(*address)
    if isinstance(err, socket.gaierror):
        code, cause = Exit.ADDRESS_UNKNOWN_HOST, f"host {address[0]!r} does not resolve: {err.strerror}"
    elif not isinstance(err, OSError):  # the socket module cannot even encode the host name
        code, cause = Exit.ADDRESS_UNKNOWN_HOST, f"host {address[0]!r} is not a valid host name"
    else:
        code, cause = _LISTEN_ERRORS.get(err.errno or 0, (Exit.ADDRESS_OTHER, err.strerror or str(err)))
    return StartupError(code, f"cannot serve /metrics on {value} (--metrics-address): {cause}", value)


def report(err: StartupError) -> int:
    """Log the failure, say it in one line on stderr, and give the exit code."""
    log.error("natgwd cannot start", reason=str(err), value=err.value, exit_code=int(err.code))
    print(f"natgwd: {err}", file=sys.stderr)
    return int(err.code)
