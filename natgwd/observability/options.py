"""`natgwd run`'s options for connection watching and translation logs, and the watcher
they ask for."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TextIO

import structlog

from natgwd.observability.connwatch import ConnectionWatch, MakeWatch
from natgwd.observability.endings import Endings
from natgwd.observability.translog import ACCT_SYSCTL, Selection, TransLog
from natgwd.planning.counters import Listings
from natgwd.planning.plan import RuleLabels
from natgwd.state.model import RULE_KINDS

log = structlog.get_logger("natgwd.observability.options")


def add_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--connection-events",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count open connections per rule and EIP, and SNAT port usage, from conntrack events",
    )
    run.add_argument(
        "--translation-log",
        default="",
        metavar="DEST",
        help="log each translated connection's start and end as JSON lines: '-' for stdout or a file (off by default)",
    )
    run.add_argument(
        "--translation-log-rate",
        type=float,
        default=100.0,
        metavar="LINES",
        help="at most this many translation log lines per second; the rest are counted as dropped",
    )
    run.add_argument(
        "--translation-log-rule",
        action="append",
        default=[],
        metavar="KIND/NAME",
        help="log only this rule (repeatable; with --translation-log-eip, either matches)",
    )
    run.add_argument(
        "--translation-log-eip",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="log only the rules of this EIP (repeatable)",
    )


def selection(rules: list[str], eips: list[str]) -> Selection:
    for rule in rules:
        kind, _, name = rule.partition("/")
        if kind not in RULE_KINDS or not name:
            raise ValueError(f"--translation-log-rule {rule!r}: not KIND/NAME with KIND snat, dnat or fip")
    return Selection(frozenset(rules), frozenset(eips))


def watch_factory(args: argparse.Namespace, endings: Endings | None = None) -> MakeWatch | None:
    """The watcher `args` ask for; None when connection events are off. Raises ValueError
    naming the option at fault. `endings`: where the conntrack cleaner records the
    connections natgwd ends (the translation log says why they ended)."""
    if args.translation_log_rate <= 0:
        raise ValueError("--translation-log-rate must be greater than 0")
    chosen = selection(args.translation_log_rule, args.translation_log_eip)
    if not args.connection_events:
        if args.translation_log:
            raise ValueError("--translation-log needs --connection-events")
        return None
    translog = None
    if args.translation_log:
        out = _open(args.translation_log)
        _enable_accounting()
        translog = TransLog(out, chosen, args.translation_log_rate, endings=endings)

    def make(listings: Callable[[], Listings], rule_ids: Callable[[], Mapping[RuleLabels, int]]) -> ConnectionWatch:
        return ConnectionWatch(listings, rule_ids, translog)

    return make


def _open(destination: str) -> TextIO:
    if destination == "-":
        return sys.stdout
    try:
        return Path(destination).open("a", encoding="utf-8")  # kept open for the daemon's life
    except OSError as err:
        raise ValueError(f"--translation-log {destination}: cannot open: {err.strerror}") from err


def _enable_accounting() -> None:
    """End lines carry packets and bytes only when conntrack counts them (per network
    namespace; connections opened before this have no counts)."""
    try:
        if Path(ACCT_SYSCTL).read_text().strip() != "1":
            Path(ACCT_SYSCTL).write_text("1\n")
            log.info("conntrack accounting turned on for translation logs", sysctl="net.netfilter.nf_conntrack_acct")
    except OSError as err:
        log.warning("cannot turn conntrack accounting on: end lines will lack bytes", error=str(err))
