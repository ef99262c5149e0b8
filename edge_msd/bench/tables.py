"""Tables that stay readable anywhere: aligned columns in a wide terminal, ``key value`` lines in a
narrow one, Markdown when the output is piped or written to a file (``edge-msd demo > log``).
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from typing import TextIO

STYLES = ("aligned", "compact", "markdown")


def aligned(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in [head, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def markdown(head: list[str], body: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in [head, *body]]
    return "\n".join(
        ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(head)]
        + ["| " + " | ".join(r) + " |" for r in esc[1:]]
    )


def compact(head: list[str], body: list[list[str]], width: int) -> str:
    """One block per row: the first column, then ``name value`` pairs wrapped to ``width``."""
    out = []
    for row in body:
        pairs = "  ".join(f"{h}: {c}" for h, c in zip(head[1:], row[1:], strict=True))
        out.append(textwrap.fill(pairs, width, initial_indent=f"{row[0]}  ", subsequent_indent="    "))
    return "\n".join(out)


def choose_style(table_width: int, stream: TextIO | None = None) -> str:
    """markdown when not a terminal; compact when the terminal is narrower than the table."""
    stream = stream or sys.stdout
    if not stream.isatty():
        return "markdown"
    return "aligned" if table_width <= shutil.get_terminal_size().columns else "compact"


def render(head: list[str], body: list[list[str]], style: str | None = None) -> str:
    if style is None:
        style = choose_style(len(aligned(head, body).splitlines()[0]))
    if style == "markdown":
        return markdown(head, body)
    if style == "compact":
        return compact(head, body, shutil.get_terminal_size().columns)
    return aligned(head, body)
