"""natgwd.state.ports: the one port grammar, equal to the schema's `portOrRange` shape, in
validation's words, and as the importer reads Kube-OVN's text."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from natgwd.kubeovn.importer import ImportOptions, import_objects
from natgwd.lab.topology import SEED_STATE
from natgwd.state.itemcheck import compile_check
from natgwd.state.model import PortRange
from natgwd.state.ports import NOT_A_PORT, OUT_OF_RANGE, kube_ovn_port_range, port_range
from natgwd.state.shape import schema
from natgwd.state.validation import InvalidStateError, load_state
from tests.unit.test_importer import STATEFULSET, dnat, reasons, seed_objects

PORT_SCHEMA = schema()["definitions"]["portOrRange"]
JSONSCHEMA = jsonschema.Draft7Validator(PORT_SCHEMA)
FAST = compile_check(PORT_SCHEMA)


def schema_accepts(value: Any) -> bool:
    """Both of validation's schema checks (jsonschema names the errors, natgwd.state.itemcheck
    is the fast path): they must agree, or the two paths would accept different files."""
    slow = JSONSCHEMA.is_valid(value)
    fast = FAST(value)
    assert slow == fast or (isinstance(value, str) and value.endswith("\n")), value
    return slow and fast


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (80, PortRange(80, 80)),
        ("80", PortRange(80, 80)),
        ("080", PortRange(80, 80)),
        ("1", PortRange(1, 1)),
        ("65535", PortRange(65535, 65535)),
        ("8000-8010", PortRange(8000, 8010)),
        ("7-7", PortRange(7, 7)),
        ("0", OUT_OF_RANGE),
        ("65536", OUT_OF_RANGE),
        ("0-10", OUT_OF_RANGE),
        ("00000-65535", OUT_OF_RANGE),
        ("5-3", "range 5-3 is reversed (first port after last)"),
        (0, NOT_A_PORT),
        (65536, NOT_A_PORT),
        (80.0, "must be a whole number or a string, not 80.0"),
        (0.0, NOT_A_PORT),
        (80.5, NOT_A_PORT),
        (True, NOT_A_PORT),
        (None, NOT_A_PORT),
        ([80], NOT_A_PORT),
        ("", NOT_A_PORT),
        ("1-", NOT_A_PORT),
        ("-1", NOT_A_PORT),
        ("1:5", NOT_A_PORT),
        ("80 ", NOT_A_PORT),
        ("80\n", NOT_A_PORT),
        ("123456", NOT_A_PORT),
        ("80-90-100", NOT_A_PORT),
        ("\u0668\u0660", NOT_A_PORT),  # Arabic-Indic "80": int() reads it, the grammar does not
    ],
)
def test_a_state_port(value: Any, expected: PortRange | str) -> None:
    assert port_range(value) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80", PortRange(80, 80)),
        ("8000-8010", PortRange(8000, 8010)),
        ("8000:8010", PortRange(8000, 8010)),
        ("5:3", "range 5:3 is reversed (first port after last)"),
        ("0:10", OUT_OF_RANGE),
        ("1:", NOT_A_PORT),
        (":1", NOT_A_PORT),
        ("1:2:3", NOT_A_PORT),
        ("http", NOT_A_PORT),
    ],
)
def test_a_kube_ovn_port(text: str, expected: PortRange | str) -> None:
    assert kube_ovn_port_range(text) == expected


PORT_LIKE = st.from_regex(r"\A[0-9]{0,7}(?:[-:][0-9]{0,7}){0,2}\n?\Z")


@given(st.one_of(PORT_LIKE, st.text(max_size=14)))
@example("0")
@example("65536")
@example("080")
@example("1-")
@example("-1")
@example("5-3")
@example("1:5")
@example("80\n")
@example("12345-123456")
def test_the_schema_pattern_and_the_grammar_accept_the_same_strings(text: str) -> None:
    # The schema checks the shape only: "0" and "5-3" pass it and are refused for their
    # numbers. "80\n" passes the pattern (Python's `$` matches before a final newline);
    # validation refuses it as a control character.
    shaped = schema_accepts(text) and not text.endswith("\n")
    assert shaped == (port_range(text) != NOT_A_PORT)


@given(st.one_of(st.integers(), st.floats(), st.booleans()))
@example(0)
@example(65535)
@example(65536)
@example(1.0)
@example(0.0)
@example(65535.0)
@example(65536.0)
def test_the_schema_and_the_grammar_accept_the_same_numbers(value: int | float) -> None:
    assert schema_accepts(value) == (port_range(value) != NOT_A_PORT)


@given(st.integers(1, 65535), st.integers(0, 100))
def test_a_range_written_back_reads_the_same(first: int, width: int) -> None:
    written = PortRange(first, min(first + width, 65535))
    assert port_range(str(written)) == written
    assert kube_ovn_port_range(str(written)) == written


@pytest.mark.parametrize("value", [80, "8000-8010", "0", "65536", "5-3", 0, 80.0, 80.5, True, "1-", "1:5"])
def test_validation_refuses_a_port_in_the_grammar_words(value: Any) -> None:
    doc: dict[str, Any] = json.loads(json.dumps(SEED_STATE))
    doc["dnat"][0]["externalPort"] = value
    doc["dnat"][0]["internalPort"] = value
    expected = port_range(value)
    try:
        load_state(json.dumps(doc).encode())
    except InvalidStateError as err:
        found = {(p.path, p.reason) for p in err.problems}
        assert found == {("$.dnat[0].externalPort", expected), ("$.dnat[0].internalPort", expected)}
    else:
        assert isinstance(expected, PortRange)


def test_the_importer_reads_kube_ovn_ports_with_the_grammar() -> None:
    seed = seed_objects(STATEFULSET)
    result = import_objects(
        [
            *seed,
            dnat("colon", "my-eip", "9000:9002", "172.20.10.2", "7000:7002"),
            dnat("zero-led", "my-eip", "0443", "172.20.10.2", "443"),
            dnat("zero", "my-eip", "0", "172.20.10.2", "80"),
            dnat("reversed", "my-eip", "95-90", "172.20.10.2", "80"),
            dnat("share-range", "my-eip", "100:101", "172.20.10.2", "80", type="share"),
        ],
        ImportOptions(gateway="gw1"),
    )
    by_name = {d["name"]: d for d in result.state["dnat"]}
    assert (by_name["colon"]["externalPort"], by_name["colon"]["internalPort"]) == ("9000-9002", "7000-7002")
    assert by_name["zero-led"]["externalPort"] == "443"
    assert reasons(result.findings, "IptablesDnatRule", "zero") == [
        "warning: externalPort '0' is refused: ports must be between 1 and 65535; skipped"
    ]
    assert reasons(result.findings, "IptablesDnatRule", "reversed") == [
        "warning: externalPort '95-90' is refused: range 95-90 is reversed (first port after last); skipped"
    ]
    assert reasons(result.findings, "IptablesDnatRule", "share-range") == [
        "warning: a share DNAT takes single ports, not ranges; skipped"
    ]
