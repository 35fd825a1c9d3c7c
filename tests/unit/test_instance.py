"""One natgwd per network namespace (natgwd.runtime.instance): the claim is an abstract Unix
socket, so a second claim in the same namespace is refused naming the holder, and the claim
ends with its holder. A name of the test's own keeps a natgwd of this host out of it."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from natgwd.runtime.instance import AlreadyRunningError, Claim


def test_a_second_claim_is_refused_naming_the_first_and_a_released_claim_is_free() -> None:
    name = f"natgwd-test/{secrets.token_hex(6)}"
    first = Claim("/etc/natgwd/state.json", "127.0.0.1:9469", name=name)
    try:
        with pytest.raises(AlreadyRunningError) as refused:
            Claim("/tmp/other.json", "127.0.0.1:9470", name=name)
        assert str(refused.value) == (
            f"another natgwd runs in this network namespace "
            f"(pid {os.getpid()}, --state /etc/natgwd/state.json, metrics on 127.0.0.1:9469)"
        )
    finally:
        first.release()
    Claim("/tmp/other.json", "127.0.0.1:9470", name=name).release()


def test_the_claim_ends_with_its_process() -> None:
    name = f"natgwd-test/{secrets.token_hex(6)}"
    code = (
        "from natgwd.runtime.instance import Claim\n"
        f"Claim('s', 'm', name={name!r})\n"
        "print('claimed', flush=True)\n"
        "input()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "claimed\n"
        with pytest.raises(AlreadyRunningError, match=rf"\(pid {holder.pid}, --state s, metrics on m\)"):
            Claim("x", "y", name=name)
    finally:
        holder.kill()
        holder.wait()
    Claim("x", "y", name=name).release()
