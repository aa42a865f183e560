"""The code on the documentation pages runs: each page's python blocks, in order, together."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["docs/writing_your_own_layer.md"]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.parametrize("page", PAGES)
def test_page_snippets_run(page):
    blocks = python_blocks((ROOT / page).read_text())
    assert blocks, f"{page} has no python blocks"
    namespace: dict = {"__name__": "docs_snippet"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page}[block {i}]", "exec"), namespace)
