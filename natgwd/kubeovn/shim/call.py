"""One nat-gateway.sh call, whoever carries it out: its command and rules parsed into an
edit of the desired-state document, and its answer (exit code, stdout, stderr). The file
protocol (natgwd.kubeovn.shim.cli) and natgwd's edit endpoint (natgwd.kubeovn.shim.service)
both go through here, so a call means the same on either path."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from natgwd.kubeovn.shim import lbsvc
from natgwd.kubeovn.shim.edits import EDITS, Context, Doc, Op, working_copy
from natgwd.kubeovn.shim.grammar import IPTABLES_VERSION, USAGE, ShimError, words
from natgwd.kubeovn.shim.init import Links, init_op
from natgwd.kubeovn.shim.qos import QOS_EDITS
from natgwd.state.validation import InvalidStateError

Edit = Callable[[Doc | None, Context], Doc]


@dataclass(frozen=True)
class Script:
    """One of Kube-OVN's scripts: its usage, its `init` and its other subcommands."""

    usage: str
    init: Callable[[Sequence[str], Links], Edit]
    edits: Mapping[str, Callable[[str], Op]]


NAT_GATEWAY = Script(USAGE, init_op, {**EDITS, **QOS_EDITS})
# lb-svc.sh is `nat-gateway.sh lb-svc COMMAND RULE...`: the same transport, its own edits.
LB_SVC = Script(lbsvc.USAGE, lbsvc.lb_init, lbsvc.EDITS)


@dataclass(frozen=True)
class Reply:
    code: int
    out: str
    err: str


@dataclass(frozen=True)
class Call:
    command: str
    rules: tuple[str, ...]
    edit: Edit

    @property
    def echo(self) -> str:
        """The script's first line of output: the call itself."""
        return f"{self.command} {' '.join(self.rules)}\n"

    def refused(self, error: ShimError, warnings: Sequence[str] = ()) -> Reply:
        return Reply(error.code, self.echo, warning_lines(warnings) + f"{error}\n")

    def done(self, warnings: Sequence[str], summary: str) -> Reply:
        return Reply(0, self.echo + f"{summary}\n", warning_lines(warnings))


def refusal(err: InvalidStateError) -> ShimError:
    """The error of a call whose result natgwd would not accept."""
    problems = "; ".join(str(p) for p in err.problems)
    return ShimError(f"natgwd: refused, the desired state would be invalid: {problems}")


def warning_lines(warnings: Sequence[str]) -> str:
    return "".join(f"Warning: natgwd: {warning}\n" for warning in warnings)


def prepare(argv: Sequence[str], links: Callable[[], Links]) -> Call | Reply:
    """The call `argv` (command, then rules) stands for, or the answer of one that needs no
    state (help, get-iptables-version, an unknown command, a malformed rule). `lb-svc` first:
    a call of lb-svc.sh."""
    script = NAT_GATEWAY
    if argv and argv[0] == lbsvc.COMMAND:
        script, argv = LB_SVC, argv[1:]
    if not argv:
        return Reply(1, "", script.usage + "\n")
    command, rules = argv[0], tuple(words(argv[1:]))
    echo = f"{command} {' '.join(rules)}\n"
    if command in ("help", "-h", "--help"):
        return Reply(0, script.usage + "\n", "")
    if command == "get-iptables-version" and script is NAT_GATEWAY:
        return Reply(0, echo + IPTABLES_VERSION + "\n", "")
    if command != "init" and command not in script.edits:
        return Reply(1, "", f"natgwd: unknown command {command!r}\n{script.usage}\n")
    try:
        if command == "init":
            return Call(command, rules, script.init(rules, links()))
        if not rules:
            raise ShimError(f"natgwd: {command} needs a rule (see `help`)")
        ops = [script.edits[command](rule) for rule in rules]
    except ShimError as error:
        return Reply(error.code, echo, f"{error}\n")

    def edit(doc: Doc | None, ctx: Context) -> Doc:
        assert doc is not None  # edited() refuses a rule before `init`
        for op in ops:
            op(doc, ctx)
        return doc

    return Call(command, rules, edit)


def edited(call: Call, doc: Doc | None, ctx: Context, state_path: Path) -> Doc:
    """The document after the call; `doc` itself is left as it was (a refused call, or one
    whose result natgwd refuses, changes nothing). No document: only `init` makes one, at
    `state_path`."""
    if doc is None and call.command != "init":
        # Kube-OVN's own words first: someone who knows the original script recognises them.
        raise ShimError(f"nat gateway not initialized: {state_path} does not exist (`init` creates it)")
    return call.edit(working_copy(doc, ctx.lookup) if doc is not None else None, ctx)
