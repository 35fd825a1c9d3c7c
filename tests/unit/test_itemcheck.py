"""natgwd.state.itemcheck: the fast predicate of an item schema says what jsonschema says."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from benchmarks.rulesets import workload
from natgwd.state.itemcheck import compile_check
from natgwd.state.problems import ITEM_SECTIONS
from natgwd.state.shape import _fast_item_checks, _validators, schema
from tests.unit.test_properties import json_values

DEFINITIONS = sorted(schema()["definitions"])


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(DEFINITIONS), json_values)
@example("portOrRange", 80.0)
@example("portOrRange", True)
@example("portOrRange", "80\n")
@example("decimal", 2.5)
@example("decimal", "2.5")
@example("decimal", -1)
@example("name", "a" * 64)
@example("ipAddress", "fd00::1")
@example("timeouts", {"tcpEstablished": 1.0})
@example("timeouts", {"tcpStates": {"close": 0}})
@example("timeouts", {"udp": False})
def test_a_definition_is_judged_as_jsonschema_judges_it(name: str, value: Any) -> None:
    """Prevents: the fast check passing a value jsonschema refuses (a rule would skip the
    schema's reasons), or refusing one it takes (every such rule would pay jsonschema)."""
    definition = schema()["definitions"][name]
    assert compile_check(definition)(value) == jsonschema.Draft7Validator(definition).is_valid(value), value


@pytest.mark.parametrize("section", ITEM_SECTIONS)
def test_every_valid_item_of_a_large_state_passes(section: str) -> None:
    """Prevents: a fast check that refuses valid items (correct, but as slow as jsonschema)."""
    _, validators = _validators()
    items = workload(2000).state[section]
    assert items
    for item in items:
        assert validators[section].is_valid(item)
        assert _fast_item_checks()[section](item), item


@pytest.mark.parametrize(
    "unknown",
    [
        {"type": "string", "format": "ipv4"},
        {"type": "object", "patternProperties": {}},
        {"anyOf": [{"type": "string"}]},
        {"oneOf": [{"type": "integer"}, {"type": "number"}]},
        {"oneOf": [{"type": "string"}, {"enum": ["a"]}]},
        {"type": "array", "items": [{"type": "string"}]},
        {"enum": [1, "a"]},
        {"type": "object", "additionalProperties": {"type": "string"}},
    ],
)
def test_a_keyword_it_does_not_know_is_refused_when_made(unknown: dict[str, Any]) -> None:
    """Prevents: a schema growing a keyword the fast check would silently ignore (laxer)."""
    with pytest.raises(ValueError, match=r"no fast check|overlap|only an enum|additionalProperties"):
        compile_check(unknown)
