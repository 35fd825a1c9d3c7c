"""The edit service keeps the indexes of its document's lists from call to call
(natgwd.kubeovn.shim.lookup), so that a call looks up names and rules without scanning
them: a call gives what it would give from a fresh scan of the document, whatever the
calls before it did (rules appended, lists filtered, EIPs copied on write, calls refused
by the edit or by natgwd), and a call among 10,000 rules reads only a few of them."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from natgwd.kubeovn.naming import dnat_name
from natgwd.kubeovn.shim.call import Call, Reply, edited, prepare
from natgwd.kubeovn.shim.edits import Context, Doc, compact
from natgwd.kubeovn.shim.grammar import ShimError
from natgwd.kubeovn.shim.protocol import Request
from natgwd.kubeovn.shim.service import EditService
from natgwd.state.problems import InvalidStateError
from tests.unit.fakes import UPSTREAM, FakeLinks
from tests.unit.test_shim import EIP1, EIP2, EIP3, VM1, VM2
from tests.unit.test_shim_endpoint import SEED


def serve(service: EditService, argv: tuple[str, ...], refuse: bool = False) -> Reply:
    """One call, carried out as the daemon's reconciling thread does; `refuse`: natgwd
    refuses the document the call makes."""

    def apply(_doc: Doc) -> None:
        if refuse:
            raise InvalidStateError([])

    replies: list[Reply] = []
    caller = threading.Thread(target=lambda: replies.append(service.submit(Request(UPSTREAM, argv))))
    caller.start()
    while caller.is_alive():
        service.serve_pending(apply)
        caller.join(0.01)
    return replies[0]


def fresh(document: Doc, argv: tuple[str, ...]) -> Doc | None:
    """The document after the call, its lookups made by scanning (a new Lookup); None
    when the edit refuses it."""
    call = prepare(argv, FakeLinks)
    assert isinstance(call, Call)
    try:
        return compact(edited(call, document, Context(UPSTREAM), Path("state.json")))
    except ShimError:
        return None


def service(tmp_path: Path, document: Doc) -> EditService:
    edits = EditService(tmp_path / "state.json", lambda: None, lambda _data: None, links=FakeLinks)
    edits.accepted(json.dumps(document).encode(), "a" * 64)
    return edits


# (call, natgwd refuses the document it makes)
CALLS: list[tuple[tuple[str, ...], bool]] = [
    (("eip-add", f"{EIP1}/21"), False),
    (("eip-add", f"{EIP2}/21"), False),
    (("dnat-add", f"{EIP2},80,tcp,{VM1},80"), False),  # its name is taken: suffixed
    (("dnat-add", f"{EIP1},81,tcp,{VM1},81"), True),  # refused by natgwd: its name is not taken
    (("dnat-add", f"{EIP1},81,tcp,{VM1},81"), False),
    (("dnat-add", f"{EIP1},81,tcp,{VM2},81"), False),  # refused by the edit: the identity is taken
    (("dnat-add", f"{EIP1},81,tcp,{VM1},81"), False),  # nothing to change
    (("dnat-del", f"{EIP1},81,tcp"), False),  # the list filtered: a new list
    (("dnat-add", f"{EIP1},81,tcp,{VM2},81"), False),
    (("nft-dnat-map-add", f"{EIP1},90,tcp,{VM1}:90@{VM2}:90"), False),
    (("nft-dnat-map-add", f"{EIP1},90,tcp,{VM2}:90"), False),
    (("floating-ip-add", f"{EIP2},{VM1}"), False),
    (("floating-ip-add", f"{EIP2},{VM2}"), False),  # refused by the edit
    (("eip-egress-qos-add", f"{EIP1},1,20,1"), False),  # the EIP copied on write
    (("dnat-add", f"{EIP1},82,tcp,{VM1},82"), False),
    (("snat-add", f"{EIP3},172.20.10.0/24"), False),  # adds EIP3
    (("eip-del", EIP1), False),  # and its rules
    (("eip-add", f"{EIP1}/21"), False),
    (("dnat-add", f"{EIP1},81,tcp,{VM1},81"), False),
    (("floating-ip-add", f"{EIP1},{VM2}"), True),
    (("floating-ip-add", f"{EIP1},{VM2}"), False),
]


def test_a_call_gives_what_a_scan_of_the_document_gives(tmp_path: Path) -> None:
    seed: Doc = {
        **SEED,
        "eips": [{"name": "seeded", "v4ip": "10.115.55.250"}],
        # Named as the DNAT of EIP2's tcp/80 will be: that one gets a suffix.
        "dnat": [dnat(dnat_name(EIP2, "tcp", "80"), "seeded", "8080")],
    }
    edits = service(tmp_path, seed)
    for argv, refuse in CALLS:
        before = edits.document
        assert before is not None
        wanted = fresh(before, argv)
        reply = serve(edits, argv, refuse)
        if wanted is None or refuse:
            assert reply.code != 0, argv
            assert edits.document is before, argv
        else:
            assert reply.code == 0, (argv, reply)
            assert edits.document == wanted, argv
    names = [d["name"] for d in edits.document["dnat"]]  # type: ignore[index]
    assert f"{dnat_name(EIP2, 'tcp', '80')}-2" in names
    assert dnat_name(EIP1, "tcp", "81") in names


def dnat(name: str, eip: str, port: str) -> dict[str, Any]:
    return {"name": name, "eip": eip, "protocol": "tcp", "externalPort": port, "internalIp": VM1, "internalPort": "80"}


class Counted(dict[str, Any]):
    """A rule that counts the reads of its fields."""

    reads = 0

    def get(self, key: str, default: Any = None) -> Any:
        Counted.reads += 1
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        Counted.reads += 1
        return super().__getitem__(key)


def test_a_call_among_10000_rules_reads_a_few_of_them(tmp_path: Path) -> None:
    eips = [{"name": f"eip-{n}", "v4ip": f"10.115.{48 + n // 250}.{n % 250 + 1}"} for n in range(100)]
    rules = [Counted(dnat(f"dnat-{n}", f"eip-{n % 100}", str(1000 + n))) for n in range(10000)]
    edits = service(tmp_path, {**SEED, "eips": eips})
    edits.document["dnat"] = rules  # type: ignore[index]  # natgwd's own objects, as after a reconcile
    assert serve(edits, ("dnat-add", "10.115.48.1,1,tcp,172.20.10.9,80")).code == 0  # indexes the lists
    Counted.reads = 0
    for port in (2, 3, 4):
        assert serve(edits, ("dnat-add", f"10.115.48.1,{port},tcp,172.20.10.9,80")).code == 0
    # eip-0's 100 rules (the identity is looked for among them), not the 10,000.
    assert Counted.reads <= 3 * 100 * 4, Counted.reads
    assert len(edits.document["dnat"]) == 10004  # type: ignore[index]
