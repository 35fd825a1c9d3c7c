"""The port grammar of a state file: a port (integer or string) or a range "first-last"."""

from __future__ import annotations

from natgwd.state.model import PortRange


def parse_port_range(value: int | str | float) -> PortRange | str:
    """The range a value the schema admitted names, or why it is refused."""
    if isinstance(value, float):  # JSON Schema draft 7 counts 80.0 as an integer
        return f"must be a whole number or a string, not {value!r}"
    first_text, _, last_text = str(value).partition("-")
    first, last = int(first_text), int(last_text or first_text)
    if not (1 <= first <= 65535 and 1 <= last <= 65535):
        return "ports must be between 1 and 65535"
    if first > last:
        return f"range {value} is reversed (first port after last)"
    return PortRange(first, last)
