"""`python -m natgwd.kubeovn.shim COMMAND RULE...`: one nat-gateway.sh call. Through natgwd's
edit endpoint when natgwd takes calls (its token file exists); otherwise as an edit of the
state file (natgwd.kubeovn.shim.filestate) and a wait until natgwd has applied it."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

from natgwd.kubeovn.shim import client
from natgwd.kubeovn.shim.call import Call, Reply, prepare, warning_lines
from natgwd.kubeovn.shim.edits import Context
from natgwd.kubeovn.shim.filestate import DEFAULT_TIMEOUT, Config, transact
from natgwd.kubeovn.shim.grammar import ShimError
from natgwd.kubeovn.shim.init import KernelView, Links, delete_leftover_routes
from natgwd.kubeovn.shim.waiting import wait_applied


def file_call(call: Call, config: Config, links: Links) -> Reply:
    """The call as an edit of the state file, answered once natgwd applied it."""
    started = time.monotonic()
    ctx = Context(config.gateway_v4)
    try:
        written = transact(config, call, ctx, started + (config.timeout if config.timeout > 0 else DEFAULT_TIMEOUT))
    except ShimError as error:
        return call.refused(error)
    try:
        if config.timeout > 0 and not wait_applied(config, written, started + config.timeout):
            raise ShimError(
                f"natgwd: not applied within {config.timeout:g}s (generation {written.generation}, "
                f"sha256 {written.digest[:12]}; is natgwd running with --applied-state {config.applied}?)"
            )
        if ctx.route_dels:
            delete_leftover_routes(ctx, links)
    except ShimError as error:
        return call.refused(error, ctx.warnings)
    what = "applied" if written.changed else "nothing to change"
    return call.done(ctx.warnings, f"natgwd: {what} (generation {written.generation}, sha256 {written.digest[:12]})")


def run(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    links: Links | None = None,
) -> int:
    """One nat-gateway.sh call; returns its exit code."""
    env = os.environ if env is None else env
    kernel = links or KernelView()
    call = prepare(argv, lambda: kernel)
    if isinstance(call, Reply):
        reply = call
    else:
        try:
            config = Config.from_env(env)
            if config.token.exists():
                timeout = config.timeout if config.timeout > 0 else DEFAULT_TIMEOUT
                reply = client.request(config.token, argv, config.gateway_v4, timeout)
            else:
                reply = file_call(call, config, kernel)
                if env.get("NATGWD_EDIT_TOKEN"):
                    # Named but absent: a wrong path, or natgwd not started yet. Either way,
                    # say which way the call went.
                    note = f"no edit endpoint token at {config.token} (NATGWD_EDIT_TOKEN): edited {config.state}"
                    reply = Reply(reply.code, reply.out, warning_lines([note]) + reply.err)
        except ShimError as error:
            reply = call.refused(error)
    (stdout or sys.stdout).write(reply.out)
    (stderr or sys.stderr).write(reply.err)
    return reply.code


def main(argv: Sequence[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv)
