"""natgwd.kernel.nft's errors: the kernel's errno, read once from libnftables' message (it
gives no errno beside it), so that callers tell a missing object by `is_not_found()`."""

from __future__ import annotations

import errno

import pytest

from natgwd.kernel.fake import FakeNft
from natgwd.kernel.nft import NftError, parse_table
from natgwd.planning.table import AddTable, DeleteChain, DeleteElements, Transaction


@pytest.mark.parametrize(
    ("message", "code"),
    [
        # As libnftables 1.0.6 words them (list, then delete, of a table that is not there).
        ("Error: No such file or directory\nlist table inet natgwd\n                ^^^^^^", errno.ENOENT),
        ("Error: Could not process rule: No such file or directory\ndelete table inet natgwd", errno.ENOENT),
        ("Error: Could not process rule: File exists\nadd element inet natgwd dnat_rule { 1 : 2 }", errno.EEXIST),
        ("Error: Could not process rule: Device or resource busy\ndelete chain inet natgwd x", errno.EBUSY),
        ("Error: syntax error, unexpected string\nadd rule inet natgwd x bogus", None),
        # Only the first line says what the kernel refused: a rule's text below may say anything.
        ('Error: syntax error\nadd rule inet natgwd x comment "No such file or directory"', None),
    ],
)
def test_the_errno_of_a_libnftables_message(message: str, code: int | None) -> None:
    err = NftError.from_libnftables(message)
    assert (err.errno, str(err)) == (code, message)
    assert err.is_not_found() == (code == errno.ENOENT)
    assert err.is_already_exists() == (code == errno.EEXIST)


def test_the_fake_refuses_with_the_kernels_errno() -> None:
    fake = FakeNft()
    with pytest.raises(NftError) as missing_table:
        fake.apply(Transaction([DeleteChain("prerouting")]))
    assert missing_table.value.is_not_found()
    fake.apply(Transaction([AddTable()]))
    with pytest.raises(NftError) as missing_set:
        fake.apply(Transaction([DeleteElements("dnat_rule", ("1",))]))
    assert missing_set.value.is_not_found()


def test_an_error_without_an_errno_is_not_a_missing_object() -> None:
    assert not NftError("refused by the test").is_not_found()


def test_the_members_of_a_share_chain_from_the_kernels_json() -> None:
    """`nft -j list table` output of a share chain (libnftables 1.0.6): its first rule sets
    the ct mark from `numgen random mod 2 map { 0 : 5, 1 : 6 }`."""
    numgen = {"numgen": {"mode": "random", "mod": 2, "offset": 0}}
    objects = [
        {"chain": {"family": "inet", "table": "natgwd", "name": "share_abc", "handle": 1}},
        {
            "rule": {
                "chain": "share_abc",
                "expr": [
                    {
                        "mangle": {
                            "key": {"ct": {"key": "mark"}},
                            "value": {"map": {"key": numgen, "data": {"set": [[1, 6], [0, 5]]}}},
                        }
                    }
                ],
            }
        },
        {"rule": {"chain": "share_abc", "expr": [{"match": {"op": "==", "left": {}, "right": {}}}]}},
        {"rule": {"chain": "prerouting", "expr": [{"mangle": {"key": {}, "value": {"map": {"data": {"set": []}}}}}]}},
    ]
    assert parse_table(objects).shares == {"share_abc": (5, 6)}
