"""Properties of validation and rendering over generated desired states (hypothesis).

- Every generated valid state is accepted, builds the model it describes, and renders to
  an nftables script with one known command per line whose comments are exactly the rule
  labels ("kind/name/eip") and the chain-rule tags ("natgwd:<hex>"): names cannot inject
  nftables syntax.
- Adversarial strings (quotes, semicolons, newlines, braces, '#', ...) in any string field
  are rejected at that field's path.
- Any mutation of a valid file (structural edits, textual damage, truncation) gives a
  DesiredState or an InvalidStateError whose problems all have a "$" path; nothing else.

`valid_documents()` is also used by tests/integration/test_render_kernel.py, which loads
the generated scripts into a real kernel.
"""

from __future__ import annotations

import copy
import json
import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from natgwd.lab.topology import SEED_STATE
from natgwd.planning.layout import RULE_CONNECTIONS, whole_elements
from natgwd.planning.plan import address_text, assign_ids, desired_table
from natgwd.planning.table import plan_transaction
from natgwd.state.model import DesiredState
from natgwd.state.problems import ITEM_SECTIONS, InvalidValueError
from natgwd.state.rules import require_unicast, usable_address
from natgwd.state.shape import _fast_item_checks, _validators
from natgwd.state.validation import InvalidStateError, Problem, load_state

# --- generating valid documents ---------------------------------------------------------

NAMES = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
IFNAMES = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}\Z")
EXTERNAL_NET = IPv4Network("10.115.48.0/21")
EXTERNAL_ADDRESS = "10.115.48.1/21"
# Backends: the internal subnet and a VPC network behind the internal route.
INTERNAL_POOL = [IPv4Address("172.20.10.0") + i for i in range(2, 254)] + [
    IPv4Address("10.60.0.0") + i for i in range(1, 4096)
]
_PORT = st.integers(min_value=1, max_value=65535)
EXTERNAL_NET6 = IPv6Network("fd00:115::/64")


def _six(address: str) -> str:
    """The IPv6 twin of an internal IPv4 address: 172.20.10.x -> fd00:10::x, 10.60.a.b ->
    fd00:60::a:b (one to one, so unique addresses stay unique)."""
    v4 = IPv4Address(address)
    network = IPv6Network("fd00:10::/64" if v4 in IPv4Network("172.20.10.0/24") else "fd00:60::/64")
    return str(network.network_address + (int(v4) & 0xFFFF))


def _internal_of(rule: dict[str, Any]) -> str:
    return str(rule.get("internalIp") or rule["internalCIDR"])


def _family_address(eips: dict[str, dict[str, Any]], rule: dict[str, Any]) -> str:
    """The EIP address a rule of the document translates to: the one of its family."""
    return str(eips[rule["eip"]]["v6ip" if ":" in _internal_of(rule) else "v4ip"])


def _port_value(draw: st.DrawFn, first: int, last: int) -> int | str:
    """A port or range as the file may spell it: an integer, or a string."""
    if first != last:
        return f"{first}-{last}"
    spellings: list[int | str] = [first, str(first)]
    value: int | str = draw(st.sampled_from(spellings))
    return value


def _unique_names(draw: st.DrawFn, count: int) -> list[str]:
    names: list[str] = draw(st.lists(NAMES, min_size=count, max_size=count, unique=True))
    return names


@st.composite
def valid_documents(draw: st.DrawFn, max_eips: int = 6) -> dict[str, Any]:
    """A consistent, valid desired-state document: random EIPs, SNAT CIDRs of random
    prefix lengths (bare addresses for some /32s), DNAT single ports and equal-length
    ranges laid out without overlaps, share groups, FIPs on EIPs of their own. Dual-stack
    documents give some EIPs a v6ip (a few lose their v4ip) and some rules an IPv6 twin."""
    internal_if, external_if, second_if = draw(st.lists(IFNAMES, min_size=3, max_size=3, unique=True))
    eip_count = draw(st.integers(min_value=1, max_value=max_eips))
    offsets = draw(
        st.lists(st.integers(2, EXTERNAL_NET.num_addresses - 3), min_size=eip_count, max_size=eip_count, unique=True)
    )
    eip_names = _unique_names(draw, eip_count)
    eips = [{"name": n, "v4ip": str(EXTERNAL_NET.network_address + o)} for n, o in zip(eip_names, offsets, strict=True)]
    for eip in eips:
        if draw(st.integers(0, 9)) == 0:  # now and then an EIP outside the external subnet (/32)
            eip["v4ip"] = str(IPv4Address("203.0.113.0") + draw(st.integers(1, 254)))
    assume(len({e["v4ip"] for e in eips}) == len(eips))

    def backend() -> str:
        return str(draw(st.sampled_from(INTERNAL_POOL)))

    fip_eips = [e for e in eips if draw(st.booleans()) and draw(st.booleans())]
    dnat_eips = [e for e in eips if e not in fip_eips]
    # A FIP needs an internal address of its own; DNAT backends may repeat.
    fip_ips = draw(
        st.lists(st.sampled_from(INTERNAL_POOL), min_size=len(fip_eips), max_size=len(fip_eips), unique=True)
    )
    fips = [{"eip": e["name"], "internalIp": str(ip)} for e, ip in zip(fip_eips, fip_ips, strict=True)]
    dnats: list[dict[str, Any]] = []
    for eip in dnat_eips:
        for protocol in ("tcp", "udp"):
            port = draw(st.integers(1, 65535))
            for _ in range(draw(st.integers(0, 3))):
                port += draw(st.sampled_from([0, 1, 2, 100, 30000]))
                kind = draw(st.sampled_from(["single", "range", "share"]))
                length = draw(st.integers(2, 40)) if kind == "range" else 1
                if port + length - 1 > 65535:
                    break
                base = {"eip": eip["name"], "protocol": protocol}
                if kind == "share":
                    members = draw(st.integers(1, 3))
                    ports = draw(st.lists(_PORT, min_size=members, max_size=members, unique=True))
                    for internal_port in ports:  # distinct ports: distinct backends
                        dnats.append(
                            {
                                **base,
                                "externalPort": _port_value(draw, port, port),
                                "internalIp": backend(),
                                "internalPort": _port_value(draw, internal_port, internal_port),
                                "type": "share",
                            }
                        )
                else:
                    first = draw(st.integers(1, 65536 - length))
                    rule = {
                        **base,
                        "externalPort": _port_value(draw, port, port + length - 1),
                        "internalIp": backend(),
                        "internalPort": _port_value(draw, first, first + length - 1),
                    }
                    if draw(st.booleans()) and draw(st.booleans()):
                        rule["type"] = "exclusive"
                    dnats.append(rule)
                port += length
    snat_cidrs: dict[IPv4Network, dict[str, Any]] = {}
    for _ in range(draw(st.integers(0, 6))):
        prefix = draw(st.sampled_from([0, 8, 16, 20, 24, 25, 26, 28, 30, 31, 32]))
        network = IPv4Network((draw(st.integers(0, 2**32 - 1)), prefix), strict=False)
        text = str(network.network_address) if prefix == 32 and draw(st.booleans()) else str(network)
        snat_cidrs.setdefault(network, {"eip": draw(st.sampled_from(eips))["name"], "internalCIDR": text})
    snats = list(snat_cidrs.values())
    dual = draw(st.booleans())
    if dual:
        _add_ipv6(draw, eips, snats, dnats, fips)

    for rules in (snats, dnats, fips):
        for rule, name in zip(rules, _unique_names(draw, len(rules)), strict=True):
            rule["name"] = name
    document: dict[str, Any] = {
        "version": 1,
        "internal": {
            "interface": internal_if,
            "addresses": ["172.20.10.254/24"],
            "routes": [{"dst": "10.60.0.0/16", "via": "172.20.10.1"}],
        },
        "external": {"interface": external_if, "addresses": [EXTERNAL_ADDRESS]},
    }
    if draw(st.booleans()):
        document["external"]["gateway"] = "10.115.55.254"
    if dual:
        document["internal"]["addresses"].append("fd00:10::fe/64")
        document["internal"]["routes"].append({"dst": "fd00:60::/64", "via": "fd00:10::1"})
        document["external"]["addresses"].append("fd00:115::1/64")
        if draw(st.booleans()):
            document["external"]["gateway6"] = "fd00:115::fe"
    if draw(st.integers(0, 3)) == 0:
        # A second external network; EIPs join it by name (their addresses stay in the
        # first network's subnet, so only the name can bind them).
        document["externals"] = [
            {"name": "second", "interface": second_if, "addresses": ["10.116.0.1/24"], "gateway": "10.116.0.254"}
        ]
        for eip in eips:
            if draw(st.booleans()):
                eip["externalSubnet"] = "second"
    for section, rules in (("eips", eips), ("snat", snats), ("dnat", dnats), ("fip", fips)):
        if rules or draw(st.booleans()):
            document[section] = draw(st.permutations(rules))
    return document


def _add_ipv6(
    draw: st.DrawFn,
    eips: list[dict[str, Any]],
    snats: list[dict[str, Any]],
    dnats: list[dict[str, Any]],
    fips: list[dict[str, Any]],
) -> None:
    for eip in eips:
        if draw(st.booleans()):
            eip["v6ip"] = str(EXTERNAL_NET6.network_address + int(IPv4Address(eip["v4ip"])) % 65536)
            if draw(st.integers(0, 9)) == 0:  # now and then outside the external subnet (/128)
                eip["v6ip"] = str(IPv6Address("fd00:203::") + draw(st.integers(1, 2**32)))
    with_v6 = {e["name"] for e in eips if "v6ip" in e}
    assume(len({e["v6ip"] for e in eips if "v6ip" in e}) == len(with_v6))
    twins = {id(rule) for rules in (dnats, fips) for rule in rules if rule["eip"] in with_v6 and draw(st.booleans())}
    dnats.extend({**rule, "internalIp": _six(rule["internalIp"])} for rule in list(dnats) if id(rule) in twins)
    fips.extend({**rule, "internalIp": _six(rule["internalIp"])} for rule in list(fips) if id(rule) in twins)
    if with_v6:
        owners = sorted(with_v6)
        cidrs: dict[IPv6Network, dict[str, Any]] = {}
        for _ in range(draw(st.integers(0, 6))):
            prefix = draw(st.sampled_from([0, 16, 48, 56, 64, 96, 112, 120, 127, 128]))
            network = IPv6Network((draw(st.integers(0, 2**128 - 1)), prefix), strict=False)
            text = str(network.network_address) if prefix == 128 and draw(st.booleans()) else str(network)
            cidrs.setdefault(network, {"eip": draw(st.sampled_from(owners)), "internalCIDR": text})
        snats.extend(cidrs.values())
    # An IPv6-only EIP: one whose rules (if any) are all IPv6.
    used_v4 = {r["eip"] for rules in (snats, dnats, fips) for r in rules if ":" not in str(_internal_of(r))}
    for eip in eips:
        if "v6ip" in eip and eip["name"] not in used_v4 and draw(st.booleans()):
            del eip["v4ip"]


def encode(document: Any) -> bytes:
    return json.dumps(document).encode()


def render(state: DesiredState) -> tuple[str, int]:
    """The from-scratch script of a state and its number of operations."""
    tx = plan_transaction(None, desired_table(state, assign_ids(state, {})))
    return tx.script(), len(tx.operations)


# --- what a generated document must become -------------------------------------------------

KNOWN_COMMAND = re.compile(
    r"^(add (table|set|map|chain|rule|element)|delete (element|set|map|chain)|flush chain) inet natgwd( |$)"
)
TAG = re.compile(r"natgwd:[0-9a-f]{16}")
COMMENT = re.compile(r'comment "([^"]*)"')


def _ports(value: int | str) -> range:
    first, _, last = str(value).partition("-")
    return range(int(first), int(last or first) + 1)


def expected_labels(document: dict[str, Any]) -> set[str]:
    eips = {e["name"]: e for e in document.get("eips", [])}
    return {
        f"{kind}/{rule['name']}/{_family_address(eips, rule)}"
        for kind in ("snat", "dnat", "fip")
        for rule in document.get(kind, [])
    }


def expected_dnat_targets(document: dict[str, Any], family: int = 4) -> dict[str, str]:
    """dnat_target (dnat_target6) as docs/kernel.md describes it: one element per external port."""
    eips = {e["name"]: e for e in document.get("eips", [])}
    targets = {}
    for rule in document.get("dnat", []):
        if rule.get("type") == "share" or (":" in rule["internalIp"]) != (family == 6):
            continue
        for external, internal in zip(_ports(rule["externalPort"]), _ports(rule["internalPort"]), strict=True):
            key = f"{_family_address(eips, rule)} . {rule['protocol']} . {external}"
            targets[key] = f"{rule['internalIp']} . {internal}"
    return targets


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_documents())
def test_generated_states_are_accepted_and_render_safely(document: dict[str, Any]) -> None:
    """Prevents: the validator refusing a consistent state, the plan mapping rules to
    the wrong elements, and names or comments breaking out of the nftables script."""
    state = load_state(encode(document))
    assert [len(state.eips), len(state.snat), len(state.dnat), len(state.fip)] == [
        len(document.get(k, [])) for k in ("eips", "snat", "dnat", "fip")
    ]

    table = desired_table(state, assign_ids(state, {}))
    assert {k: e.value for k, e in table.elements["dnat_target"].items()} == expected_dnat_targets(document)
    dual = any("v6ip" in e for e in document.get("eips", []))
    assert ("dnat_target6" in table.elements) == dual
    if dual:
        assert {k: e.value for k, e in table.elements["dnat_target6"].items()} == expected_dnat_targets(document, 6)
    labels = {e.comment for _, e in whole_elements(table.elements, RULE_CONNECTIONS)}
    assert labels == expected_labels(document)
    eips = {e["name"]: e for e in document.get("eips", [])}
    fip_in = {
        k: e.value for name in ("fip_in_target", "fip_in_target6") for k, e in table.elements.get(name, {}).items()
    }
    assert fip_in == {_family_address(eips, f): f["internalIp"] for f in document.get("fip", [])}
    for snat in document.get("snat", []):
        network = ip_network(snat["internalCIDR"])
        family = "6" if network.version == 6 else ""
        assert table.elements[f"snat{family}_p{network.prefixlen}_target"][
            address_text(network.network_address)
        ].value == _family_address(eips, snat)

    script, operations = render(state)
    lines = script.splitlines()
    assert len(lines) == operations, "an operation spans several lines"
    for line in lines:
        assert KNOWN_COMMAND.match(line), line
        assert "#" not in line, line
        assert line.count('"') % 2 == 0, line
        assert line.count("{") == line.count("}"), line
    comments = COMMENT.findall(script)
    assert set(comments) - labels == {c for c in comments if TAG.fullmatch(c)}
    assert labels <= set(comments)
    # Without its comments and quoted interface names, no line has a quote left.
    interfaces = {document["internal"]["interface"], document["external"]["interface"]}
    interfaces |= {network["interface"] for network in document.get("externals", [])}
    for line in lines:
        bare = COMMENT.sub("", line)
        for interface in interfaces:
            bare = bare.replace(f'"{interface}"', "")
        assert '"' not in bare, line


@settings(max_examples=60, deadline=None)
@given(valid_documents(), st.randoms(use_true_random=False), st.sampled_from([None, 0, 1, 4]))
def test_spelling_of_a_document_does_not_change_the_state(
    document: dict[str, Any], rng: Any, indent: int | None
) -> None:
    """Prevents: the model depending on key order or whitespace, so that a re-serialised
    (or differently formatted) ConfigMap would read as a different state."""

    def shuffled(node: Any) -> Any:
        if isinstance(node, dict):
            items = list(node.items())
            rng.shuffle(items)
            return {k: shuffled(v) for k, v in items}
        if isinstance(node, list):
            return [shuffled(v) for v in node]
        return node

    respelled = json.dumps(shuffled(document), indent=indent, separators=None if indent else (",", ":")).encode()
    assert load_state(respelled) == load_state(encode(document))


# --- adversarial strings ------------------------------------------------------------------


def string_paths(node: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    found: list[tuple[str | int, ...]] = []
    if isinstance(node, str):
        found.append(prefix)
    elif isinstance(node, dict):
        for key, value in node.items():
            found += string_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += string_paths(value, (*prefix, index))
    return found


def json_path(path: tuple[str | int, ...]) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def set_at(document: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    node: Any = document
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


# Characters no valid value contains (a '/' or ':' could still make a valid CIDR or port).
DANGEROUS = ['"', "'", ";", "\n", "\r", "{", "}", "#", "\\", " ", "\t", "$", "*", "@", "\x00", "\u2028", "[", "]"]
_SAFE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", max_size=12)
# The dangerous part is never a lone trailing newline: that case is its own test below.
ADVERSARIAL = st.builds(
    lambda head, bad, tail: head + bad + tail,
    _SAFE,
    st.lists(st.sampled_from(DANGEROUS), min_size=1, max_size=3).map("".join),
    st.text(min_size=1, max_size=12).filter(lambda t: t != "\n"),
) | st.sampled_from(
    [
        '"; flush ruleset; "',
        "x\nflush ruleset",
        'my-eip" ; delete table inet natgwd ; "',
        "} ; add rule inet natgwd prerouting drop ; {",
        "# comment",
        "a\r\nb",
        "net1 ",
        " net1",
        "80;81",
        "80-81 ",
        "10.115.55.200 ",
        "172.20.10.0/24;",
    ]
)
# Every string field of the format: the seed's, and a DNAT's optional type.
SEED_WITH_TYPE = copy.deepcopy(SEED_STATE)
SEED_WITH_TYPE["dnat"][0]["type"] = "exclusive"
SEED_STRING_PATHS = string_paths(SEED_WITH_TYPE)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SEED_STRING_PATHS), ADVERSARIAL)
@example(("dnat", 0, "name"), 'dnat01" ; flush ruleset ; "')
@example(("internal", "interface"), "net1\n;drop")
@example(("external", "interface"), 'net2" drop #')
def test_adversarial_strings_in_any_string_field_are_rejected(path: tuple[str | int, ...], value: str) -> None:
    """Prevents: a string that could change the meaning of the nftables script (quotes,
    separators, newlines, braces, comments) getting past validation in any field."""
    document = copy.deepcopy(SEED_WITH_TYPE)
    set_at(document, path, value)
    with pytest.raises(InvalidStateError) as caught:
        load_state(encode(document))
    paths = {p.path for p in caught.value.problems}
    assert json_path(path) in paths, caught.value.problems


@pytest.mark.parametrize(
    "paths",
    [
        pytest.param([("eips", 0, "name"), ("snat", 0, "eip"), ("dnat", 0, "eip")], id="eip-name"),
        pytest.param([("dnat", 0, "name")], id="dnat-name"),
        pytest.param([("snat", 0, "name")], id="snat-name"),
        pytest.param([("fip", 0, "name")], id="fip-name"),
        pytest.param([("internal", "interface")], id="internal-interface"),
        pytest.param([("external", "interface")], id="external-interface"),
        pytest.param([("dnat", 0, "externalPort")], id="port-string"),
        pytest.param([("eips", 0, "v4ip")], id="address"),
        pytest.param([("snat", 0, "internalCIDR")], id="cidr"),
        pytest.param([("dnat", 0, "protocol")], id="protocol"),
    ],
)
def test_a_trailing_newline_is_rejected(paths: list[tuple[str | int, ...]]) -> None:
    """Prevents: a value with a trailing newline passing the schema. JSON Schema patterns
    are ECMA-262 regexes, where `$` is the end of the string; Python's `re` also lets it
    match before a final newline, so "dnat01\\n" or "net1\\n" pass the name and
    interface patterns and the newline lands in the nftables script (a comment or an
    interface name split over two lines, an interface that can never exist)."""
    document = copy.deepcopy(SEED_STATE)
    for path in paths:
        node: Any = document
        for part in path:
            node = node[part]
        set_at(document, path, f"{node}\n")
    with pytest.raises(InvalidStateError) as caught:
        load_state(encode(document))
    assert json_path(paths[0]) in {p.path for p in caught.value.problems}, caught.value.problems


def test_nesting_just_under_the_parser_limit_is_an_invalid_state_error() -> None:
    """Prevents: a document that json.loads accepts but that is nested too deeply for the
    rest of validation raising anything but InvalidStateError (jsonschema's repr() of a
    value nested ~980 deep raised RecursionError, which took `natgwd run` down)."""
    base = encode(SEED_STATE)
    escaped = []
    fields = [b'"externalPort": "8888"', b'"interface": "net1"', b'"name": "my-eip"', b'"version": 1']
    for field_text in fields:
        key = field_text.split(b":")[0]
        for depth in range(700, 1000):
            raw = base.replace(field_text, key + b": " + b"[" * depth + b"]" * depth, 1)
            try:
                load_state(raw)
            except InvalidStateError:
                pass
            except RecursionError:
                escaped.append((key.decode(), depth))
    assert not escaped, f"RecursionError escaped load_state for {escaped}"


# --- mutations of valid files -------------------------------------------------------------

_near_misses = st.sampled_from(
    [
        "", "0", "1", "65535", "65536", "80-79", "80-80", "1-65535", "0-1", "0.0.0.0", "255.255.255.255",
        "172.20.10.0", "172.20.10.255/24", "1.2.3.4/0", "999.1.1.1", "01.2.3.4", "1.2.3.4/33", "net1", "net2",
        "my-eip", "my-eip2", "10.55.1.1", "224.0.0.1", "127.0.0.1", "240.0.0.1", "tcp", "udp", "share",
        "exclusive", "172.20.10.2", "10.115.55.200", "10.115.55.201", "-", "a-", "-a", "A", "x" * 64,
    ]
)  # fmt: skip
_numbers = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, -1, 65535, 65536, 70000, 2**31, 2**63, 2**64, 2**80])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([80.0, 1.5, 1e308, -0.0])
)
_scalars = st.none() | st.booleans() | _numbers | st.text(max_size=20) | _near_misses
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8) | _near_misses, inner, max_size=3),
    max_leaves=10,
)
# Bare JSON text spliced into a document (things json.dumps never writes).
_raw_tokens = st.sampled_from(
    [
        b"1e400", b"-1e400", b"NaN", b"Infinity", b"-Infinity", b"1" * 5000, b"-0", b"0x10", b"01", b"1.",
        b"'x'", b"\"\\ud800\"", b"\"\\u0000\"", b"\"\x00\"", b"\xff", b"\xc3\x28", b"\xef\xbb\xbf", b"[" * 3000,
        b"{\"a\":" * 3000, b"true", b"null", b",", b"]", b"}", b"\"\\", b"\"a\" : ", b"//", b"/*",
    ]
)  # fmt: skip


def _all_paths(node: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _all_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _all_paths(value, (*prefix, index))
    return found


def _structural(draw: st.DrawFn, document: dict[str, Any]) -> None:
    """Edit the document in place: drop, replace, insert, retype, duplicate or swap."""
    paths = _all_paths(document)
    path = draw(st.sampled_from(paths))
    how = draw(
        st.sampled_from(["drop", "replace", "near-miss", "near-miss", "insert", "retype", "duplicate", "swap", "wrap"])
    )
    if not path:
        if how in ("replace", "retype", "wrap"):
            document.clear()
            document["_"] = draw(json_values)
        return
    parent: Any = document
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    value = parent[last]
    if how == "drop":
        del parent[last]
    elif how == "replace":
        parent[last] = draw(json_values)
    elif how == "near-miss":  # a plausible value of the right type: reaches the semantic checks
        parent[last] = draw(_near_misses if isinstance(value, str) else _numbers | _near_misses)
    elif how == "insert":
        if isinstance(value, dict):
            value[draw(st.text(max_size=10) | _near_misses)] = draw(json_values)
        elif isinstance(value, list):
            value.insert(draw(st.integers(0, len(value))), draw(json_values))
        else:
            parent[last] = draw(json_values)
    elif how == "retype":
        if isinstance(value, str):
            parent[last] = int(value) if value.isdigit() else [value]
        elif isinstance(value, int):
            parent[last] = draw(st.sampled_from([str(value), float(value), [value], {"v": value}, value + 0.5]))
        elif isinstance(value, list):
            parent[last] = dict(enumerate(map(str, value))) if draw(st.booleans()) else (value[0] if value else None)
        elif isinstance(value, dict):
            parent[last] = list(value.values())
    elif how == "duplicate":
        if isinstance(parent, list):
            parent.append(copy.deepcopy(value))
        else:
            parent[f"{last}{draw(st.sampled_from(['', '2', '_', ' ']))}"] = copy.deepcopy(value)
    elif how == "swap":
        other = draw(st.sampled_from(paths))
        node: Any = document
        try:
            for part in other:
                node = node[part]
        except (KeyError, IndexError, TypeError):
            return
        parent[last] = copy.deepcopy(node)
    elif how == "wrap":
        parent[last] = draw(st.sampled_from([[value], {"value": value}, {str(last): value}]))


def _textual(draw: st.DrawFn, raw: bytes) -> bytes:
    """Damage the serialised bytes: truncate, splice, inject duplicate keys or raw tokens."""
    how = draw(
        st.sampled_from(["truncate", "insert", "delete", "flip", "duplicate-key", "token", "replace-number", "bom"])
    )
    offset = int(draw(st.floats(0, 1)) * max(len(raw) - 1, 0)) if raw else 0
    if how == "truncate":
        return raw[: offset or len(raw) // 2]
    if how == "insert":
        return raw[:offset] + draw(st.binary(min_size=1, max_size=8)) + raw[offset:]
    if how == "delete":
        return raw[:offset] + raw[offset + draw(st.integers(1, 16)) :]
    if how == "flip":
        return raw[:offset] + bytes([raw[offset] ^ draw(st.integers(1, 255))]) + raw[offset + 1 :] if raw else raw
    if how == "duplicate-key":
        # Repeat one `"key": value` pair inside its own object, textually.
        pairs = list(re.finditer(rb'"[A-Za-z0-9]+": ("[^"]*"|-?[0-9]+)', raw))
        if not pairs:
            return raw
        pair = draw(st.sampled_from(pairs))
        return raw[: pair.end()] + b", " + pair.group(0) + raw[pair.end() :]
    if how == "token":
        return raw[:offset] + draw(_raw_tokens) + raw[offset:]
    if how == "replace-number":
        numbers = list(re.finditer(rb"(?<=[:\[, ])-?[0-9]+(?=[,}\] ])", raw))
        if not numbers:
            return raw
        number = draw(st.sampled_from(numbers))
        replacement = draw(_raw_tokens | st.sampled_from([b"70000", b"0", b"-1", str(2**80).encode(), b"1e400"]))
        return raw[: number.start()] + replacement + raw[number.end() :]
    return b"\xef\xbb\xbf" + raw


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from([SEED_STATE]) | valid_documents(max_eips=3))
    document = copy.deepcopy(base)
    mode = draw(st.sampled_from(["structural", "structural", "textual", "both"]))
    if mode != "textual":
        for _ in range(draw(st.integers(1, 4))):
            _structural(draw, document)
    raw = json.dumps(document, indent=draw(st.sampled_from([None, 1]))).encode()
    if mode != "structural":
        for _ in range(draw(st.integers(1, 3))):
            raw = _textual(draw, raw)
    return raw


def _judge(raw: bytes) -> None:
    try:
        state = load_state(raw)
    except InvalidStateError as err:
        assert err.problems, "InvalidStateError without problems"
        for problem in err.problems:
            assert isinstance(problem, Problem), problem
            assert isinstance(problem.path, str) and problem.path.startswith("$"), problem
            assert isinstance(problem.reason, str) and problem.reason, problem
        str(err)  # the message renders
    else:
        assert isinstance(state, DesiredState)
        render(state)  # a state that validates can be planned


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_files())
@example(b'{"version": 1, "version": 1}')
@example(json.dumps(SEED_STATE).encode()[:-1])
@example(json.dumps(SEED_STATE).encode().replace(b'"8888"', b"1e400"))
@example(json.dumps(SEED_STATE).encode().replace(b'"8888"', str(2**80).encode()))
@example(json.dumps(SEED_STATE).encode().replace(b'"8888"', b"1" * 5000))
@example(b"[" * 100_000)
@example(b'{"a":' * 100_000)
def test_mutated_file_is_a_state_or_an_invalid_state_error(raw: bytes) -> None:
    """Prevents: any damage to a valid file escaping as an exception other than
    InvalidStateError (which would crash or wedge the daemon), or an error without a
    JSON path."""
    _judge(raw)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_files())
def test_mutated_file_is_a_state_or_an_invalid_state_error_long(raw: bytes) -> None:
    """The same property as above over many more inputs."""
    _judge(raw)


# --- the fast schema check is never laxer than jsonschema ----------------------------------

SEED_RULES = [(section, item) for section in ITEM_SECTIONS for item in SEED_STATE.get(section, [])]


@st.composite
def rule_items(draw: st.DrawFn) -> tuple[str, Any]:
    """A seed rule with one field dropped, added or replaced by a near miss or any value."""
    section, item = draw(st.sampled_from(SEED_RULES))
    item = dict(item)
    field = draw(st.sampled_from([*item, "type", "extra"]))
    how = draw(st.sampled_from(["drop", "near-miss", "number", "any"]))
    if how == "drop":
        item.pop(field, None)
    else:
        values = {"near-miss": _near_misses, "number": _numbers | st.booleans(), "any": json_values}[how]
        item[field] = draw(values)
    if draw(st.booleans()):
        return section, item
    return section, draw(st.sampled_from([[item], "x", None, 1]))


@settings(max_examples=500, deadline=None)
@given(rule_items())
@example(("dnat", {**SEED_STATE["dnat"][0], "externalPort": True}))
@example(("dnat", {**SEED_STATE["dnat"][0], "externalPort": 80.0}))
@example(("dnat", {**SEED_STATE["dnat"][0], "name": "dnat01\n"}))
def test_the_fast_schema_check_never_passes_what_jsonschema_refuses(section_and_item: tuple[str, Any]) -> None:
    """Prevents: a rule skipping the full schema check because the compiled check that
    runs first let it through while jsonschema would have refused it."""
    section, item = section_and_item
    _, item_validators = _validators()
    if _fast_item_checks()[section](item):
        assert not list(item_validators[section].iter_errors(item)), item


@given(st.one_of(st.text(max_size=20), st.ip_addresses(v=4).map(str), st.from_regex(r"[0-9.]{1,20}", fullmatch=True)))
def test_the_fast_ipv4_parser_takes_exactly_what_ipaddress_takes(text: str) -> None:
    assume(":" not in text)  # IPv6
    try:
        parsed: object = usable_address(text)
    except InvalidValueError as refused:
        parsed = str(refused)
    try:
        address = IPv4Address(text)
    except ValueError as err:
        assert parsed == f"not a valid IPv4 address: {err}"
        return
    assert parsed == address or (isinstance(parsed, str) and parsed.startswith(f"{address} is not a usable"))


@given(st.integers(0, 2**32 - 1))
@example(0)
@example(127 << 24)
@example((128 << 24) - 1)
@example((224 << 24) - 1)
@example(224 << 24)
@example(240 << 24)
@example(2**32 - 1)
def test_the_integer_unicast_check_of_ipv4_is_ipaddress_s(value: int) -> None:
    """Prevents: require_unicast's IPv4 ranges on the integer drifting from ipaddress's
    properties (an address refused, or let through, that ipaddress judges otherwise)."""
    address = IPv4Address(value)
    wanted = not (address.is_multicast or address.is_unspecified or address.is_loopback or address.is_reserved)
    try:
        require_unicast(address)
    except InvalidValueError:
        assert not wanted, address
    else:
        assert wanted, address
