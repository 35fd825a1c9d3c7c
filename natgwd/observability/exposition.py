"""The Prometheus text exposition shared by runtime's and observability's collectors:
label values escaped, families written as pieces to join, rule labels kept between
scrapes. Here, below both, so that observability need not import the daemon."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, repeat
from operator import itemgetter
from typing import NamedTuple

from natgwd.planning.counters import CountedElement
from natgwd.planning.plan import RuleLabels


class RuleLabel(NamedTuple):
    comment: str  # the connections element's, which the rest was made from
    text: str  # kind="…",name="…",eip="…"
    id: int  # the mark, as a number
    eip: str


class RuleLabelTexts:
    """The label text of every rule, by its id (mark) as the counting sets list it, kept
    from one scrape to the next: made again only when an element's comment changes.
    Replaced whole at each scrape, so it holds only the rules listed last, and concurrent
    scrapes at worst make a text twice. While the rules stay the same, each scrape gets
    the same mapping back, so that what a caller derives from it can be kept too."""

    def __init__(self) -> None:
        self._known: dict[str, RuleLabel] = {}

    def of(self, connections: Sequence[CountedElement]) -> dict[str, RuleLabel]:
        """mark -> label, for the connections elements whose comment names a rule (in
        no particular order: the kernel lists them in another order after changes)."""
        known = self._known
        # Every element known, with the same comment (no rule changed since): checked in C loops.
        if len(connections) == len(known) and list(map(_LISTED_COMMENT, connections)) == list(
            map(_LABEL_COMMENT, map(known.get, map(_MARK, connections), repeat(_UNKNOWN)))
        ):
            return known
        found: dict[str, RuleLabel] = {}
        made = 0
        for mark, _, _, comment in connections:
            label = known.get(mark)
            if label is None or label.comment != comment:
                rule = RuleLabels.from_comment(comment)
                if rule is None:
                    continue
                label = RuleLabel(comment, labels_text(rule), int(mark, 0), rule.eip)
                made += 1
            found[mark] = label
        if not made and len(found) == len(known):
            return known
        self._known = found
        return found


_MARK, _LISTED_COMMENT, _LABEL_COMMENT = itemgetter(0), itemgetter(3), itemgetter(0)
_UNKNOWN = RuleLabel("\0", "", 0, "")  # a listed comment never holds a NUL


def labels_text(rule: RuleLabels) -> str:
    return f'kind="{rule.kind}",name="{escaped(rule.name)}",eip="{escaped(rule.eip)}"'


def family_text(
    family: tuple[str, str, str],
    labels: Sequence[str],
    closings: Iterable[str] | None,
    values: Sequence[str],
    opening: str = "{",
) -> Iterator[str]:
    """A family's HELP and TYPE lines and its samples, as pieces to join (three or four
    per sample, each piece made once: joining is the one loop over 100,000 samples):
    sample i is the name, `opening`, labels[i], the i-th of `closings` (None: the labels
    are closed already), values[i] and a newline."""
    name, kind, help_text = family
    header = f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"
    if not labels:
        return iter((header,))
    # The newline ending a sample and the start of the next are one piece.
    separators = chain(repeat(f"\n{name}{opening}", len(labels) - 1), ("\n",))
    if closings is None:
        samples = chain.from_iterable(zip(labels, values, separators, strict=True))
    else:
        samples = chain.from_iterable(zip(labels, closings, values, separators, strict=False))  # closings may repeat
    return chain((header + name + opening,), samples)


def escaped(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value
