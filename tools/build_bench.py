#!/usr/bin/env python3
"""Build the benchmark binary: ``edge-msd-bench.pyz``, one file that runs with python3 + numpy + the
device's runtime (``python3 edge-msd-bench.pyz --bundle DIR``).

It holds ``edge_msd/bench``, the bundle contract ``edge_msd/contract`` and the edge_msd modules those
import (found by reading their imports, so nothing else, torch-using code in particular, comes along).
The build refuses a module-level import outside the standard library and numpy: runtimes are imported
inside their backends only.
"""

from __future__ import annotations

import argparse
import ast
import shutil
import sys
import tempfile
import zipapp
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "edge_msd"
ALLOWED_TOP_LEVEL = set(sys.stdlib_module_names) | {"numpy", "edge_msd"}
MAIN = "import sys\n\nfrom edge_msd.bench.__main__ import main\n\nsys.exit(main())\n"


def _module_file(name: str) -> Path:
    rel = Path(*name.split("."))
    pkg = ROOT / rel / "__init__.py"
    return pkg if pkg.is_file() else ROOT / rel.with_suffix(".py")


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(edge_msd modules imported anywhere, foreign top-level packages imported at module level)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    ours, foreign = set(), set()
    module_level = {id(n) for n in tree.body} | {
        id(c) for n in tree.body if isinstance(n, ast.Try | ast.If) for c in ast.walk(n)
    }
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] == "edge_msd":
                if _module_file(name).is_file():
                    ours.add(name)
            elif id(node) in module_level and name.split(".")[0] not in ALLOWED_TOP_LEVEL:
                foreign.add(name.split(".")[0])
    return ours, foreign


def collect() -> list[Path]:
    """bench/*.py and contract/*.py plus the closure of the edge_msd modules they import (and their
    packages' __init__)."""
    todo = sorted((PACKAGE / "bench").rglob("*.py")) + sorted((PACKAGE / "contract").rglob("*.py"))
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        ours, foreign = _imports(path)
        if foreign:
            raise SystemExit(
                f"{path.relative_to(ROOT)} imports {', '.join(sorted(foreign))} at module level; "
                "the benchmark binary may only need the standard library and numpy there"
            )
        for name in ours:
            todo.append(_module_file(name))
            parts = name.split(".")
            todo += [_module_file(".".join(parts[:i])) for i in range(1, len(parts))]
    return sorted(seen)


def build(out: Path) -> Path:
    files = collect()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for f in files:
            dst = src / f.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst)
        (src / "__main__.py").write_text(MAIN, encoding="utf-8")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(f".{out.name}.tmp")
        zipapp.create_archive(src, tmp_out, interpreter="/usr/bin/env python3", compressed=True)
        tmp_out.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "dist" / "edge-msd-bench.pyz", help="output .pyz")
    p.add_argument("--list", action="store_true", help="print the modules it holds")
    args = p.parse_args(argv)
    path = build(args.out)
    if args.list:
        for f in collect():
            print(f.relative_to(ROOT))
    print(f"{path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
