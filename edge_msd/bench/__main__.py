"""Command line of the benchmark binary: ``python edge-msd-bench.pyz --bundle DIR …``, and
``python edge-msd-bench.pyz build-engine BUNDLE …`` (TensorRT engines on the Jetson).

argparse (stdlib) over the same ``BenchOptions`` that ``edge-msd bench`` reads through click (and the
same engine options as ``edge-msd build-engine``), so both take the same options and run the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import typing
from pathlib import Path
from typing import Any

from edge_msd import __version__
from edge_msd.bench.engine import OPTIONS as ENGINE_OPTIONS
from edge_msd.bench.engine import build_engines
from edge_msd.bench.gallery import IndexOptions, build_index, format_index
from edge_msd.bench.options import BenchOptions
from edge_msd.bench.run import print_report, run_bench
from edge_msd.errors import EdgeMSDError
from edge_msd.quiet import known_noise_hidden

EXIT_ERROR, EXIT_TIME_LIMIT, EXIT_INTERRUPTED = 2, 3, 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-msd-bench",
        description="Benchmark an edge-msd deploy bundle on this device: latency, throughput, memory, power, "
        "recall and parity, written as a JSON report (schema edge-msd-bench/1).",
        epilog="Exit status: 0 complete, 2 error, 3 stopped by --time-limit (partial report), "
        "130 Ctrl-C (partial report). TensorRT engines: edge-msd-bench build-engine BUNDLE (--help); "
        "gallery index: edge-msd-bench index (--help).",
    )
    p.add_argument("--version", action="version", version=f"edge-msd-bench {__version__}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show the runtime's own log lines (e.g. LiteRT's delegate creation)")
    return _add_options(p, BenchOptions)


def _add_options(p: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """One argparse option per field of an options dataclass (its help from the field's metadata)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        opt = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        help_text = f.metadata["help"]
        if tp is bool:
            p.add_argument(
                opt, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
        elif typing.get_origin(tp) is list:
            item = typing.get_args(tp)[0]
            p.add_argument(
                opt,
                dest=f.name,
                default=f.default_factory(),
                metavar="A,B",
                type=lambda s, item=item: [item(v) for v in s.split(",") if v],
                help=help_text,
            )
        else:
            base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
            p.add_argument(opt, dest=f.name, type=base, default=f.default, help=help_text)
    return p


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # a killed run (timeout, job scheduler) still writes its partial report


def _engine_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-msd-bench build-engine",
        description="Build TensorRT engines (models/*.plan) for a jetson bundle, on the Jetson.",
    )
    p.add_argument("bundle", type=Path, help="the jetson bundle folder")
    for name, (tp, help_text) in ENGINE_OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=tp, default=None, help=help_text)
    return p


def build_engine_main(argv: list[str]) -> int:
    args = _engine_parser().parse_args(argv)
    try:
        built = build_engines(**vars(args))
    except EdgeMSDError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    for tower, plan in built.items():
        print(f"{tower}: {plan}")
    return 0


def index_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="edge-msd-bench index", description="Embed a gallery with the "
                                "bundle's runner into a searchable index (docs/index.md).")
    opts = IndexOptions(**vars(_add_options(p, IndexOptions).parse_args(argv)))
    out = Path(opts.out or f"index-{Path(opts.bundle).name}")
    try:
        print(format_index(build_index(opts, out), out))
    except EdgeMSDError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build-engine"]:
        return build_engine_main(argv[1:])
    if argv[:1] == ["index"]:
        return index_main(argv[1:])
    args = vars(_parser().parse_args(argv))
    verbose = args.pop("verbose")
    opts = BenchOptions(**args)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        with known_noise_hidden(not verbose):
            report = run_bench(opts)
    except EdgeMSDError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print_report(report)
    if report["partial"]:
        return EXIT_INTERRUPTED if report["interrupted"] == "Ctrl-C" else EXIT_TIME_LIMIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
