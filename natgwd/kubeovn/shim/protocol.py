"""The framing of natgwd's edit endpoint, simple enough for bash's /dev/tcp and `read -d ''`.

A request is NUL-terminated fields: the magic `natgwd-edit/1`, the secret token, the
caller's GATEWAY_V4 (may be empty), the number of arguments, then each argument. Command
line arguments cannot hold a NUL, so the fields need no escaping. A reply is three
NUL-terminated fields: the exit code, the stdout text, the stderr text.

Anything may connect to loopback, so a request is read defensively: every field and the
whole request are bounded, the token is checked as soon as it has arrived (before the
arguments are read), and a malformed request is refused with its reason.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

MAGIC = b"natgwd-edit/1"
MAX_FIELD_BYTES = 64 * 1024
MAX_ARGS = 4096
MAX_REQUEST_BYTES = 1024 * 1024
_HEADER_FIELDS = 4  # magic, token, GATEWAY_V4, argument count


class RequestError(Exception):
    """A request that is refused: the reason goes back to the caller."""


@dataclass(frozen=True)
class Request:
    gateway_v4: str | None
    argv: tuple[str, ...]


def encode_request(token: str, gateway_v4: str | None, argv: tuple[str, ...] | list[str]) -> bytes:
    fields = [MAGIC, token.encode(), (gateway_v4 or "").encode(), str(len(argv)).encode()]
    fields += [arg.encode() for arg in argv]
    if any(b"\0" in field for field in fields):
        raise RequestError("an argument holds a NUL byte")
    return b"".join(field + b"\0" for field in fields)


def parse_request(data: bytes, token: str) -> Request | None:
    """The request `data` holds; None while it is incomplete. Raises RequestError."""
    if len(data) > MAX_REQUEST_BYTES:
        raise RequestError(f"request larger than {MAX_REQUEST_BYTES} bytes")
    *fields, partial = data.split(b"\0")
    if len(partial) > MAX_FIELD_BYTES or any(len(field) > MAX_FIELD_BYTES for field in fields):
        raise RequestError(f"a field larger than {MAX_FIELD_BYTES} bytes")
    if (fields[0] if fields else MAGIC[: len(partial)]) != (MAGIC if fields else partial):
        raise RequestError(f"not a natgwd edit request (expected {MAGIC.decode()})")
    if len(fields) < 2:
        if len(fields) == 1 and len(partial) > len(token):  # no more than the token before it is checked
            raise RequestError("refused: wrong token")
        return None
    if not hmac.compare_digest(fields[1], token.encode()):
        raise RequestError("refused: wrong token")
    if len(fields) < _HEADER_FIELDS:
        return None
    count_text = fields[3]
    if not count_text.isdigit() or len(count_text) > 5 or int(count_text) > MAX_ARGS:
        raise RequestError(f"argument count {count_text[:16]!r} is not a number 0-{MAX_ARGS}")
    wanted = _HEADER_FIELDS + int(count_text)
    if len(fields) < wanted:
        return None
    if len(fields) > wanted or partial:
        raise RequestError("bytes after the last argument")
    try:
        gateway_v4 = fields[2].decode()
        argv = tuple(field.decode() for field in fields[_HEADER_FIELDS:])
    except UnicodeDecodeError:
        raise RequestError("an argument is not UTF-8") from None
    return Request(gateway_v4.strip() or None, argv)


def encode_reply(code: int, out: str, err: str) -> bytes:
    # The texts come from natgwd, but they quote the caller's rules: keep NULs out of them.
    return b"".join(part.replace("\0", "\\0").encode() + b"\0" for part in (str(code), out, err))


def decode_reply(data: bytes) -> tuple[int, str, str]:
    """The exit code, stdout and stderr of a complete reply. Raises ValueError."""
    parts = data.split(b"\0")
    if len(parts) != 4 or parts[3] or not parts[0].isdigit():
        raise ValueError("not a natgwd edit reply")
    return int(parts[0]), parts[1].decode(errors="replace"), parts[2].decode(errors="replace")
