"""docs/COVERAGE.md's table of mlx-lm architectures is what this test derives from the pinned
mlx-lm's sources: it fails when the table is stale (``KVPOOL_WRITE_COVERAGE=1`` rewrites it).

Static, not a run: an architecture module's kind is the cache classes its source (and the
modules it takes its model from) names, and kvpool's rule for each. The architectures
run token-equal against mlx-lm by ``test_hybrid_mlx.py`` and ``test_attention_archs.py``
are marked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import mlx_lm.models
import pytest
from attention_configs import ATTENTION_CONFIGS
from hybrid_configs import HYBRID_CONFIGS

DOC = Path(__file__).resolve().parents[2] / "docs" / "COVERAGE.md"
BEGIN, END = "<!-- coverage -->", "<!-- /coverage -->"
MODELS = Path(mlx_lm.models.__file__).parent
CACHE_NAMES = (
    "CacheList", "ChunkedKVCache", "ArraysCache", "MambaCache", "RotatingKVCache", "KVCache"
)  # fmt: skip
IMPORT = re.compile(r"^from \.(?: import (\w+)|(\w+) import)", re.M)
KEEP = re.compile(r"keep=(?!0\b)[\w.]+")

RECURRENT = "recurrent state (ArraysCache) + attention"
# kvpool's rule per cache class, first match wins
RULES = (
    ("CacheList", "refused", "CacheList: several caches per layer"),
    ("ChunkedKVCache", "refused", "ChunkedKVCache: mlx-lm cannot batch it with history"),
    ("keep>0", "refused", "RotatingKVCache keep > 0: attention sinks"),
    ("ArraysCache", "supported", RECURRENT),
    ("MambaCache", "supported", RECURRENT),
    ("RotatingKVCache", "supported", "KVCache / RotatingKVCache (sliding window)"),
)
# "checked here": the architectures a test runs token-equal against fresh mlx-lm runs
CHECKED = {
    **dict.fromkeys(HYBRID_CONFIGS, "greedy-equal (test_hybrid_mlx)"),
    **dict.fromkeys(ATTENTION_CONFIGS, "greedy-equal (test_attention_archs)"),
}
NOT_MODULES = {"base", "cache", "rope_utils", "switch_layers", "activations", "bitlinear_layers"}


def _names(module: str, seen: set[str]) -> set[str]:
    """Cache classes named in ``module``'s source and the sibling modules it imports."""
    if module in seen or module in NOT_MODULES:
        return set()
    seen.add(module)
    path = MODELS / f"{module}.py"
    if not path.is_file():
        return set()
    text = path.read_text()
    names = {n for n in CACHE_NAMES if re.search(rf"\b{n}\b", text)}
    if KEEP.search(text):
        names.add("keep>0")
    for a, b in IMPORT.findall(text):
        names |= _names(a or b, seen)
    return names


def coverage_rows() -> list[tuple[str, str, str, str]]:
    rows = []
    for path in sorted(MODELS.glob("*.py"), key=lambda p: p.stem.lower()):
        if path.stem.startswith("_") or not re.search(r"^class Model\b", path.read_text(), re.M):
            continue
        names = _names(path.stem, set())
        verdict, why = "supported", "KVCache"
        for name, v, w in RULES:
            if name in names:
                verdict, why = v, w
                break
        if why == RECURRENT and not names & {"KVCache", "RotatingKVCache"}:
            why = "recurrent state (ArraysCache) only"
        verified = CHECKED.get(path.stem, "-")
        rows.append((path.stem, verdict, why, verified))
    return rows


def render(rows: list[tuple[str, str, str, str]]) -> str:
    lines = [
        "| architecture | kvpool | cache kind | checked here |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| `{a}` | {v} | {w} | {c} |" for a, v, w, c in rows]
    supported = sum(1 for r in rows if r[1] == "supported")
    lines += ["", f"{len(rows)} architecture modules: {supported} supported, "
              f"{len(rows) - supported} refused."]  # fmt: skip
    return "\n".join(lines)


def test_coverage_table_is_current() -> None:
    table = render(coverage_rows())
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    fresh = f"{head}{BEGIN}\n{table}\n{END}{tail}"
    if os.environ.get("KVPOOL_WRITE_COVERAGE") == "1":
        DOC.write_text(fresh)
    assert text == fresh, "docs/COVERAGE.md is stale: rerun with KVPOOL_WRITE_COVERAGE=1"


@pytest.mark.parametrize(
    ("module", "verdict"),
    [("llama", "supported"), ("qwen3_next", "supported"), ("deepseek_v32", "refused"),
     ("glm_moe_dsa", "refused"), ("llama4", "refused"), ("falcon_h1", "refused"),
     ("gemma3", "supported"), ("mamba", "supported")],
)  # fmt: skip
def test_known_architectures_classify_as_kvpool_treats_them(module: str, verdict: str) -> None:
    """Negative control for the static rule: kinds kvpool refuses come out refused, through
    the modules an architecture takes its model from (glm_moe_dsa -> deepseek_v32)."""
    assert dict((a, v) for a, v, _, _ in coverage_rows())[module] == verdict


def test_recurrent_models_without_attention_layers_say_so() -> None:
    kinds = {a: w for a, _, w, _ in coverage_rows()}
    assert {a for a, w in kinds.items() if w.endswith("only")} == {"mamba", "mamba2", "rwkv7"}
    assert kinds["qwen3_next"] == kinds["jamba"] == RECURRENT
