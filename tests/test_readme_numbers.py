"""Numbers the README, the docs and the default config state agree with the code behind them.

- The config example of docs/configs.md shows the embedded default's values.
- Every speed ratio README.md or a page of docs/ prints ("4x", "2.16x"; the measured figures
  live in docs/benchmarks.md) sits in a paragraph that says where it fails ("fails below
  3x"), and every such floor is one a benchmark asserts.
- bench/configs/default.toml's ratio comment states the default-step benchmark's floor.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from ocl_bench.run.config import load_config
from tests.benchmarks import test_bench_default_step, test_bench_slate, test_bench_spot_step

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
# Every page, each paragraph kept apart from the next page's.
TEXT = "\n\n".join(path.read_text(encoding="utf-8") for path in DOCUMENTS)
CONFIGS = (ROOT / "docs" / "configs.md").read_text(encoding="utf-8")
# A speed ratio: a number directly followed by 'x' and no more word ('4x4 pixels' is a size).
RATIO = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)x(?![\w])")
FLOOR = re.compile(r"fails\s+below\s+((?:\d+(?:\.\d+)?x(?:,?\s+and\s+|,\s+)?)+)")

# Every floor a benchmark asserts, by the constant that holds it.
BENCHMARK_FLOORS = {
    "test_bench_default_step.STEP_FLOOR": test_bench_default_step.STEP_FLOOR,
    "test_bench_default_step.IMAGE_FLOOR": test_bench_default_step.IMAGE_FLOOR,
    "test_bench_slate.CACHE_GAIN_FLOOR": test_bench_slate.CACHE_GAIN_FLOOR,
    **{f"test_bench_spot_step.FLOORS{k}": v for k, v in test_bench_spot_step.FLOORS.items()},
}


def _subset_mismatches(shown: dict[str, Any], resolved: dict[str, Any], at: str = "") -> list:
    out = []
    for key, value in shown.items():
        where = f"{at}{key}"
        if key not in resolved:
            out.append(f"{where}: not in the resolved default")
        elif isinstance(value, dict):
            out += _subset_mismatches(value, resolved[key], where + ".")
        elif value != resolved[key]:
            out.append(f"{where}: docs {value!r}, default {resolved[key]!r}")
    return out


def test_the_config_example_shows_the_default() -> None:
    section = CONFIGS.split("\n## The run config\n", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```toml\n(.*?)```", section, re.S)
    assert example, "no ```toml example under docs/configs.md's ## The run config"
    shown = tomllib.loads(example.group(1))
    assert len(shown) >= 5 and "train" in shown  # the example, not some other snippet
    assert _subset_mismatches(shown, load_config().to_dict()) == []


def test_the_subset_check_sees_a_stale_value() -> None:
    resolved = load_config().to_dict()
    assert _subset_mismatches({"train": {"batch_size": 16, "lr": 1.2e-3}}, resolved) == [
        f"train.batch_size: docs 16, default {resolved['train']['batch_size']}"
    ]


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def _floors(text: str) -> list[float]:
    return [float(v) for m in FLOOR.finditer(text) for v in re.findall(r"[\d.]+(?=x)", m[1])]


def test_the_documents_include_the_benchmark_page() -> None:
    assert ROOT / "docs" / "benchmarks.md" in DOCUMENTS and len(DOCUMENTS) >= 10


def test_every_documented_ratio_names_its_floor() -> None:
    unbacked = [
        f"{m[0]} in: {p.strip()[:80]}..."
        for p in _paragraphs(TEXT)
        for m in RATIO.finditer(p)
        if not FLOOR.search(p)
    ]
    assert not unbacked, "ratios without a 'fails below Nx' floor in their paragraph"


def test_every_stated_floor_is_asserted_by_a_benchmark() -> None:
    stated = _floors(TEXT)
    assert len(stated) >= 6
    unknown = sorted(set(stated) - set(BENCHMARK_FLOORS.values()))
    assert not unknown, f"documented floors no benchmark asserts: {unknown}"
    unstated = {k: v for k, v in BENCHMARK_FLOORS.items() if v not in stated}
    assert not unstated, f"benchmark floors the docs do not state: {unstated}"


def test_the_default_config_comment_states_the_benchmark_floor() -> None:
    text = (ROOT / "bench" / "configs" / "default.toml").read_text()
    comment = "\n".join(ln.lstrip("# ") for ln in text.splitlines() if ln.startswith("#"))
    assert _floors(comment) == [test_bench_default_step.STEP_FLOOR]
    assert not re.search(r"a (sixth|fifth|quarter)\b", comment)


def test_the_ratio_check_sees_a_bare_ratio() -> None:
    text = "Fast: 4.2x less.\n\n4x4 pixels, 3 rows x 2 seeds.\n\nA 3x gain; fails below\n2x."
    bare = [m[0] for p in _paragraphs(text) for m in RATIO.finditer(p) if not FLOOR.search(p)]
    assert bare == ["4.2x"] and _floors(text) == [2.0]
