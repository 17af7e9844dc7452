"""The reference pages in docs/reference/ are what scripts/reference_docs.py makes from the
registries now, and every attack and defense cites its source (docs/architecture.md, Registries)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import REPO


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    """scripts/reference_docs.py, imported in-process (scripts/ is not a package)."""
    path = REPO / "scripts" / "reference_docs.py"
    spec = importlib.util.spec_from_file_location("reference_docs", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_reference_pages_are_up_to_date(reference: ModuleType):
    stale = [str(p.relative_to(REPO)) for p in reference.stale()]
    assert not stale, f"stale reference pages {stale}: run `python scripts/reference_docs.py`"


def test_check_fails_on_a_missing_or_edited_page_and_passes_once_written(
    reference: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(reference, "OUTPUT", tmp_path)
    assert reference.main(["--check"]) == 1  # nothing written yet
    assert reference.main([]) == 0
    assert reference.main(["--check"]) == 0
    page = tmp_path / "attacks.md"
    assert "## `badnets`" in page.read_text() and "| `alpha` | a number in [0, 1] | `1.0` |" in page.read_text()
    page.write_text(page.read_text().replace("`1.0`", "`0.5`"))
    assert reference.main(["--check"]) == 1


def test_every_attack_and_defense_cites_its_source(reference: ModuleType):
    methods = {"attacks", "defenses", "repairs", "detectors", "regularizers"}
    uncited = [name for name in reference.uncited() if name.split("/")[0] in methods]
    assert not uncited, f"no citation in the docstrings of {uncited} (name the paper and the code followed)"


class _Throwaway:
    """Paste a square.

    Source: Doe, Roe, "A Square Trigger" (2021). Defaults follow nobody in particular.

    Args:
        size, margin: patch side and border,
            in pixels.
        alpha: the opacity.
    """


def test_docstring_parts_are_found(reference: ModuleType):
    assert reference.description(_Throwaway) == "Paste a square."
    assert reference.citation("throwaway", _Throwaway, "") == ['Doe, Roe, "A Square Trigger" (2021).']
    meanings = reference.argument_help(_Throwaway)
    both = "patch side and border, in pixels."
    assert meanings == {"size": both, "margin": both, "alpha": "the opacity."}
    # A registered description that cites an author the docstrings do not name is added.
    assert reference.citation("throwaway", _Throwaway, "Square (Poe et al. 2020)")[-1] == "Square (Poe et al. 2020)"
