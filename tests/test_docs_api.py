"""The API reference covers the public API: every name in ``invops.__all__`` and in the
``__all__`` of the public submodules has an autosummary entry on a page of ``docs/api/``, and no
entry names something that is not public."""

from __future__ import annotations

import re
import types
from pathlib import Path

import invops

API = Path(__file__).resolve().parents[1] / "docs" / "api"


def documented_names() -> set[str]:
    """Full names of the autosummary entries, resolved against each page's currentmodule."""
    names = set()
    for page in sorted(API.glob("*.rst")):
        module = "invops"
        in_table = False
        for line in page.read_text().splitlines():
            if m := re.match(r"\.\. currentmodule:: (\S+)", line):
                module, in_table = m.group(1), False
            elif line.startswith(".. autosummary::"):
                in_table = True
            elif in_table and (m := re.match(r"   ([A-Za-z_][\w.]*)\s*$", line)):
                names.add(f"{module}.{m.group(1)}")
            elif in_table and line and not line.startswith(" "):
                in_table = False
    return names


def public_names() -> set[str]:
    """``invops.X`` for every non-module name of ``invops.__all__``; ``invops.sub.X`` for the
    names of each public submodule's ``__all__`` that the top level does not export."""
    top = {getattr(invops, n) for n in invops.__all__}
    names = set()
    for name in invops.__all__:
        obj = getattr(invops, name)
        if isinstance(obj, types.ModuleType):
            for sub in obj.__all__:
                if getattr(obj, sub) not in top:
                    names.add(f"invops.{name}.{sub}")
        else:
            names.add(f"invops.{name}")
    return names


def test_every_public_name_has_an_api_page():
    missing = sorted(public_names() - documented_names())
    assert not missing, (
        "public names without an entry in docs/api/*.rst (add each to the autosummary table of "
        f"its group): {missing}"
    )


def test_api_pages_name_only_public_objects():
    stale = sorted(documented_names() - public_names())
    assert not stale, f"docs/api/*.rst documents names that are not public: {stale}"


def test_every_public_submodule_is_introduced():
    text = "\n".join(p.read_text() for p in API.glob("*.rst"))
    modules = [n for n in invops.__all__ if isinstance(getattr(invops, n), types.ModuleType)]
    missing = [m for m in modules if f".. automodule:: invops.{m}" not in text]
    assert not missing, f"public submodules without an automodule section in docs/api: {missing}"


def test_the_parser_sees_the_tables():
    # guards the two tests above against a parser that finds nothing (they would pass vacuously)
    names = documented_names()
    assert "invops.NetworkGlow" in names and "invops.operators.as_operator" in names
    assert len(names) > 100, len(names)
