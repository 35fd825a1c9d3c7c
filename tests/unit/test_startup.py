"""The causes `natgwd run` names when it cannot start, and their exit codes (issue 17, item 2).
The failures themselves are run in tests/integration/test_startup_errors.py."""

from __future__ import annotations

import errno
import socket

import pytest

from natgwd.runtime.startup import Exit, StartupError, listen_error, parse_address


@pytest.mark.parametrize(
    ("text", "address"),
    [("0.0.0.0:9469", ("0.0.0.0", 9469)), (":9469", ("0.0.0.0", 9469)), ("[::1]:80", ("::1", 80))],
)
def test_addresses_that_parse(text: str, address: tuple[str, int]) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("9469", Exit.ADDRESS_SYNTAX),
        ("host:", Exit.ADDRESS_SYNTAX),
        ("a:b", Exit.ADDRESS_SYNTAX),
        ("localhost:99999", Exit.ADDRESS_PORT),
        ("1.2.3.4:65536", Exit.ADDRESS_PORT),
    ],
)
def test_addresses_that_do_not_parse_name_the_value(text: str, code: Exit) -> None:
    with pytest.raises(StartupError) as caught:
        parse_address(text)
    assert caught.value.code == code
    assert caught.value.value == text
    assert repr(text) in str(caught.value)


@pytest.mark.parametrize(
    ("err", "code", "cause"),
    [
        (OSError(errno.EADDRINUSE, "Address already in use"), Exit.ADDRESS_IN_USE, "already in use"),
        (OSError(errno.EADDRNOTAVAIL, "Cannot assign"), Exit.ADDRESS_NOT_HERE, "no interface of this host"),
        (PermissionError(errno.EACCES, "Permission denied"), Exit.ADDRESS_FORBIDDEN, "CAP_NET_BIND_SERVICE"),
        (
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            Exit.ADDRESS_UNKNOWN_HOST,
            "does not resolve",
        ),
        (OSError(errno.ENOBUFS, "No buffer space available"), Exit.ADDRESS_OTHER, "No buffer space available"),
    ],
)
def test_listen_errors_name_the_address_and_the_cause(err: OSError, code: Exit, cause: str) -> None:
    error = listen_error(("10.0.0.1", 80), err)
    assert error.code == code
    assert error.value == "10.0.0.1:80"
    assert str(error).startswith("cannot serve /metrics on 10.0.0.1:80 (--metrics-address): ")
    assert cause in str(error)
    assert "\n" not in str(error)


def test_a_host_name_the_socket_module_cannot_encode() -> None:
    error = listen_error(("ä" * 70, 80), TypeError("encoding of hostname failed"))
    assert error.code == Exit.ADDRESS_UNKNOWN_HOST
    assert str(error).endswith("is not a valid host name")


def test_an_ipv6_address_is_named_in_brackets() -> None:
    assert listen_error(("::1", 80), OSError(errno.EADDRINUSE, "x")).value == "[::1]:80"
