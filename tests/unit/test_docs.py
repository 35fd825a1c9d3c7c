"""README.md and docs/ stay true: every JSON example of a desired state passes natgwd's
validation (what `natgwd check` runs), every metric they name is one natgwd exports and
every metric natgwd exports is named, every relative link and anchor resolves, and the
README links every file of docs/.

A JSON example that is not a whole valid state says so in an HTML comment on the line
before its fence (GitHub does not show it):

    <!-- docs-test: fragment -->   keys of a state (braces optional), merged into
                                   examples/seed.json (lists of named objects by name)
    <!-- docs-test: invalid -->    a state that validation must refuse
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from natgwd.state.validation import InvalidStateError, load_state
from tests.unit.test_monitoring import exported_names

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
SEED = ROOT / "examples" / "seed.json"
MARKERS = ("fragment", "invalid")


@dataclass(frozen=True)
class Block:
    """A fenced code block: where it starts, its language, text and docs-test marker."""

    path: Path
    line: int
    language: str
    text: str
    marker: str | None

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text().split("\n")
    previous = ""  # the last non-blank line outside a block
    start: int | None = None
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            if start is None:
                start, language = number, line[3:].strip()
                marker = re.fullmatch(r"<!-- docs-test: (\S+) -->", previous)
            else:
                text = "\n".join(lines[start : number - 1])
                yield Block(path, start, language, text, marker.group(1) if marker else None)
                start, previous = None, ""
        elif start is None and line.strip():
            previous = line.strip()


def prose(path: Path) -> str:
    """The file without its code blocks."""
    kept, inside = [], False
    for line in path.read_text().split("\n"):
        if line.startswith("```"):
            inside = not inside
        elif not inside:
            kept.append(line)
    return "\n".join(kept)


JSON_BLOCKS = [block for path in DOCS for block in blocks(path) if block.language == "json"]


def merged(base: dict[str, Any], fragment: dict[str, Any]) -> dict[str, Any]:
    """`base` with the fragment's keys; a list of named objects is merged by name."""
    result = dict(base)
    for key, value in fragment.items():
        old = result.get(key)
        named = isinstance(value, list) and isinstance(old, list)
        if named and all(isinstance(item, dict) and "name" in item for item in [*old, *value]):
            result[key] = list(({item["name"]: item for item in old} | {item["name"]: item for item in value}).values())
        else:
            result[key] = value
    return result


def document(block: Block) -> bytes:
    if block.marker != "fragment":
        return block.text.encode()
    text = block.text.strip()
    fragment = json.loads(text if text.startswith("{") else "{" + text + "}")
    return json.dumps(merged(json.loads(SEED.read_text()), fragment)).encode()


def test_the_docs_have_state_examples_of_every_kind_the_test_knows() -> None:
    assert len(JSON_BLOCKS) >= 3
    assert {block.marker for block in JSON_BLOCKS} >= {None, "fragment"}
    unknown = [f"{block}: {block.marker}" for block in JSON_BLOCKS if block.marker not in (None, *MARKERS)]
    assert not unknown, f"unknown docs-test markers (known: {MARKERS})"


@pytest.mark.parametrize("block", JSON_BLOCKS, ids=str)
def test_json_example_is_a_valid_state(block: Block) -> None:
    try:
        load_state(document(block))
    except InvalidStateError as err:
        if block.marker != "invalid":
            pytest.fail(f"{block}: natgwd check refuses it:\n" + "\n".join(map(str, err.problems)))
    else:
        assert block.marker != "invalid", f"{block}: marked invalid, but natgwd check accepts it"


def test_fragments_are_merged_by_name() -> None:
    base = {"eips": [{"name": "a", "v4ip": "1"}, {"name": "b"}], "snat": [{"name": "s"}], "version": 1}
    fragment = {"eips": [{"name": "a", "qosPolicy": "q"}], "qosPolicy": "g"}
    assert merged(base, fragment) == {
        "eips": [{"name": "a", "qosPolicy": "q"}, {"name": "b"}],
        "snat": [{"name": "s"}],
        "version": 1,
        "qosPolicy": "g",
    }


# A metric name; `natgwd_x_{a,b}_total` names two, and `_c_total` right after a name (as
# in "`natgwd_x_a_total`, `_c_total`") names one with as many of its last words replaced.
METRIC = re.compile(r"\bnatgwd_[a-z0-9_]*(?:\{[a-z0-9_]+(?:,[a-z0-9_]+)+\}[a-z0-9_]*)?")
SHORTENED = re.compile(r"(natgwd_[a-z0-9_]+)`((?:, `_[a-z0-9_]+`)+)")


def named_metrics(text: str) -> set[str]:
    names = set()
    for found in METRIC.findall(text):
        if braces := re.search(r"\{(.*)\}", found):
            names |= {found[: braces.start()] + word + found[braces.end() :] for word in braces.group(1).split(",")}
        else:
            names.add(found)
    for full, shortened in SHORTENED.findall(text):
        for suffix in re.findall(r"`_([a-z0-9_]+)`", shortened):
            words = suffix.split("_")
            names.add("_".join(full.split("_")[: -len(words)] + words))
    return names


def test_metric_names_are_read_whole() -> None:
    text = '`natgwd_a_{x,y}_total` `natgwd_b_sent_total`, `_received_total`, `natgwd_c{role}` natgwd_d{k="v"}'
    assert named_metrics(text) == {
        "natgwd_a_x_total",
        "natgwd_a_y_total",
        "natgwd_b_sent_total",
        "natgwd_b_received_total",
        "natgwd_c",
        "natgwd_d",
    }


def documented_metrics() -> dict[str, set[str]]:
    return {str(path.relative_to(ROOT)): named_metrics(path.read_text()) for path in DOCS}


def test_every_metric_named_in_the_docs_is_exported() -> None:
    exported = exported_names()
    unknown = {path: sorted(names - exported) for path, names in documented_metrics().items() if names - exported}
    assert not unknown, f"metrics natgwd does not export: {unknown}"


def test_every_exported_metric_is_in_the_docs() -> None:
    named = set().union(*documented_metrics().values())
    # A histogram's and prometheus_client's own series are documented by the family's name.
    derived = re.compile(r"_(bucket|count|sum|created)$")
    exported = {name for name in exported_names() if not derived.search(name)}
    # A counter's family name without _total (the TYPE line of prometheus_client) is not a series.
    exported = {name for name in exported if name + "_total" not in exported}
    assert exported <= named, f"exported but not in README.md or docs/: {sorted(exported - named)}"


def anchors(path: Path) -> set[str]:
    """GitHub's ids of the file's headings: lower case, punctuation dropped, spaces to
    '-', a repeated id numbered."""
    ids: set[str] = set()
    for line in prose(path).split("\n"):
        if heading := re.match(r"#+ (.*)", line):
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            candidate, repeated = slug, 0
            while candidate in ids:
                repeated += 1
                candidate = f"{slug}-{repeated}"
            ids.add(candidate)
    return ids


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in LINK.findall(prose(path)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not fetched
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(f"{target}: no heading with that id")
    assert not broken, f"{path.relative_to(ROOT)}: {broken}"


def test_the_readme_links_every_file_of_docs() -> None:
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in LINK.findall(README.read_text())}
    assert set(DOCS[1:]) <= linked, sorted(str(path) for path in set(DOCS[1:]) - linked)
