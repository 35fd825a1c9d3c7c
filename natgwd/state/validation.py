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
import re
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from ipaddress import (
    AddressValueError,
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    NetmaskValueError,
)
from typing import Any, TypeVar

import fastjsonschema
import jsonschema

from natgwd.ha.config import HaConfig, parse_ha
from natgwd.qos.validation import qos_policies
from natgwd.state.memo import RoundMemo
from natgwd.state.model import (
    PRIMARY_NETWORK,
    RULE_KINDS,
    DesiredState,
    DnatRule,
    DnatType,
    Eip,
    ExternalSide,
    FipRule,
    InternalSide,
    IPAddress,
    IPInterface,
    IPNetwork,
    PortRange,
    Protocol,
    Route,
    SnatRule,
)

T = TypeVar("T")

MAX_FILE_BYTES = 32 * 1024 * 1024  # ~200,000 rules; parsing holds several times this


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


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


def load_state(raw: bytes) -> DesiredState:
    """Parse and validate a desired-state document; raise InvalidStateError listing every problem."""
    document = _decode(raw)
    # JSON text cannot hold a raw control character in a string (the decoder refuses
    # one), only an escape, which needs a backslash; DEL may stand raw.
    problems = _shape_problems(document, control_characters_possible=b"\\" in raw or b"\x7f" in raw)
    for memo in _SEMANTIC_MEMOS:
        memo.next_round()
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
    item_path = re.compile(r"\$\.(" + "|".join(ITEM_SECTIONS) + r")\[(\d+)\]")
    set_aside: dict[str, set[int]] = defaultdict(set)
    elsewhere: list[Problem] = []
    for problem in problems:
        if match := item_path.match(problem.path):
            set_aside[match[1]].add(int(match[2]))
        else:
            elsewhere.append(problem)
    return set_aside, elsewhere


# --- decoding -------------------------------------------------------------------------


class _DuplicateKeyError(ValueError):
    pass


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(f"duplicate key {key!r} in one object")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _decode(raw: bytes) -> Any:
    if len(raw) > MAX_FILE_BYTES:
        raise InvalidStateError([Problem("$", f"file is larger than {MAX_FILE_BYTES} bytes")])
    if not raw.strip():
        raise InvalidStateError([Problem("$", "file is empty")])
    if b"\x00" in raw:
        raise InvalidStateError([Problem("$", f"file contains a NUL byte at offset {raw.index(0)}")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidStateError([Problem("$", f"file is not UTF-8: {err.reason} at byte {err.start}")]) from None
    try:
        document = json.loads(text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        reason = f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        raise InvalidStateError([Problem("$", reason)]) from None
    except _DuplicateKeyError as err:
        raise InvalidStateError([Problem("$", str(err))]) from None
    except (ValueError, RecursionError) as err:
        # ValueError: NaN/Infinity, integers too long to convert. RecursionError: nesting.
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise InvalidStateError([Problem("$", f"not valid JSON: {reason}")]) from None
    _check_depth(document)
    return document


def _check_depth(document: Any) -> None:
    """Refuse nesting the format never has: jsonschema and error messages recurse into it."""
    level, depth = [document], 0
    while level := [
        child
        for node in level
        if isinstance(node, dict | list)
        for child in (node.values() if isinstance(node, dict) else node)
    ]:
        depth += 1
        if depth > MAX_DEPTH:
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


def _json_path(parts: Any) -> str:
    path = "$"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _definition_of(subschema: dict[str, Any]) -> str | None:
    for name, definition in schema()["definitions"].items():
        if definition is subschema or any(definition is s for s in definition.get("oneOf", ())):
            return str(name)
    # A pattern error carries the inner schema of a definition: find it by identity.
    for name, definition in schema()["definitions"].items():
        if definition.get("pattern") == subschema.get("pattern") and "pattern" in subschema:
            return str(name)
    return None


ITEM_SECTIONS = ("eips", *RULE_KINDS)  # sections whose items are checked one by one


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


class _ItemCache:
    """Rules that passed the schema in the previous document, by their content. A file
    change typically touches a few of thousands of rules; the rest need no second look."""

    def __init__(self) -> None:
        self.passed: set[tuple[str, Hashable]] = set()


_item_cache = _ItemCache()


def _item_key(item: Any) -> Hashable:
    """A rule's content: its fields and values with their types (1 and true are equal in
    Python, and only one of them is a port). A rule holding a list or an object, which no
    valid rule does, gets a key of its own, so it is always checked."""
    if not isinstance(item, dict):
        return object()
    values = tuple(item.values())
    key = (tuple(item), values, tuple(map(type, values)))
    try:
        hash(key)
    except TypeError:
        return object()
    return key


def _control_characters(document: Any) -> Iterator[Problem]:
    """Strings with control characters (a trailing newline slips past a `$` in the
    schema's patterns, which Python matches before a final newline)."""
    stack: list[tuple[Any, str]] = [(document, "$")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str) and any(ord(c) < 0x20 or ord(c) == 0x7F for c in node):
            yield Problem(path, "contains a control character")
        elif isinstance(node, dict):
            stack.extend((value, f"{path}.{key}") for key, value in node.items())
        elif isinstance(node, list):
            stack.extend((value, f"{path}[{i}]") for i, value in enumerate(node))


def _shape_problems(document: Any, control_characters_possible: bool = True) -> list[Problem]:
    top, item_validators = _validators()
    fast_checks = _fast_item_checks()
    problems: list[Problem] = []
    if control_characters_possible:
        problems += itertools.islice(_control_characters(document), MAX_PROBLEMS)
    for error in itertools.islice(top.iter_errors(document), MAX_PROBLEMS):
        problems.extend(_explain(error, _json_path(error.absolute_path)))
    passed: set[tuple[str, Hashable]] = set()
    for section in ITEM_SECTIONS:
        items = document.get(section) if isinstance(document, dict) else None
        if not isinstance(items, list):
            continue
        for index, item in enumerate(items):
            if len(problems) >= MAX_PROBLEMS:
                break
            key = (section, _item_key(item))
            if key in _item_cache.passed or _passes(fast_checks[section], item):
                passed.add(key)
                continue
            errors = list(item_validators[section].iter_errors(item))
            for error in errors:
                problems.extend(_explain(error, _json_path([section, index, *error.absolute_path])))
            if not errors:
                passed.add(key)
    _item_cache.passed = passed
    if len(problems) >= MAX_PROBLEMS:
        problems = [*problems[:MAX_PROBLEMS], Problem("$", f"more problems not listed (stopped at {MAX_PROBLEMS})")]
    return sorted(set(problems), key=lambda p: (p.path, p.reason))


def _passes(check: Callable[[Any], Any], item: Any) -> bool:
    try:
        check(item)
    except fastjsonschema.JsonSchemaException:
        return False
    return True


def _explain(error: jsonschema.ValidationError, path: str) -> list[Problem]:
    kind = error.validator
    value = error.validator_value
    if kind == "additionalProperties":
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - allowed)
        known = ", ".join(sorted(allowed))
        return [Problem(f"{path}.{key}", f"unknown field (allowed here: {known})") for key in extra]
    if kind == "required":
        missing = [key for key in value if key not in error.instance]
        return [Problem(f"{path}.{key}", "required field is missing") for key in missing]
    if kind == "type":
        return [Problem(path, f"must be {'an' if value in ('object', 'array', 'integer') else 'a'} {value}")]
    if kind == "const":
        return [Problem(path, f"must be {json.dumps(value)} (the only supported version)")]
    if kind == "enum":
        return [Problem(path, "must be one of " + ", ".join(json.dumps(v) for v in value))]
    if kind == "pattern":
        definition = _definition_of(error.schema)
        meaning = _PATTERN_MEANING.get(definition or "", f"must match {value}")
        field = path.rsplit(".", 1)[-1]
        if field in _IPV6_FIELD and isinstance(error.instance, str) and ":" in error.instance:
            meaning += f" (an IPv6 address goes in {_IPV6_FIELD[field]}, beside {field})"
        return [Problem(path, meaning)]
    if kind == "maxLength":
        definition = _definition_of(error.schema)
        meaning = _PATTERN_MEANING.get(definition or "", f"must be at most {value} characters")
        return [Problem(path, f"{meaning} (at most {value} characters)")]
    if kind == "oneOf":
        if _definition_of(error.schema) == "decimal":
            return [Problem(path, 'must be a number of at least 0, as a number or a string such as "2.5"')]
        return [Problem(path, 'must be a port 1-65535 (integer or string) or a range "first-last"')]
    if kind == "maxItems":
        return [Problem(path, f"has more than {value} items")]
    return [Problem(path, error.message)]


# --- semantics ------------------------------------------------------------------------


def _family_name(text: str) -> str:
    # The schema admits only dotted IPv4 or text with a colon: a colon means IPv6.
    return "IPv6" if ":" in text else "IPv4"


def _usable_address(text: str) -> IPAddress | str:
    """The address, or why it is not a usable unicast one."""
    try:
        address: IPAddress = IPv6Address(text) if ":" in text else IPv4Address(text)
    except AddressValueError as err:
        return f"not a valid {_family_name(text)} address: {err}"
    if address.is_multicast or address.is_unspecified or address.is_loopback or address.is_reserved:
        return f"{address} is not a usable unicast address"
    if address.version == 6 and (address.is_link_local or address.ipv4_mapped is not None):
        # Link-local addresses are not unique beyond one link; mapped ones are IPv4 in disguise.
        return f"{address} is not a usable unicast address (link-local or IPv4-mapped)"
    return address


def _network(text: str) -> IPNetwork | str:
    kind = IPv6Network if ":" in text else IPv4Network
    host = 128 if ":" in text else 32
    try:
        return kind(text if "/" in text else f"{text}/{host}")
    except (AddressValueError, NetmaskValueError) as err:
        return f"not a valid {_family_name(text)} network: {err}"
    except ValueError:
        return f"has host bits set (did you mean {kind(text, strict=False)}?)"


def _port_range(typed: tuple[type, int | str | float]) -> PortRange | str:
    _, value = typed
    if isinstance(value, float):  # JSON Schema draft 7 counts 80.0 as an integer
        return f"must be a whole number or a string, not {value!r}"
    first_text, _, last_text = str(value).partition("-")
    first, last = int(first_text), int(last_text or first_text)
    if not (1 <= first <= 65535 and 1 <= last <= 65535):
        return "ports must be between 1 and 65535"
    if first > last:
        return f"range {value} is reversed (first port after last)"
    return PortRange(first, last)


def _dnat_rule(fields: tuple[str, str, Protocol, int | str, int | str, type, type, str, DnatType]) -> DnatRule:
    """The rule of fields already checked (their values are parsed again from the memos)."""
    name, eip, protocol, external, internal, external_type, internal_type, address, kind = fields
    external_port = _PORT_RANGES((external_type, external))
    internal_port = _PORT_RANGES((internal_type, internal))
    internal_ip = _ADDRESSES(address)
    assert isinstance(external_port, PortRange) and isinstance(internal_port, PortRange)
    assert isinstance(internal_ip, IPv4Address | IPv6Address)
    return DnatRule(name, eip, protocol, external_port, internal_ip, internal_port, kind)


# Values (or the reason they are refused) by their text: at 10,000 rules parsing them again
# for every change costs more than everything else validation does.
_ADDRESSES = RoundMemo(_usable_address)
_NETWORKS = RoundMemo(_network)
_PORT_RANGES = RoundMemo(_port_range)
_DNAT_RULES = RoundMemo(_dnat_rule)
_SEMANTIC_MEMOS = (_ADDRESSES, _NETWORKS, _PORT_RANGES, _DNAT_RULES)


class _Semantics:
    """Checks that need the whole document; collects every problem before raising."""

    def __init__(self, document: dict[str, Any], set_aside: dict[str, set[int]] | None = None) -> None:
        self.doc = document
        self.problems: list[Problem] = []
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

    def fail(self, path: str, reason: str) -> None:
        self.problems.append(Problem(path, reason))

    def build(self) -> DesiredState:
        external = self._external("$.external", self.doc["external"])
        more = self._more_externals()
        internal = self._internal((external, *more))
        if internal.interface == external.interface:
            self.fail("$.external.interface", "must differ from internal.interface")
        for gateway, field, default in (
            (external.gateway, "gateway", "0.0.0.0/0"),
            (external.gateway6, "gateway6", "::/0"),
        ):
            if gateway is not None and any(str(r.dst) == default for r in internal.routes):
                self.fail("$.internal.routes", f"a default route ({default}) conflicts with external.{field}")
        self.networks = (external, *more)
        eips = self._eips()
        self.eips.update((e.name, e) for e in eips)
        eip_names = set(self.eips)
        snat = self._snat(eip_names)
        dnat = self._dnat(eip_names, internal)
        fip = self._fip(eip_names, internal, dnat)
        policies, gateway_policy = qos_policies(self.doc, eips, external, self.fail)
        ha = self._ha(internal, external)
        if self.problems:
            raise InvalidStateError(sorted(self.problems, key=lambda p: p.path))
        return DesiredState(
            internal,
            external,
            eips,
            snat,
            dnat,
            fip,
            qos_policies=policies,
            qos_policy=gateway_policy,
            ha=ha,
            more_externals=more,
        )

    def _ha(self, internal: InternalSide, external: ExternalSide) -> HaConfig | None:
        if "ha" not in self.doc:
            return None
        ha, problems = parse_ha(self.doc["ha"], (internal.interface, external.interface))
        for path, reason in problems:
            self.fail(path, reason)
        ipv6 = [str(a) for a in (*internal.addresses, *external.addresses) if a.version == 6]
        ipv6 += [str(e.v6ip) for e in self.eips.values() if e.v6ip is not None]
        if ipv6 or self.networks[1:]:
            # keepalived's instance moves the IPv4 addresses of one external network.
            what = f"IPv6 addresses ({', '.join(ipv6[:3])})" if ipv6 else "several external networks"
            self.fail("$.ha", f"an HA pair moves IPv4 addresses on one external network; this state has {what}")
        return ha

    # addresses -------------------------------------------------------------------------

    def address(self, path: str, text: str) -> IPAddress | None:
        result: IPAddress | str = _ADDRESSES(text)
        if isinstance(result, str):
            self.fail(path, result)
            return None
        return result

    def interface_address(self, path: str, text: str) -> IPInterface | None:
        try:
            interface: IPInterface = IPv6Interface(text) if ":" in text else IPv4Interface(text)
        except (AddressValueError, NetmaskValueError) as err:
            self.fail(path, f"not a valid {_family_name(text)} address/prefix: {err}")
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
            self.fail(path, f"{interface.ip} is the network or broadcast address of {interface.network}")
            return None
        return interface

    def network(self, path: str, text: str) -> IPNetwork | None:
        result: IPNetwork | str = _NETWORKS(text)
        if isinstance(result, str):
            self.fail(path, result)
            return None
        return result

    def port_range(self, path: str, value: int | str) -> PortRange | None:
        # Typed: 80, 80.0 and "80" are equal keys otherwise, and only two are valid.
        return self._parsed(path, _PORT_RANGES((type(value), value)))

    def _parsed(self, path: str, result: T | str) -> T | None:
        if isinstance(result, str):
            self.fail(path, result)
            return None
        return result

    def duplicates(self, section: str, items: list[tuple[int, dict[str, Any]]], field: str) -> None:
        seen: dict[Any, int] = {}
        for index, item in items:
            if field not in item:
                continue
            key = item[field]
            if key in seen:
                self.fail(f"$.{section}[{index}].{field}", f"duplicates {section}[{seen[key]}] ({key!r})")
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
                self.fail(f"{path}.dst", f"duplicates internal.routes[{seen[dst]}] ({dst})")
                continue
            seen[dst] = i
            if not any(via in a.network for a in addresses):
                self.fail(f"{path}.via", f"nexthop {via} is not in the subnet of any internal address")
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
                self.fail(f"{path}.dst", f"{dst} lies inside the external subnet {clash}")
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
                self.fail(f"{path}.name", f"{network.name!r} is already the name of {names[network.name]}")
            if network.interface in interfaces:
                self.fail(f"{path}.interface", f"{network.interface} is already {interfaces[network.interface]}'s")
            names.setdefault(network.name, f"externals[{i}]")
            interfaces.setdefault(network.interface, f"externals[{i}]")
        return tuple(networks)

    def _eip_network(self, path: str, item: dict[str, Any], addresses: tuple[IPAddress, ...]) -> str | None:
        """The network an EIP lives on: the one it names, else the first whose subnet
        contains one of its addresses, else `external`."""
        if "externalSubnet" in item:
            if not any(n.name == item["externalSubnet"] for n in self.networks):
                known = ", ".join(repr(n.name) for n in self.networks)
                self.fail(f"{path}.externalSubnet", f"names no external network (known: {known})")
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
        self.duplicates("eips", items, "v4ip")
        self.duplicates("eips", items, "v6ip")
        eips = []
        for i, item in items:
            if "v4ip" not in item and "v6ip" not in item:
                self.fail(f"$.eips[{i}].v4ip", "required field is missing (an EIP needs v4ip, v6ip or both)")
                # Still an EIP by name: its rules are not reported again for naming no EIP.
                self.eips[item["name"]] = Eip(item["name"], None)
                continue
            v4 = self.address(f"$.eips[{i}].v4ip", item["v4ip"]) if "v4ip" in item else None
            v6 = self.address(f"$.eips[{i}].v6ip", item["v6ip"]) if "v6ip" in item else None
            if ("v4ip" in item and v4 is None) or ("v6ip" in item and v6 is None):
                continue
            assert (v4 is None or isinstance(v4, IPv4Address)) and (v6 is None or isinstance(v6, IPv6Address))
            network = self._eip_network(f"$.eips[{i}]", item, tuple(a for a in (v4, v6) if a is not None))
            if network is not None:
                eips.append(Eip(item["name"], v4, v6, network, item.get("qosPolicy")))
        return tuple(eips)

    def same_family(self, path: str, eip: str, address: IPAddress | IPNetwork) -> bool:
        """A rule translates within one family: the EIP needs an address of the family of
        the rule's internal address (checked only for an EIP that exists)."""
        found = self.eips.get(eip)
        if found is None or found.address(address.version) is not None:
            return True
        if not found.addresses:
            return False  # reported on the EIP
        field, other = ("v6ip", "IPv6") if address.version == 6 else ("v4ip", "IPv4")
        self.fail(
            path,
            f"{address} is {other} but EIP {eip!r} has no {field}; a rule translates within one "
            f"family (give the EIP a {field} or use an {'IPv4' if address.version == 6 else 'IPv6'} address)",
        )
        return False

    def known_eip(self, path: str, name: str, eip_names: set[str]) -> bool:
        if name in eip_names:
            return True
        if name not in self.set_aside_eips and not self.any_eip_set_aside:
            self.fail(path, f"names EIP {name!r}, which is not in eips")
        return False

    def reachable(self, path: str, address: IPAddress, internal: InternalSide) -> bool:
        if internal.reaches(address):
            return True
        self.fail(path, f"{address} is in no internal address's subnet and no internal route")
        return False

    def _snat(self, eip_names: set[str]) -> tuple[SnatRule, ...]:
        items = self.items("snat")
        self.duplicates("snat", items, "name")
        rules: list[SnatRule] = []
        owner: dict[IPNetwork, int] = {}
        for i, item in items:
            path = f"$.snat[{i}]"
            known = self.known_eip(f"{path}.eip", item["eip"], eip_names)
            cidr = self.network(f"{path}.internalCIDR", item["internalCIDR"])
            if cidr is None or not known or not self.same_family(f"{path}.internalCIDR", item["eip"], cidr):
                continue
            if cidr in owner:
                self.fail(f"{path}.internalCIDR", f"{cidr} is already translated by snat[{owner[cidr]}]")
                continue
            owner[cidr] = i
            rules.append(SnatRule(item["name"], item["eip"], cidr))
        return tuple(rules)

    def _dnat(self, eip_names: set[str], internal: InternalSide) -> tuple[DnatRule, ...]:
        items = self.items("dnat")
        self.duplicates("dnat", items, "name")
        rules: list[tuple[int, DnatRule]] = []
        for i, item in items:
            path = f"$.dnat[{i}]"
            known = self.known_eip(f"{path}.eip", item["eip"], eip_names)
            external = self.port_range(f"{path}.externalPort", item["externalPort"])
            internal_port = self.port_range(f"{path}.internalPort", item["internalPort"])
            address = self.address(f"{path}.internalIp", item["internalIp"])
            if address is not None and not self.reachable(f"{path}.internalIp", address, internal):
                address = None
            if address is not None and not self.same_family(f"{path}.internalIp", item["eip"], address):
                address = None
            if external and internal_port and len(external) != len(internal_port):
                self.fail(
                    f"{path}.internalPort",
                    f"range {internal_port} has {len(internal_port)} ports but externalPort "
                    f"{external} has {len(external)}; they must be the same length",
                )
                continue
            share = item.get("type") == "share"
            if share and external and internal_port and len(external) > 1:
                self.fail(f"{path}.externalPort", "a share rule takes a single port, not a range")
                continue
            if known and external and internal_port and address:
                kind: DnatType = "share" if share else "exclusive"
                # The same rule object as in the last state for an unchanged rule: a change
                # then finds the rules that differ by identity, without hashing 10,000 of them.
                ports = item["externalPort"], item["internalPort"]
                fields = (
                    item["name"],
                    item["eip"],
                    item["protocol"],
                    *ports,
                    *map(type, ports),
                    item["internalIp"],
                    kind,
                )
                rules.append((i, _DNAT_RULES(fields)))
        self._no_overlapping_ports(rules)
        return tuple(rule for _, rule in rules)

    def _no_overlapping_ports(self, rules: list[tuple[int, DnatRule]]) -> None:
        by_identity: dict[tuple[str, int, str], list[tuple[int, DnatRule]]] = defaultdict(list)
        for index, rule in rules:
            by_identity[(rule.eip, rule.family, rule.protocol)].append((index, rule))
        for group in by_identity.values():
            group.sort(key=lambda entry: entry[1].external_port)
            widest: tuple[int, DnatRule] | None = None
            backends: dict[tuple[object, ...], int] = {}
            for index, rule in group:
                if widest and widest[1].external_port.overlaps(rule.external_port):
                    other_index, other = widest
                    if rule.type == other.type == "share" and rule.external_port == other.external_port:
                        backend = (rule.identity, rule.internal_ip, rule.internal_port)
                        if backend in backends:
                            self.fail(
                                f"$.dnat[{index}].internalIp",
                                f"backend {rule.internal_ip}:{rule.internal_port} is already in the share "
                                f"group through dnat[{backends[backend]}]",
                            )
                        backends.setdefault(backend, index)
                        continue
                    why = "" if rule.type == other.type else " (share and exclusive rules cannot share an identity)"
                    self.fail(
                        f"$.dnat[{index}].externalPort",
                        f"{rule.protocol} port {rule.external_port} on EIP {rule.eip!r} overlaps "
                        f"dnat[{other_index}] ({other.external_port}){why}",
                    )
                if rule.type == "share":
                    backends.setdefault((rule.identity, rule.internal_ip, rule.internal_port), index)
                if widest is None or rule.external_port.last > widest[1].external_port.last:
                    widest = (index, rule)

    def _fip(self, eip_names: set[str], internal: InternalSide, dnat: tuple[DnatRule, ...]) -> tuple[FipRule, ...]:
        items = self.items("fip")
        self.duplicates("fip", items, "name")
        self.duplicates("fip", items, "internalIp")
        # A dual-stack EIP may carry one FIP per family (one for its v4ip, one for its v6ip).
        dnat_eips = {(rule.eip, rule.family) for rule in dnat}
        owner: dict[tuple[str, int], int] = {}
        rules: list[FipRule] = []
        for i, item in items:
            path = f"$.fip[{i}]"
            known = self.known_eip(f"{path}.eip", item["eip"], eip_names)
            address = self.address(f"{path}.internalIp", item["internalIp"])
            if address is None or not self.reachable(f"{path}.internalIp", address, internal) or not known:
                continue
            if not self.same_family(f"{path}.internalIp", item["eip"], address):
                continue
            key = (item["eip"], address.version)
            if key in dnat_eips:
                self.fail(f"{path}.eip", f"EIP {item['eip']!r} is also used by a dnat rule; a FIP needs the EIP alone")
            elif key in owner:
                self.fail(f"{path}.eip", f"duplicates fip[{owner[key]}] ({item['eip']!r})")
            else:
                owner[key] = i
                rules.append(FipRule(item["name"], item["eip"], address))
        return tuple(rules)
