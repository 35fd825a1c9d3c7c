"""The Python side of natgwd's edit endpoint, for `python -m natgwd.kubeovn.shim` where natgwd
takes calls (its token file exists): the same request the bash nat-gateway.sh sends."""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from pathlib import Path

from natgwd.kubeovn.shim.call import Reply
from natgwd.kubeovn.shim.endpoint import ADDRESS
from natgwd.kubeovn.shim.grammar import ShimError
from natgwd.kubeovn.shim.protocol import decode_reply, encode_request

RETRY_SECONDS = 0.05


def _connect(token_file: Path, deadline: float) -> tuple[socket.socket, str]:
    """Connect to the port the token file names, again and again while natgwd starts."""
    while True:
        try:
            port_text, token = token_file.read_text().split()
            return socket.create_connection((ADDRESS, int(port_text)), timeout=5), token
        except (OSError, ValueError) as err:
            if time.monotonic() >= deadline:
                raise ShimError(f"natgwd: its edit endpoint ({token_file}) did not answer in time: {err}") from None
        time.sleep(RETRY_SECONDS)


def request(token_file: Path, argv: Sequence[str], gateway_v4: str | None, timeout: float) -> Reply:
    deadline = time.monotonic() + timeout
    sock, token = _connect(token_file, deadline)
    with sock:
        sock.sendall(encode_request(token, gateway_v4, list(argv)))
        data = b""
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                chunk = sock.recv(64 * 1024)
            except OSError as err:
                raise ShimError(f"natgwd: no reply from its edit endpoint: {err}") from None
            if not chunk:
                break
            data += chunk
    try:
        code, out, text = decode_reply(data)
    except ValueError:
        raise ShimError("natgwd: no reply from its edit endpoint (natgwd stopped?)") from None
    return Reply(code, out, text)
