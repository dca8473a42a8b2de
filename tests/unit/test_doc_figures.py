"""The CPU figures README.md, BENCHMARKS.md and docs/SERVER.md quote come from the committed
records in ``bench/results/*.json``: one source.

A doc marks a figure with the record field it quotes, in an HTML comment right after it
(invisible when rendered)::

    an agent's next turn starts **13.0x**<!--r resume:results[1].speedup_pool_vs_reprefill-->

``resume`` is ``bench/results/resume.json``; the path walks the JSON: ``.key``, ``[i]`` (a
list index) or ``[key=value]`` (the list item whose ``key`` equals ``value``). An optional
last word scales the value: ``/1000`` (ms quoted in s) or ``*100`` (a fraction quoted in %).
Rounding: the figure must equal the record's value rounded to as many decimals as the doc
shows (``13.0x`` matches 12.95 to 13.05; ``4,096`` and ``+0.80%`` read as 4096 and 0.80).

Between ``<!-- figures -->`` and ``<!-- /figures -->`` every measured figure (a number
followed by ``x``, ``%``, `` s`` or `` ms``; not a target after ``<=``, ``>=``, ``<`` or
``>``) must carry a marker: a figure with no record there is an error, not a quote.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
DOCS = ("README.md", "BENCHMARKS.md", "docs/SERVER.md")

# A sign only where a number starts (after a space, "(", "*" or "|"): "0.96-1.01x" is a range.
NUMBER = r"(?:(?<![^\s(*|])[+-])?\d[\d,]*(?:\.\d+)?"
# A marked figure: the number, its unit, closing emphasis, then the marker.
MARKED = re.compile(
    rf"(?P<num>{NUMBER})(?P<unit>x|%| s| ms| us| MiB| MB)?\**<!--r (?P<rec>[\w-]+):(?P<path>\S+)"
    r"(?: (?P<scale>[*/]\d+))?-->"
)
# A measured figure inside a checked region (a target's bound is not one).
FIGURE = re.compile(rf"(?<![<>=] )(?<![<>=])(?<![\w.,])(?P<num>{NUMBER})(?:x(?!\w)|%| s\b| ms\b)")
REGION = re.compile(r"<!-- figures -->(?P<body>.*?)<!-- /figures -->", re.S)
STEP = re.compile(
    r"\.?(?P<key>[A-Za-z_]\w*)|\[(?P<index>\d+)\]|\[(?P<field>\w+)=(?P<value>[^\]]+)\]"
)


@dataclass(frozen=True)
class Figure:
    doc: str
    line: int
    text: str  # the figure as the doc writes it
    record: str
    path: str
    scale: str | None


@cache
def record(name: str) -> Any:
    return json.loads((RESULTS / f"{name}.json").read_text())


def resolve(value: Any, path: str) -> Any:
    """The field ``path`` names in a record (see the module docstring)."""
    pos = 0
    while pos < len(path):
        m = STEP.match(path, pos)
        if m is None:
            raise ValueError(f"bad path {path!r} at {path[pos:]!r}")
        if m["key"] is not None:
            value = value[m["key"]]
        elif m["index"] is not None:
            value = value[int(m["index"])]
        else:
            (value,) = [v for v in value if str(v[m["field"]]) == m["value"]]
        pos = m.end()
    return value


def figures(doc: str, text: str) -> list[Figure]:
    return [
        Figure(
            doc,
            text.count("\n", 0, m.start()) + 1,
            m["num"] + (m["unit"] or ""),
            m["rec"],
            m["path"],
            m["scale"],
        )
        for m in MARKED.finditer(text)
    ]


def mismatch(fig: Figure) -> str | None:
    """Why ``fig`` disagrees with its record, or None."""
    try:
        value = resolve(record(fig.record), fig.path)
    except (FileNotFoundError, KeyError, IndexError, ValueError, TypeError) as exc:
        return f"{fig.record}:{fig.path} does not resolve ({type(exc).__name__}: {exc})"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{fig.record}:{fig.path} is {value!r}, not a number"
    if fig.scale is not None:
        factor = float(fig.scale[1:])
        value = value * factor if fig.scale[0] == "*" else value / factor
    num = re.match(NUMBER, fig.text)
    assert num is not None
    quoted = num.group().replace(",", "")
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    if abs(float(quoted) - value) > 0.5 * 10**-decimals + 1e-9:
        shown = f"{value:.{decimals}f}" if math.isfinite(value) else str(value)
        return f"quotes {fig.text}, the record says {value} ({shown} at the doc's rounding)"
    return None


def unmarked(text: str) -> list[str]:
    """Measured figures inside the checked regions that carry no marker."""
    found = []
    for region in REGION.finditer(text):
        body = region["body"]
        for m in FIGURE.finditer(body):
            rest = body[m.end() :]
            if not re.match(r"\**<!--r ", rest):
                line = text.count("\n", 0, region.start("body") + m.start()) + 1
                found.append(f"line {line}: {m.group()!r}")
    return found


def doc_text(doc: str) -> str:
    return (REPO / doc).read_text()


@pytest.mark.parametrize("doc", DOCS)
def test_every_quoted_figure_equals_its_record(doc: str) -> None:
    figs = figures(doc, doc_text(doc))
    wrong = [f"{f.doc}:{f.line}: {why}" for f in figs if (why := mismatch(f)) is not None]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("doc", DOCS)
def test_every_marker_parses(doc: str) -> None:
    """A marker the pattern does not read would leave its figure unchecked."""
    text = doc_text(doc)
    written = len(re.findall(r"(?<!`)<!--r ", text))  # not an example in backticks
    assert written == len(figures(doc, text))


@pytest.mark.parametrize("doc", DOCS)
def test_every_figure_in_a_checked_region_is_marked(doc: str) -> None:
    text = doc_text(doc)
    assert REGION.search(text), f"{doc} has no <!-- figures --> region"
    missing = unmarked(text)
    assert not missing, f"{doc}: figures with no record marker:\n" + "\n".join(missing)


def test_the_docs_quote_many_records() -> None:
    """The check is not vacuous: the docs mark figures from most records."""
    figs = [f for doc in DOCS for f in figures(doc, doc_text(doc))]
    assert len(figs) >= 40
    assert {f.record for f in figs} >= {
        "resume", "workload", "multiround", "engine_overhead", "prefix", "serve", "quant"
    }  # fmt: skip


# ----------------------------------------------------------------------- negative controls


def test_a_wrong_figure_is_caught() -> None:
    text = (
        "starts **13.0x**<!--r resume:results[1].speedup_pool_vs_reprefill--> sooner; "
        "multi-round 1.00x<!--r multiround:scenarios[0].kvpool_vs_lru_total-->; "
        "kvpool 65.8 s<!--r multiround:scenarios[name=x].ways.kvpool.total_s-->; "
        "TTFT 1.31 s<!--r resume:results[context_tokens=2048].pool.p50_ms /1000-->"
    )
    figs = figures("x.md", text)
    assert [f.text for f in figs] == ["13.0x", "1.00x", "65.8 s", "1.31 s"]
    results = [mismatch(f) for f in figs]
    assert results[0] is None  # 13.0 in the record
    assert results[1] is not None and "the record says 1.12" in results[1]
    assert results[2] is not None and "does not resolve" in results[2]
    assert results[3] is None  # 1305.454 ms


def test_rounding_is_the_docs_own() -> None:
    fig = Figure("x.md", 1, "0.96x", "engine_overhead", "results[1].paired_ratio_p50", None)
    assert mismatch(fig) is None  # 0.9584
    assert mismatch(replace(fig, text="0.958x")) is None
    assert mismatch(replace(fig, text="1.0x")) is None  # one decimal: 0.9584 is 1.0
    assert mismatch(replace(fig, text="0.959x")) is not None
    assert mismatch(replace(fig, text="1.00x")) is not None  # "within 3%" read as 1.00


def test_an_unmarked_figure_in_a_region_is_caught() -> None:
    text = (
        "<!-- figures -->13.0x<!--r resume:results[1].speedup_pool_vs_reprefill--> and "
        "1.00x and <= 0.7x and 4 agents x 4 turns<!-- /figures --> 2.5x"
    )
    assert unmarked(text) == ["line 1: '1.00x'"]
