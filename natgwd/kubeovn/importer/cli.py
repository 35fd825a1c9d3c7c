"""`natgwd import`'s command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from natgwd.io.files import write_atomically
from natgwd.kubeovn.importer.gateway import import_objects
from natgwd.kubeovn.importer.objects import ImportFailedError, ImportOptions, read_inputs


def render(state: dict[str, Any]) -> str:
    return json.dumps(state, indent=2) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="FILE",
        help="kubectl get -o yaml|json output: files, directories of *.yaml/*.yml/*.json, '-' for stdin (default)",
    )
    parser.add_argument("-g", "--gateway", help="the VpcNatGateway to import (needed when the input has several)")
    parser.add_argument("-o", "--output", default="-", help="the desired-state file to write ('-': stdout, default)")
    parser.add_argument("--internal-interface", help="VPC-side interface (default: from network-status, else net1)")
    parser.add_argument("--external-interface", help="external interface (default: from network-status, else net2)")
    parser.add_argument(
        "--external-address",
        metavar="IP[/PREFIX]",
        help="the external interface's own address when no gateway pod says it (prefix: the external subnet's)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="write nothing and exit 2 when anything was not carried over (warnings)"
    )


def run(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    options = ImportOptions(args.gateway, args.internal_interface, args.external_interface, args.external_address)
    try:
        objects, findings = read_inputs(args.inputs, stdin)
        result = import_objects(objects, options)
    except ImportFailedError as err:
        print(f"natgwd import: {err}", file=sys.stderr)
        return 1
    result.findings[:0] = findings
    for finding in result.findings:
        print(f"natgwd import: {finding}", file=sys.stderr)
    state = result.state
    counts = ", ".join(f"{len(state.get(k, []))} {k}" for k in ("eips", "snat", "dnat", "fip"))
    summary = f"gateway {result.gateway}: {counts}; {len(result.warnings)} warnings"
    if args.strict and result.warnings:
        print(f"natgwd import: {summary}: nothing written (--strict)", file=sys.stderr)
        return 2
    text = render(state)
    if args.output == "-":
        stdout.write(text)
        stdout.flush()
    else:
        try:
            write_atomically(Path(args.output), text.encode())
        except OSError as err:
            print(f"natgwd import: cannot write {args.output}: {err}", file=sys.stderr)
            return 1
    print(f"natgwd import: {summary}; wrote {args.output if args.output != '-' else 'stdout'}", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="natgwd import",
        description="Write the natgwd desired state of one Kube-OVN VPC NAT gateway from its objects "
        "(VpcNatGateway, Subnets, IptablesEIP, Iptables{Snat,Dnat,FIP}Rule, the gateway pod).",
    )
    add_arguments(top)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(None if argv is None else list(argv))
    return run(args)
