"""Replace a generated block of a Markdown file: the lines between two HTML-comment markers."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def replace_block(doc: Path, name: str, lines: list[str]) -> None:
    """Put ``lines`` between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in ``doc``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = doc.read_text()
    if start not in content or end not in content:
        raise ValueError(f"{doc} has no {start} ... {end} block")
    before, _, rest = content.partition(start)
    _, _, after = rest.partition(end)
    doc.write_text(before + "\n".join([start, "", *lines, "", end]) + after)
