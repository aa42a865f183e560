"""The code on the documentation pages and in the README runs: each page's python blocks, in
order, together."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import invops

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    "docs/writing_your_own_layer.md",
    "docs/user_guide/memory_free.md",
    "docs/user_guide/jacobians.md",
    "docs/user_guide/irim.md",
    "docs/user_guide/conditional.md",
    "docs/user_guide/training.md",
    "docs/user_guide/troubleshooting.md",
    "README.md",
]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_every_page_with_python_blocks_is_run():
    pages = [*ROOT.glob("docs/**/*.md"), ROOT / "README.md"]
    with_code = {str(p.relative_to(ROOT)) for p in pages if python_blocks(p.read_text())}
    assert with_code <= set(PAGES), f"pages whose snippets no test runs: {with_code - set(PAGES)}"


@pytest.mark.parametrize("page", PAGES)
def test_page_snippets_run(page):
    blocks = python_blocks((ROOT / page).read_text())
    assert blocks, f"{page} has no python blocks"
    namespace: dict = {"__name__": "docs_snippet"}
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"{page}[block {i}]", "exec"), namespace)
    finally:
        invops.set_reconstruction_check(None)  # a page may switch it on
