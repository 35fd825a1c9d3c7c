"""The shape of a decoded document against the shipped JSON Schema (schema/state-v1.json),
each error explained in the file's words with the JSONPath of its field. Rule lists are
checked item by item (a compiled check first: natgwd.state.itemcheck; jsonschema's
explanation for what it refuses),
so that the delta path can check the changed items alone."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from functools import cache
from importlib import resources
from typing import Any

import jsonschema

from natgwd.state.itemcheck import Check, compile_check
from natgwd.state.ports import NOT_A_PORT
from natgwd.state.problems import ITEM_SECTIONS, Problem

MAX_PROBLEMS = 100  # a file with thousands of errors gets the first ones, not gigabytes of them


@cache
def schema() -> dict[str, Any]:
    text = resources.files("natgwd.state").joinpath("schema/state-v1.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


_PATTERN_MEANING = {
    "name": "must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending with a letter or digit",
    "ifname": "must be an interface name of 1-15 letters, digits, '_', '.' or '-'",
    "ipv4Address": "must be an IPv4 address such as 10.115.55.200",
    "ipv4Interface": "must be an IPv4 address with prefix length such as 172.20.10.254/24",
    "ipv4Cidr": "must be an IPv4 network such as 172.20.10.0/24",
    "ipv6Address": "must be an IPv6 address such as fd00:55::200",
    "ipAddress": "must be an IPv4 or IPv6 address such as 172.20.10.2 or fd00:10::2",
    "ipInterface": "must be an IPv4 or IPv6 address with prefix length such as 172.20.10.254/24 or fd00:10::fe/64",
    "ipCidr": "must be an IPv4 or IPv6 network such as 172.20.10.0/24 or fd00:10::/64",
}

# Version 1 files name IPv4 fields; an IPv6 address in one of them has a field of its own.
_IPV6_FIELD = {"v4ip": "v6ip", "gateway": "gateway6"}


def _definition_of(subschema: dict[str, Any]) -> str | None:
    for name, definition in schema()["definitions"].items():
        if definition is subschema or any(definition is s for s in definition.get("oneOf", ())):
            return str(name)
    # A pattern error carries the inner schema of a definition: find it by identity.
    for name, definition in schema()["definitions"].items():
        if definition.get("pattern") == subschema.get("pattern") and "pattern" in subschema:
            return str(name)
    return None


def _inline_refs(node: Any, definitions: dict[str, Any]) -> Any:
    """The schema with every $ref replaced by the very definition object it names:
    resolving references dominates jsonschema's time, and keeping the objects (not copies)
    lets _definition_of still recognise them."""
    if isinstance(node, dict):
        if "$ref" in node:
            return definitions[node["$ref"].rsplit("/", 1)[1]]
        return {key: _inline_refs(value, definitions) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline_refs(value, definitions) for value in node]
    return node


@cache
def _fast_item_checks() -> dict[str, Check]:
    """Per rule list, the same item schema as a predicate: ten times faster than jsonschema
    on a valid rule, which is what nearly every rule is. It only says yes or no (and is
    stricter, never laxer: tests/unit/test_properties.py), so a rule it refuses is checked
    again by jsonschema, whose errors name every problem."""
    _, item_validators = _validators()
    return {section: compile_check(v.schema) for section, v in item_validators.items()}


@cache
def _validators() -> tuple[jsonschema.Draft7Validator, dict[str, jsonschema.Draft7Validator]]:
    """A validator for the document without its rule lists' items, and one per rule list
    for a single item: items are checked one by one so that unchanged rules can be skipped."""
    full = schema()
    inlined = _inline_refs({k: v for k, v in full.items() if k != "definitions"}, full["definitions"])
    items = {section: inlined["properties"][section]["items"] for section in ITEM_SECTIONS}
    for section in ITEM_SECTIONS:
        inlined["properties"][section] = {k: v for k, v in inlined["properties"][section].items() if k != "items"}
    return jsonschema.Draft7Validator(inlined), {s: jsonschema.Draft7Validator(i) for s, i in items.items()}


def may_hold_control_characters(raw: bytes) -> bool:
    """Whether a string decoded from `raw` may hold a control character: JSON text cannot
    hold a raw one in a string (the decoder refuses it), only an escape, which needs a
    backslash; DEL may stand raw."""
    return b"\\" in raw or b"\x7f" in raw


_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def has_control_character(text: str) -> bool:
    # A regular expression: a Python loop over every character of every string costs
    # milliseconds per document of 1,000 EIPs, and a nat-gateway.sh call pays it.
    return _CONTROL_CHARACTER.search(text) is not None


def _control_characters(document: Any) -> Iterator[Problem]:
    """Strings with control characters (a trailing newline slips past a `$` in the
    schema's patterns, which Python matches before a final newline)."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(document, ())]
    while stack:
        node, parts = stack.pop()
        if isinstance(node, str) and has_control_character(node):
            yield Problem.at(parts, "contains a control character")
        elif isinstance(node, dict):
            stack.extend((value, (*parts, key)) for key, value in node.items())
        elif isinstance(node, list):
            stack.extend((value, (*parts, i)) for i, value in enumerate(node))


def item_shape_ok(section: str, item: Any) -> bool:
    """Whether one rule or EIP passes the schema (no reasons: see validate_document)."""
    return _fast_item_checks()[section](item)


def top_shape_ok(document: Any) -> bool:
    """Whether the document without its rules' and EIPs' items passes the schema."""
    top, _ = _validators()
    return next(top.iter_errors(document), None) is None


def shape_problems(document: Any, control_characters_possible: bool = True) -> list[Problem]:
    top, item_validators = _validators()
    fast_checks = _fast_item_checks()
    problems: list[Problem] = []
    if control_characters_possible:
        problems += itertools.islice(_control_characters(document), MAX_PROBLEMS)
    for error in itertools.islice(top.iter_errors(document), MAX_PROBLEMS):
        problems.extend(_explain(error, list(error.absolute_path)))
    for section in ITEM_SECTIONS:
        items = document.get(section) if isinstance(document, dict) else None
        if not isinstance(items, list):
            continue
        for index, item in enumerate(items):
            if len(problems) >= MAX_PROBLEMS:
                break
            if fast_checks[section](item):
                continue
            for error in item_validators[section].iter_errors(item):
                problems.extend(_explain(error, [section, index, *error.absolute_path]))
    if len(problems) >= MAX_PROBLEMS:
        problems = [*problems[:MAX_PROBLEMS], Problem("$", f"more problems not listed (stopped at {MAX_PROBLEMS})")]
    return sorted(set(problems), key=lambda p: (p.path, p.reason))


def _explain(error: jsonschema.ValidationError, parts: list[str | int]) -> list[Problem]:
    kind = error.validator
    value = error.validator_value
    if kind == "additionalProperties":
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - allowed)
        known = ", ".join(sorted(allowed))
        return [Problem.at([*parts, key], f"unknown field (allowed here: {known})") for key in extra]
    if kind == "required":
        missing = [key for key in value if key not in error.instance]
        return [Problem.at([*parts, key], "required field is missing") for key in missing]
    if kind == "type":
        return [Problem.at(parts, f"must be {'an' if value in ('object', 'array', 'integer') else 'a'} {value}")]
    if kind == "const":
        return [Problem.at(parts, f"must be {json.dumps(value)} (the only supported version)")]
    if kind == "enum":
        return [Problem.at(parts, "must be one of " + ", ".join(json.dumps(v) for v in value))]
    if kind == "pattern":
        definition = _definition_of(error.schema)
        meaning = _PATTERN_MEANING.get(definition or "", f"must match {value}")
        field = str(parts[-1]) if parts else ""
        if field in _IPV6_FIELD and isinstance(error.instance, str) and ":" in error.instance:
            meaning += f" (an IPv6 address goes in {_IPV6_FIELD[field]}, beside {field})"
        return [Problem.at(parts, meaning)]
    if kind == "maxLength":
        definition = _definition_of(error.schema)
        meaning = _PATTERN_MEANING.get(definition or "", f"must be at most {value} characters")
        return [Problem.at(parts, f"{meaning} (at most {value} characters)")]
    if kind == "oneOf":
        if _definition_of(error.schema) == "decimal":
            return [Problem.at(parts, 'must be a number of at least 0, as a number or a string such as "2.5"')]
        return [Problem.at(parts, NOT_A_PORT)]
    if kind == "maxItems":
        return [Problem.at(parts, f"has more than {value} items")]
    if kind in ("minimum", "maximum") and "timeouts" in parts:
        bound = "at least 1 second" if kind == "minimum" else f"at most {value} seconds (the kernel's limit)"
        return [Problem.at(parts, f"must be {bound}")]
    return [Problem.at(parts, error.message)]
