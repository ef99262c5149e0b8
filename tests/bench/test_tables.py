"""edge_msd.bench.tables: table styles for terminals, pipes and narrow screens."""

from __future__ import annotations

import os
import subprocess
import sys


def test_cli_tables_one_line_per_row_without_a_terminal():
    """`edge-msd targets > log` from a job with no terminal: rich would wrap every cell at 80 columns."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-c", "from edge_msd.cli import main; main()", "targets"],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("│ coreml "))
    assert "Core ML ML Program (iOS 17+), Neural Engine / GPU / CPU" in row


def test_tables_markdown_when_piped_compact_when_narrow(monkeypatch):
    import io

    from edge_msd.bench import tables

    head, body = ["tower", "p50 ms", "p99 ms"], [["image", "0.123", "0.456"], ["text", "1.000", "2.000"]]
    assert tables.choose_style(40, io.StringIO()) == "markdown"
    md = tables.render(head, body, "markdown").splitlines()
    assert (
        md[0] == "| tower | p50 ms | p99 ms |"
        and md[1] == "|---|---|---|"
        and md[3] == "| text | 1.000 | 2.000 |"
    )

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(tables.shutil, "get_terminal_size", lambda: os.terminal_size((30, 24)))
    assert tables.choose_style(24, Tty()) == "aligned" and tables.choose_style(80, Tty()) == "compact"
    compact = tables.render(head, body, "compact").splitlines()
    assert compact[0] == "image  p50 ms: 0.123  p99 ms:" and all(len(line) <= 30 for line in compact)
