"""natgwd.state.problems: every check reports to one collector, each problem with the
JSONPath of its field (and, for a rule or an EIP, its section, index and field)."""

from __future__ import annotations

from natgwd.state.problems import Problem, Problems
from natgwd.state.rules import network, usable_address


def test_a_problem_of_a_rule_names_its_section_index_and_field() -> None:
    problems = Problems()
    problems.item("dnat", 3, "externalPort", "overlaps")
    problems.add(("eips", 0, "v4ip"), "taken")
    problems.add("$.ha.interface", "must differ")
    assert problems.found == [
        Problem("$.dnat[3].externalPort", "overlaps", "dnat", 3, "externalPort"),
        Problem("$.eips[0].v4ip", "taken", "eips", 0, "v4ip"),
        Problem("$.ha.interface", "must differ"),
    ]


def test_a_value_that_does_not_parse_is_reported_where_it_was_read() -> None:
    problems = Problems()
    assert problems.parsed(("snat", 1, "internalCIDR"), network, "172.20.10.1/24") is None
    assert problems.parsed("$.internal.routes[0].via", usable_address, "127.0.0.1") is None
    assert str(problems.parsed("$.external.gateway", usable_address, "10.115.55.1")) == "10.115.55.1"
    assert [str(p) for p in problems.found] == [
        "$.snat[1].internalCIDR: has host bits set (did you mean 172.20.10.0/24?)",
        "$.internal.routes[0].via: 127.0.0.1 is not a usable unicast address",
    ]
    assert len(problems) == 2
