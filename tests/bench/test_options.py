"""edge_msd.bench.options: the runtime names the CLI and the .pyz offer."""

from __future__ import annotations

from edge_msd.bench import runtimes


def test_runtime_help_lists_every_runtime():
    from click.testing import CliRunner

    from edge_msd.bench.__main__ import _parser
    from edge_msd.bench.options import RUNTIMES
    from edge_msd.cli import main

    assert tuple(runtimes.BACKENDS) == RUNTIMES  # each runtime name has its runner, in `auto` order
    text = CliRunner().invoke(main, ["bench", "--help"], terminal_width=200).output
    line = next(row for row in text.splitlines() if "--runtime" in row)
    pyz_help = next(a.help for a in _parser()._actions if "--runtime" in a.option_strings)
    for name in ("auto", *runtimes.BACKENDS):
        assert name in line and name in pyz_help, name
    assert "executorch" in line
