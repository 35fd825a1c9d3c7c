"""What a benchmark that times another natgwd tree in turn with this one needs: its
command-line arguments, checked, and a gateway whose daemon runs that tree."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from benchmarks import rulesets
from benchmarks.compare import BENCH_DIR, Context, NatgwdGateway, terminated_as_exit
from benchmarks.observe_cost import natgwd_tree, python_path
from natgwd.lab.topology import Lab


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument(
        "--baseline", type=Path, help="a natgwd source tree (e.g. main's) measured in turn with this one"
    )
    parser.add_argument("--note", help="what was measured, kept in the results")


def runnable(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """As root (the labs are network namespaces), with a baseline whose own natgwd
    `python -m natgwd` runs (not this tree's, found first on the path)."""
    if os.geteuid() != 0:
        print("needs root: it creates network namespaces", file=sys.stderr)
        return False
    if args.baseline is not None and (found := natgwd_tree(args.baseline)) != str(args.baseline.resolve()):
        parser.error(f"natgwd of the baseline would come from {found}, not {args.baseline}")
    return True


T = TypeVar("T")


def measured(args: argparse.Namespace, prefix: str, run: Callable[[Context], T]) -> T:
    """`run` in a scratch directory of its own, every daemon it started stopped after it,
    also when SIGTERM ends the benchmark."""
    with terminated_as_exit(), tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        ctx = Context(args, Path(tmp), connrate=Path(tmp) / "connrate-not-used")
        try:
            return run(ctx)
        finally:
            ctx.stop_all()


class BaselineGateway(NatgwdGateway):
    """A natgwd gateway whose daemon runs the natgwd of another tree (`source`). Put first
    among the bases of a gateway that changes what natgwd is given."""

    name = "baseline"

    def __init__(self, lab: Lab, ctx: Context, work: rulesets.Workload, source: Path) -> None:
        super().__init__(lab, ctx, work)
        self.source = source

    def setup(self) -> None:
        with python_path(self.source):
            super().setup()
