"""Turn the bytes of a desired-state file into a DesiredState, or into every reason it
is not one.

The bytes are decoded (natgwd.state.decode), then checked in two passes: the shipped JSON
Schema checks the shape (fields, types, formats: natgwd.state.shape), then the semantic pass
checks what a schema cannot say (addresses, references, conflicts, reachability:
natgwd.state.semantics). The semantic pass relies on the shape, so it runs on the document without
the rules and EIPs the schema refused; when the schema refuses anything else (the
interfaces, the version, the document itself), it is skipped and the error says so.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from natgwd.state.decode import check_depth, decode
from natgwd.state.model import DesiredState
from natgwd.state.problems import InvalidStateError, Problem
from natgwd.state.semantics import Semantics, Validated
from natgwd.state.shape import MAX_PROBLEMS, may_hold_control_characters, shape_problems


def load_state(raw: bytes) -> DesiredState:
    """Parse and validate a desired-state document; raise InvalidStateError listing every problem."""
    return validate(raw).state


def validate(raw: bytes) -> Validated:
    """load_state, keeping the decoded document and the rules' indexes."""
    document = decode(raw)
    check_depth(document)
    return validate_document(document, may_hold_control_characters(raw))


def validate_document(document: Any, control_characters_possible: bool = True) -> Validated:
    """Validate a decoded document (the full path: every rule is checked)."""
    problems = shape_problems(document, control_characters_possible)
    if not problems:
        return Semantics(document).build()
    if len(problems) > MAX_PROBLEMS:
        raise InvalidStateError(problems, skipped=f"{_SEMANTIC_CHECKS} were skipped: too many problems")
    set_aside, elsewhere = _refused_items(problems)
    if elsewhere:
        paths = sorted({p.path for p in elsewhere})
        first = paths[0] + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")
        skipped = f"{_SEMANTIC_CHECKS} were skipped: they need {first} fixed first"
        raise InvalidStateError(problems, skipped=skipped)
    try:
        Semantics(document, set_aside).build()
    except InvalidStateError as err:
        problems = sorted(problems + err.problems, key=lambda p: p.path)
    if len(problems) > MAX_PROBLEMS:
        problems = [*problems[:MAX_PROBLEMS], Problem("$", f"more problems not listed (stopped at {MAX_PROBLEMS})")]
    raise InvalidStateError(problems)


_SEMANTIC_CHECKS = "the checks of addresses, EIP references, duplicates, conflicts and reachability"


def _refused_items(problems: list[Problem]) -> tuple[dict[str, set[int]], list[Problem]]:
    """The indices of the rules and EIPs the schema refused, per section, and the problems
    that lie outside any one of them."""
    set_aside: dict[str, set[int]] = defaultdict(set)
    elsewhere: list[Problem] = []
    for problem in problems:
        if problem.section is not None and problem.index is not None:
            set_aside[problem.section].add(problem.index)
        else:
            elsewhere.append(problem)
    return set_aside, elsewhere
