"""The port grammar: a port 1-65535, or a range "first-last" of them.

The desired state holds a port as a JSON integer or a string ("80", "8000-8010"); the
schema's `portOrRange` pattern checks the same shape (tests/unit/test_ports.py proves they
agree). Kube-OVN's side (its objects, and the `nat-gateway.sh` calls) writes the text only,
and also "first:last", iptables' `--dport` spelling of a range. A refusal is a reason in
validation's words, for the caller to put beside the field it read.

A range is written back as `str(PortRange)`: "80", or "8000-8010".
"""

from __future__ import annotations

import re
from functools import lru_cache

from natgwd.state.model import PortRange

NOT_A_PORT = 'must be a port 1-65535 (integer or string) or a range "first-last"'
OUT_OF_RANGE = "ports must be between 1 and 65535"

_STATE_TEXT = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")
_KUBE_OVN_TEXT = re.compile(r"([0-9]{1,5})(?:[-:]([0-9]{1,5}))?")


def port_range(value: object) -> PortRange | str:
    """A port field of the desired state (the decoded JSON value), or why it is refused:
    NOT_A_PORT for anything of another shape, else the reason naming the value."""
    if isinstance(value, bool):  # JSON true is no integer, though Python's bool is an int
        return NOT_A_PORT
    if isinstance(value, float):
        # JSON Schema draft 7 counts 80.0 as an integer: the schema lets it through.
        if value.is_integer() and 1 <= value <= 65535:
            return f"must be a whole number or a string, not {value!r}"
        return NOT_A_PORT
    if isinstance(value, int):
        return PortRange(value, value) if 1 <= value <= 65535 else NOT_A_PORT
    if isinstance(value, str):
        return _state_text(value)
    return NOT_A_PORT


@lru_cache(maxsize=4096)
def _state_text(text: str) -> PortRange | str:
    # A gateway's rules repeat their ports (a backend's "80" in every DNAT rule): a full
    # validation of 50,000 rules parses 100,000 port fields. Both results are immutable.
    return _parsed(text, _STATE_TEXT)


def kube_ovn_port_range(text: str) -> PortRange | str:
    """A port as Kube-OVN writes it ("80", "8000-8010" or "8000:8010"), or why it is
    refused (NOT_A_PORT when it is not of that shape)."""
    return _parsed(text, _KUBE_OVN_TEXT)


def _parsed(text: str, grammar: re.Pattern[str]) -> PortRange | str:
    match = grammar.fullmatch(text)
    if match is None:
        return NOT_A_PORT
    first, last = int(match[1]), int(match[2] or match[1])
    if not (1 <= first <= 65535 and 1 <= last <= 65535):
        return OUT_OF_RANGE
    if first > last:
        return f"range {text} is reversed (first port after last)"
    return PortRange(first, last)
