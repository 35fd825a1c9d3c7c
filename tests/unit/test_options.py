"""`natgwd run`'s connection-watching options: defaults, and bad values named."""

from __future__ import annotations

import argparse

import pytest

from natgwd.cli import parser
from natgwd.observability.options import selection, watch_factory


def run_args(*extra: str) -> argparse.Namespace:
    return parser().parse_args(["run", "--state", "/nonexistent.json", *extra])


def test_connection_events_on_and_translation_log_off_by_default() -> None:
    args = run_args()
    assert args.connection_events and args.translation_log == ""
    assert watch_factory(args) is not None
    assert watch_factory(run_args("--no-connection-events")) is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--translation-log-rule", "nat/x"), "--translation-log-rule 'nat/x': not KIND/NAME"),
        (("--translation-log-rule", "snat/"), "--translation-log-rule 'snat/': not KIND/NAME"),
        (("--translation-log-rate", "0"), "--translation-log-rate must be greater than 0"),
        (("--no-connection-events", "--translation-log", "-"), "--translation-log needs --connection-events"),
        (("--translation-log", "/nonexistent-dir/log"), "--translation-log /nonexistent-dir/log: cannot open"),
    ],
)
def test_bad_options_are_named(extra: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        watch_factory(run_args(*extra))


def test_selection_of_rules_and_eips() -> None:
    chosen = selection(["snat/my-snat", "dnat/d1"], ["10.0.0.1"])
    assert chosen.rules == {"snat/my-snat", "dnat/d1"} and chosen.eips == {"10.0.0.1"}
