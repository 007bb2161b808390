"""Every module of the plugin API (bench/api) has its generated page in docs/api and in the
mkdocs nav, so a new module cannot land undocumented."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
API_MODULES = sorted(p.stem for p in (ROOT / "bench" / "api").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", API_MODULES)
def test_api_module_has_a_page_in_the_nav(name: str) -> None:
    page = ROOT / "docs" / "api" / f"{name}.md"
    assert page.is_file(), f"bench/api/{name}.py has no docs/api/{name}.md"
    assert f"::: ocl_bench.api.{name}" in page.read_text()
    assert f"api/{name}.md" in (ROOT / "mkdocs.yml").read_text(), f"api/{name}.md not in the nav"
