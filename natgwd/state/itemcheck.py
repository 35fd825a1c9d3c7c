"""A JSON Schema of one rule or EIP turned into a predicate that reads each field once.

A full validation checks every item of every rule list against its schema, and nearly
every item is valid: what counts is how fast a valid item is said to be one. The predicate
walks the item's own fields (not the schema's list of properties) and checks each with a
closure made for its subschema: two to three times faster than code fastjsonschema
generates for the same schema, which tries each branch of a `oneOf` by raising and
catching an exception.

The predicate only says yes or no, and is never laxer than jsonschema (Draft 7): a
refused item is checked again by jsonschema, whose errors name every problem
(natgwd.state.shape). It takes the keywords the item schemas use; any other keyword is
refused when the predicate is made, so a schema that grows one cannot be checked more
laxly without a failing test.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Check = Callable[[Any], bool]

# Keywords that say nothing about the value.
_ANNOTATIONS = frozenset({"description", "title", "$comment", "examples", "default"})
_PYTHON_TYPES: Mapping[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int, float),  # Draft 7: 80.0 is an integer
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def compile_check(schema: Mapping[str, Any]) -> Check:
    """The predicate of `schema` ($refs already inlined). ValueError for a keyword it
    does not know, or a `oneOf` whose branches may both match."""
    if not isinstance(schema, Mapping):
        raise ValueError(f"no fast check for the schema {schema!r}")
    unknown = schema.keys() - _ANNOTATIONS - _KNOWN
    if unknown:
        raise ValueError(f"no fast check for the keywords {sorted(unknown)}")
    if "oneOf" in schema:
        if schema.keys() - _ANNOTATIONS != {"oneOf"}:
            raise ValueError("oneOf beside other keywords")
        return _one_of([compile_check(branch) for branch in schema["oneOf"]], schema["oneOf"])
    if "enum" in schema:
        return _enum(schema)
    kind = schema.get("type")
    if kind == "object":
        return _object(schema)
    if kind == "array":
        return _array(schema)
    if kind == "string":
        return _string(schema)
    if kind in ("integer", "number"):
        return _number(schema, whole=kind == "integer")
    if kind == "boolean":
        return _exactly(bool)
    raise ValueError(f"no fast check for the type {kind!r}")


_KNOWN = frozenset(
    {
        "type",
        "enum",
        "oneOf",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
    }
)


def _exactly(kind: type) -> Check:
    return lambda value: type(value) is kind


def _enum(schema: Mapping[str, Any]) -> Check:
    values = schema["enum"]
    if schema.keys() - _ANNOTATIONS != {"enum"} or not all(type(v) is str for v in values):
        raise ValueError("only an enum of strings, alone")
    # type() first: 1 == True and 1.0 == 1 in Python, but not in JSON.
    allowed = frozenset(values)
    return lambda value: type(value) is str and value in allowed


def _one_of(branches: list[Check], schemas: list[Mapping[str, Any]]) -> Check:
    """One of branches whose types never overlap: the value's type picks the only branch
    that may match, so "exactly one matches" is "that one matches"."""
    by_type: dict[type, Check] = {}
    for branch, schema in zip(branches, schemas, strict=True):
        kinds = _PYTHON_TYPES.get(schema.get("type", ""), ())
        if not kinds or by_type.keys() & set(kinds):
            raise ValueError("oneOf of branches that may overlap")
        by_type.update(dict.fromkeys(kinds, branch))

    def check(value: Any) -> bool:
        branch = by_type.get(type(value))
        return branch is not None and branch(value)

    return check


def _object(schema: Mapping[str, Any]) -> Check:
    fields = {name: compile_check(sub) for name, sub in schema.get("properties", {}).items()}
    required = frozenset(schema.get("required", ()))
    extra = schema.get("additionalProperties", True)
    if extra not in (True, False):
        raise ValueError("additionalProperties other than true or false")
    closed = extra is False

    def check(value: Any) -> bool:
        if type(value) is not dict or not required <= value.keys():
            return False
        for name, field in value.items():
            found = fields.get(name)
            if found is None:
                if closed:
                    return False
            elif not found(field):
                return False
        return True

    return check


def _array(schema: Mapping[str, Any]) -> Check:
    item = compile_check(schema["items"]) if "items" in schema else None
    least, most = schema.get("minItems", 0), schema.get("maxItems")

    def check(value: Any) -> bool:
        if type(value) is not list or len(value) < least or (most is not None and len(value) > most):
            return False
        return item is None or all(map(item, value))

    return check


def _string(schema: Mapping[str, Any]) -> Check:
    longest = schema.get("maxLength")
    # jsonschema searches with the pattern as written: the same search here (a `$` before
    # a final newline included; the control-character check refuses that one).
    search = re.compile(schema["pattern"]).search if "pattern" in schema else None
    if longest is None:
        longest = float("inf")

    def check(value: Any) -> bool:
        return type(value) is str and len(value) <= longest and (search is None or search(value) is not None)

    return check


def _number(schema: Mapping[str, Any], whole: bool) -> Check:
    # type(), not isinstance: bool is an int in Python, not in JSON. Draft 7 counts an
    # integer-valued float (80.0) as an integer: so does this (the port's own check
    # refuses it with its reason).
    low, high = schema.get("minimum", float("-inf")), schema.get("maximum", float("inf"))

    def check(value: Any) -> bool:
        kind = type(value)
        if kind is float:
            return (value.is_integer() or not whole) and low <= value <= high
        return kind is int and low <= value <= high

    return check
