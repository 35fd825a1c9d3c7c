"""Turn the bytes of a desired-state file into a DesiredState, or into every reason it
is not one.

Two passes: the shipped JSON Schema checks the shape (fields, types, formats), then the
semantic pass checks what a schema cannot say (addresses, references, conflicts,
reachability). The semantic pass relies on the shape, so it runs on the document without
the rules and EIPs the schema refused; when the schema refuses anything else (the
interfaces, the version, the document itself), it is skipped and the error says so.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from ipaddress import (
    AddressValueError,
    IPv4Address,
    IPv4Interface,
    IPv6Address,
    IPv6Interface,
    NetmaskValueError,
)
from typing import Any

import fastjsonschema
import jsonschema

from natgwd.ha.config import HaConfig, parse_ha
from natgwd.qos.validation import qos_policies
from natgwd.state.bgp import BgpConfig, parse_bgp
from natgwd.state.model import (
    PRIMARY_NETWORK,
    RULE_KINDS,
    DesiredState,
    Eip,
    ExternalSide,
    InternalSide,
    IPAddress,
    IPInterface,
    IPNetwork,
    Route,
    RuleKind,
)
from natgwd.state.ports import NOT_A_PORT
from natgwd.state.problems import ITEM_SECTIONS, Problem, Problems
from natgwd.state.rules import RULE_CHECKS, Rule, RuleContext, RuleIndex, family_name, usable_address
from natgwd.state.rules import network as parse_network
from natgwd.state.scaleout import ScaleOutConfig, parse_scale_out

MAX_FILE_BYTES = 32 * 1024 * 1024  # ~200,000 rules; parsing holds several times this


class InvalidStateError(Exception):
    """`skipped` says which checks did not run and why, when some could not."""

    def __init__(self, problems: list[Problem], skipped: str | None = None) -> None:
        super().__init__("; ".join([str(p) for p in problems] + ([skipped] if skipped else [])))
        self.problems = problems
        self.skipped = skipped


@cache
def schema() -> dict[str, Any]:
    text = resources.files("natgwd.state").joinpath("schema/state-v1.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


MAX_DEPTH = 16  # the format needs 5 levels; deeper input is refused before it is walked
MAX_PROBLEMS = 100  # a file with thousands of errors gets the first ones, not gigabytes of them


@dataclass(frozen=True)
class Validated:
    """A valid document, the state it describes and the indexes of its rules."""

    document: dict[str, Any]
    state: DesiredState
    index: RuleIndex


def load_state(raw: bytes) -> DesiredState:
    """Parse and validate a desired-state document; raise InvalidStateError listing every problem."""
    return validate(raw).state


def validate(raw: bytes) -> Validated:
    """load_state, keeping the decoded document and the rules' indexes."""
    document = decode(raw)
    check_depth(document)
    # JSON text cannot hold a raw control character in a string (the decoder refuses
    # one), only an escape, which needs a backslash; DEL may stand raw.
    return validate_document(document, control_characters_possible=b"\\" in raw or b"\x7f" in raw)


def validate_document(document: Any, control_characters_possible: bool = True) -> Validated:
    """Validate a decoded document (the full path: every rule is checked)."""
    problems = _shape_problems(document, control_characters_possible)
    if not problems:
        return _Semantics(document).build()
    if len(problems) > MAX_PROBLEMS:
        raise InvalidStateError(problems, skipped=f"{_SEMANTIC_CHECKS} were skipped: too many problems")
    set_aside, elsewhere = _refused_items(problems)
    if elsewhere:
        paths = sorted({p.path for p in elsewhere})
        first = paths[0] + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")
        skipped = f"{_SEMANTIC_CHECKS} were skipped: they need {first} fixed first"
        raise InvalidStateError(problems, skipped=skipped)
    try:
        _Semantics(document, set_aside).build()
    except InvalidStateError as err:
        problems = sorted(problems + err.problems, key=lambda p: p.path)
    if len(problems) > MAX_PROBLEMS:
        problems = [*problems[:MAX_PROBLEMS], Problem("$", f"more problems not listed (stopped at {MAX_PROBLEMS})")]
    raise InvalidStateError(problems)


_SEMANTIC_CHECKS = "the checks of addresses, EIP references, duplicates, conflicts and reachability"


def _refused_items(problems: list[Problem]) -> tuple[dict[str, set[int]], list[Problem]]:
    """The indices of the rules and EIPs the schema refused, per section, and the problems
    that lie outside any one of them."""
    set_aside: dict[str, set[int]] = defaultdict(set)
    elsewhere: list[Problem] = []
    for problem in problems:
        if problem.section is not None and problem.index is not None:
            set_aside[problem.section].add(problem.index)
        else:
            elsewhere.append(problem)
    return set_aside, elsewhere


# --- decoding -------------------------------------------------------------------------


class _DuplicateKeyError(ValueError):
    pass


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        key = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise _DuplicateKeyError(f"duplicate key {key!r} in one object")
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def decode(raw: bytes) -> Any:
    """The JSON document of a state file (any JSON value), or InvalidStateError."""
    return decode_text(text_of(raw))[0]


def text_of(raw: bytes) -> str:
    """The text of a state file, or InvalidStateError (too large, empty, NUL, not UTF-8)."""
    if len(raw) > MAX_FILE_BYTES:
        raise InvalidStateError([Problem("$", f"file is larger than {MAX_FILE_BYTES} bytes")])
    if not raw.strip():
        raise InvalidStateError([Problem("$", "file is empty")])
    if b"\x00" in raw:
        raise InvalidStateError([Problem("$", f"file contains a NUL byte at offset {raw.index(0)}")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidStateError([Problem("$", f"file is not UTF-8: {err.reason} at byte {err.start}")]) from None


def decoder(fractions: list[str]) -> json.JSONDecoder:
    """The JSON decoder of state files: duplicate keys and NaN refused; the text of every
    number with a fraction or an exponent goes to `fractions` (80.0 equals 80 in Python,
    and only one of them is a port)."""

    def parse_float(text: str) -> float:
        fractions.append(text)
        return float(text)

    return json.JSONDecoder(
        object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant, parse_float=parse_float
    )


def scanner() -> Callable[[str, int], tuple[Any, int]]:
    """The decoder's scanner: (value, end) of the JSON value at an offset of a text."""
    scan: Callable[[str, int], tuple[Any, int]] = decoder([]).scan_once  # type: ignore[attr-defined]
    return scan


def decode_text(text: str) -> tuple[Any, bool]:
    """The document of a state file's text, and whether it holds a fraction; or
    InvalidStateError."""
    fractions: list[str] = []
    try:
        document = decoder(fractions).decode(text)
    except json.JSONDecodeError as err:
        reason = f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        raise InvalidStateError([Problem("$", reason)]) from None
    except _DuplicateKeyError as err:
        raise InvalidStateError([Problem("$", str(err))]) from None
    except (ValueError, RecursionError) as err:
        # ValueError: NaN/Infinity, integers too long to convert. RecursionError: nesting.
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise InvalidStateError([Problem("$", f"not valid JSON: {reason}")]) from None
    return document, bool(fractions)


def check_depth(document: Any) -> None:
    """Refuse nesting the format never has: jsonschema and error messages recurse into it."""
    if not isinstance(document, dict | list):
        return
    level, depth = [document], 0
    while level := [
        child
        for node in level
        for child in (node.values() if isinstance(node, dict) else node)
        if isinstance(child, dict | list)
    ]:
        depth += 1
        # `level` holds the containers at `depth`: one with anything in it at MAX_DEPTH
        # puts a value deeper than MAX_DEPTH.
        if depth >= MAX_DEPTH and any(level):
            raise InvalidStateError([Problem(_too_deep(document), f"nested deeper than {MAX_DEPTH} levels")])


def _too_deep(document: Any) -> str:
    """The path of the first node nested deeper than MAX_DEPTH (one is known to exist)."""
    stack: list[tuple[Any, str, int]] = [(document, "$", 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            return path
        if isinstance(node, dict):
            stack.extend((value, f"{path}.{key}", depth + 1) for key, value in node.items())
        elif isinstance(node, list):
            stack.extend((value, f"{path}[{i}]", depth + 1) for i, value in enumerate(node))
    return "$"


# --- shape (JSON Schema) --------------------------------------------------------------

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
def _fast_item_checks() -> dict[str, Callable[[Any], Any]]:
    """Per rule list, the same item schema compiled to Python code: five times faster than
    jsonschema on a valid rule, which is what nearly every rule is. It only says yes or no
    (and is stricter, never laxer: tests/unit/test_properties.py), so a rule it refuses is
    checked again by jsonschema, whose errors name every problem."""
    _, item_validators = _validators()
    return {section: fastjsonschema.compile(v.schema) for section, v in item_validators.items()}


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


def _control_characters(document: Any) -> Iterator[Problem]:
    """Strings with control characters (a trailing newline slips past a `$` in the
    schema's patterns, which Python matches before a final newline)."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(document, ())]
    while stack:
        node, parts = stack.pop()
        if isinstance(node, str) and any(ord(c) < 0x20 or ord(c) == 0x7F for c in node):
            yield Problem.at(parts, "contains a control character")
        elif isinstance(node, dict):
            stack.extend((value, (*parts, key)) for key, value in node.items())
        elif isinstance(node, list):
            stack.extend((value, (*parts, i)) for i, value in enumerate(node))


def item_shape_ok(section: str, item: Any) -> bool:
    """Whether one rule or EIP passes the schema (no reasons: see validate_document)."""
    return _passes(_fast_item_checks()[section], item)


def top_shape_ok(document: Any) -> bool:
    """Whether the document without its rules' and EIPs' items passes the schema."""
    top, _ = _validators()
    return next(top.iter_errors(document), None) is None


def _shape_problems(document: Any, control_characters_possible: bool = True) -> list[Problem]:
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
            if _passes(fast_checks[section], item):
                continue
            for error in item_validators[section].iter_errors(item):
                problems.extend(_explain(error, [section, index, *error.absolute_path]))
    if len(problems) >= MAX_PROBLEMS:
        problems = [*problems[:MAX_PROBLEMS], Problem("$", f"more problems not listed (stopped at {MAX_PROBLEMS})")]
    return sorted(set(problems), key=lambda p: (p.path, p.reason))


def _passes(check: Callable[[Any], Any], item: Any) -> bool:
    try:
        check(item)
    except fastjsonschema.JsonSchemaException:
        return False
    return True


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
    return [Problem.at(parts, error.message)]


# --- semantics ------------------------------------------------------------------------


class _Semantics:
    """Checks that need the whole document; collects every problem before raising."""

    def __init__(self, document: dict[str, Any], set_aside: dict[str, set[int]] | None = None) -> None:
        self.doc = document
        self.problems = Problems()
        self.eips: dict[str, Eip] = {}
        self.networks: tuple[ExternalSide, ...] = ()
        # Items the schema refused (already reported): skipped here, and an EIP's name among
        # them is not reported again as unknown by the rules that name it.
        self.set_aside = set_aside or {}
        aside_eips = [item for i, item in enumerate(document.get("eips", [])) if i in self.set_aside.get("eips", ())]
        names = [item.get("name") if isinstance(item, dict) else None for item in aside_eips]
        self.set_aside_eips = {name for name in names if isinstance(name, str)}
        # One without a name could be any EIP: no rule's EIP can be called unknown then.
        self.any_eip_set_aside = any(not isinstance(name, str) for name in names)

    def items(self, section: str) -> list[tuple[int, dict[str, Any]]]:
        aside = self.set_aside.get(section, set())
        return [(i, item) for i, item in enumerate(self.doc.get(section, [])) if i not in aside]

    def build(self) -> Validated:
        external = self._external("$.external", self.doc["external"])
        more = self._more_externals()
        internal = self._internal((external, *more))
        if internal.interface == external.interface:
            self.problems.add("$.external.interface", "must differ from internal.interface")
        for gateway, field, default in (
            (external.gateway, "gateway", "0.0.0.0/0"),
            (external.gateway6, "gateway6", "::/0"),
        ):
            if gateway is not None and any(str(r.dst) == default for r in internal.routes):
                self.problems.add("$.internal.routes", f"a default route ({default}) conflicts with external.{field}")
        self.networks = (external, *more)
        eips = self._eips()
        self.eips.update((e.name, e) for e in eips)
        context = RuleContext(self.eips, internal, frozenset(self.set_aside_eips), self.any_eip_set_aside)
        index, rules = self._rules(context)
        policies, gateway_policy = qos_policies(self.doc, eips, external, self.problems)
        ha = self._ha(internal, external)
        bgp = self._bgp(internal, eips)
        scale_out = self._scale_out(external)
        if self.problems:
            raise InvalidStateError(sorted(self.problems.found, key=lambda p: p.path))
        state = DesiredState(
            internal,
            external,
            eips,
            rules["snat"],  # type: ignore[arg-type]
            rules["dnat"],  # type: ignore[arg-type]
            rules["fip"],  # type: ignore[arg-type]
            qos_policies=policies,
            qos_policy=gateway_policy,
            ha=ha,
            more_externals=more,
            bgp=bgp,
            scale_out=scale_out,
        )
        return Validated(self.doc, state, index)

    def _rules(self, context: RuleContext) -> tuple[RuleIndex, dict[RuleKind, tuple[Rule, ...]]]:
        """Every rule folded into empty indexes, in document order, section by section
        (FIPs after DNAT rules: a FIP needs its EIP alone)."""
        index = RuleIndex()
        accepted: dict[RuleKind, tuple[Rule, ...]] = {}
        for kind in RULE_KINDS:
            rules = []
            for i, item in self.items(kind):
                # A rule with a taken name or address is still checked (every problem is
                # listed); the state is refused anyway.
                index.claim_name(kind, item["name"], i, self.problems)
                if kind == "fip":
                    index.claim_fip_address(item, i, self.problems)
                rule = RULE_CHECKS[kind](item, i, context, self.problems)
                if rule is not None and index.add(rule, i, self.problems):
                    rules.append(rule)
            accepted[kind] = tuple(rules)
        return index, accepted

    def _ha(self, internal: InternalSide, external: ExternalSide) -> HaConfig | None:
        if "ha" not in self.doc:
            return None
        ha = parse_ha(self.doc["ha"], (internal.interface, external.interface), self.problems)
        ipv6 = [str(a) for a in (*internal.addresses, *external.addresses) if a.version == 6]
        ipv6 += [str(e.v6ip) for e in self.eips.values() if e.v6ip is not None]
        if ipv6 or self.networks[1:]:
            # keepalived's instance moves the IPv4 addresses of one external network.
            what = f"IPv6 addresses ({', '.join(ipv6[:3])})" if ipv6 else "several external networks"
            self.problems.add("$.ha", f"an HA pair moves IPv4 addresses on one external network; this state has {what}")
        return ha

    def _bgp(self, internal: InternalSide, eips: tuple[Eip, ...]) -> BgpConfig | None:
        if "bgp" not in self.doc:
            return None
        own = [a.ip for n in self.networks for a in n.addresses] + [a.ip for a in internal.addresses]
        own += [a for e in eips for a in e.addresses]
        return parse_bgp(self.doc["bgp"], self.networks, own, self.problems, paired="ha" in self.doc)

    def _scale_out(self, external: ExternalSide) -> ScaleOutConfig | None:
        if "scaleOut" not in self.doc:
            return None
        if "ha" in self.doc:
            self.problems.add("$.scaleOut", "cannot be combined with ha (an active/standby pair)")
        config = parse_scale_out(self.doc["scaleOut"], self.eips, [n.interface for n in self.networks], self.problems)
        ipv6 = [str(a) for a in external.addresses if a.version == 6]
        ipv6 += [str(e.v6ip) for e in self.eips.values() if e.v6ip is not None]
        if ipv6 or self.networks[1:]:
            what = f"IPv6 addresses ({', '.join(ipv6[:3])})" if ipv6 else "several external networks"
            self.problems.add(
                "$.scaleOut", f"scaling out moves IPv4 EIPs on one external network; this state has {what}"
            )
        return config

    # addresses -------------------------------------------------------------------------

    def address(self, path: str | tuple[str | int, ...], text: str) -> IPAddress | None:
        return self.problems.parsed(path, usable_address, text)

    def interface_address(self, path: str, text: str) -> IPInterface | None:
        try:
            interface: IPInterface = IPv6Interface(text) if ":" in text else IPv4Interface(text)
        except (AddressValueError, NetmaskValueError) as err:
            self.problems.add(path, f"not a valid {family_name(text)} address/prefix: {err}")
            return None
        if self.address(path, str(interface.ip)) is None:
            return None
        # IPv6 has no broadcast address, and its subnet-router anycast address is a host's.
        if (
            interface.version == 4
            and interface.network.prefixlen < 31
            and interface.ip
            in (
                interface.network.network_address,
                interface.network.broadcast_address,
            )
        ):
            self.problems.add(path, f"{interface.ip} is the network or broadcast address of {interface.network}")
            return None
        return interface

    def network(self, path: str, text: str) -> IPNetwork | None:
        return self.problems.parsed(path, parse_network, text)

    def duplicates(self, section: str, items: list[tuple[int, dict[str, Any]]], field: str) -> None:
        seen: dict[Any, int] = {}
        for index, item in items:
            if field not in item:
                continue
            key = item[field]
            if key in seen:
                self.problems.item(section, index, field, f"duplicates {section}[{seen[key]}] ({key!r})")
            else:
                seen[key] = index

    # sections --------------------------------------------------------------------------

    def _internal(self, externals: tuple[ExternalSide, ...]) -> InternalSide:
        section = self.doc["internal"]
        addresses = tuple(
            a
            for i, text in enumerate(section["addresses"])
            if (a := self.interface_address(f"$.internal.addresses[{i}]", text)) is not None
        )
        routes: list[Route] = []
        seen: dict[IPNetwork, int] = {}
        for i, route in enumerate(section.get("routes", ())):
            path = f"$.internal.routes[{i}]"
            dst = self.network(f"{path}.dst", route["dst"])
            via = self.address(f"{path}.via", route["via"])
            if dst is None or via is None:
                continue
            if dst in seen:
                self.problems.add(f"{path}.dst", f"duplicates internal.routes[{seen[dst]}] ({dst})")
                continue
            seen[dst] = i
            if not any(via in a.network for a in addresses):
                self.problems.add(f"{path}.via", f"nexthop {via} is not in the subnet of any internal address")
                continue
            # A wider route is harmless (the connected route is more specific); an equal one
            # would replace it and a narrower one would take part of the external subnet.
            clash = next(
                (
                    a.network
                    for external in externals
                    for a in external.addresses
                    if a.version == dst.version and dst.subnet_of(a.network)  # type: ignore[arg-type]
                ),
                None,
            )
            if clash is not None:
                self.problems.add(f"{path}.dst", f"{dst} lies inside the external subnet {clash}")
                continue
            routes.append(Route(dst, via))
        return InternalSide(section["interface"], addresses, tuple(routes))

    def _external(self, path: str, section: dict[str, Any]) -> ExternalSide:
        addresses = tuple(
            a
            for i, text in enumerate(section["addresses"])
            if (a := self.interface_address(f"{path}.addresses[{i}]", text)) is not None
        )
        gateway = None
        if "gateway" in section:
            gateway = self.address(f"{path}.gateway", section["gateway"])
        gateway6 = None
        if "gateway6" in section:
            gateway6 = self._gateway6(f"{path}.gateway6", section["gateway6"])
        assert gateway is None or isinstance(gateway, IPv4Address)
        return ExternalSide(section["interface"], addresses, gateway, gateway6, section.get("name", PRIMARY_NETWORK))

    def _more_externals(self) -> tuple[ExternalSide, ...]:
        """`externals`: more external networks, each with a name and an interface of its own."""
        networks = [self._external(f"$.externals[{i}]", item) for i, item in enumerate(self.doc.get("externals", []))]
        names = {self.doc["external"].get("name", PRIMARY_NETWORK): "external"}
        interfaces = {self.doc["external"]["interface"]: "external", self.doc["internal"]["interface"]: "internal"}
        for i, network in enumerate(networks):
            path = f"$.externals[{i}]"
            if network.name in names:
                self.problems.add(f"{path}.name", f"{network.name!r} is already the name of {names[network.name]}")
            if network.interface in interfaces:
                self.problems.add(
                    f"{path}.interface", f"{network.interface} is already {interfaces[network.interface]}'s"
                )
            names.setdefault(network.name, f"externals[{i}]")
            interfaces.setdefault(network.interface, f"externals[{i}]")
        return tuple(networks)

    def _eip_network(self, index: int, item: dict[str, Any], addresses: tuple[IPAddress, ...]) -> str | None:
        """The network an EIP lives on: the one it names, else the first whose subnet
        contains one of its addresses, else `external`."""
        if "externalSubnet" in item:
            if not any(n.name == item["externalSubnet"] for n in self.networks):
                known = ", ".join(repr(n.name) for n in self.networks)
                self.problems.add(("eips", index, "externalSubnet"), f"names no external network (known: {known})")
                return None
            return str(item["externalSubnet"])
        return next((n.name for n in self.networks if any(n.contains(a) for a in addresses)), self.networks[0].name)

    def _gateway6(self, path: str, text: str) -> IPv6Address | None:
        # A router's link-local address is the usual IPv6 nexthop; the route names the interface.
        try:
            if IPv6Address(text).is_link_local:
                return IPv6Address(text)
        except AddressValueError:
            pass
        address = self.address(path, text)
        assert address is None or isinstance(address, IPv6Address)
        return address

    def _eips(self) -> tuple[Eip, ...]:
        items = self.items("eips")
        self.duplicates("eips", items, "name")
        # Parsed, not as text: FD00:115:0::200 is fd00:115::200, and two EIPs on one address
        # would put their rules under one map key.
        holders: dict[IPAddress, int] = {}
        eips = []
        for i, item in items:
            if "v4ip" not in item and "v6ip" not in item:
                self.problems.add(("eips", i, "v4ip"), "required field is missing (an EIP needs v4ip, v6ip or both)")
                # Still an EIP by name: its rules are not reported again for naming no EIP.
                self.eips[item["name"]] = Eip(item["name"], None)
                continue
            v4 = self.address(("eips", i, "v4ip"), item["v4ip"]) if "v4ip" in item else None
            v6 = self.address(("eips", i, "v6ip"), item["v6ip"]) if "v6ip" in item else None
            for field, address in (("v4ip", v4), ("v6ip", v6)):
                if address is not None and holders.setdefault(address, i) != i:
                    spelled = "" if item[field] == str(address) else f", that is {address}"
                    self.problems.item(
                        "eips", i, field, f"duplicates eips[{holders[address]}] ({item[field]!r}{spelled})"
                    )
            if ("v4ip" in item and v4 is None) or ("v6ip" in item and v6 is None):
                continue
            assert (v4 is None or isinstance(v4, IPv4Address)) and (v6 is None or isinstance(v6, IPv6Address))
            network = self._eip_network(i, item, tuple(a for a in (v4, v6) if a is not None))
            if network is not None:
                eips.append(Eip(item["name"], v4, v6, network, item.get("qosPolicy"), item.get("bgp", False)))
        return tuple(eips)
