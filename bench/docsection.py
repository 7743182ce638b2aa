"""Rewrite one marked section of docs/results.md (shared by the bench/results_*.py scripts)."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "results.md"


def replace_section(name: str, body: str, heading: str, doc: Path = DOC) -> None:
    """Put ``body`` between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``doc``; if the
    markers are missing, append them under ``heading`` (a markdown heading line)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# onebit results\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        a, b = text.index(begin), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    doc.write_text(text, encoding="utf-8")
