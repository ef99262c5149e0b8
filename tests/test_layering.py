"""The pipeline runs one way: no module imports from a later pipeline stage (read from the source, ast)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import edge_msd

PACKAGE = Path(edge_msd.__file__).parent

# Shared modules every stage may import: configs, artifacts, errors, paths, the lineage records, the
# family registry (stdlib only), the numpy-only retrieval metrics, and the bundle contract (its format,
# rules, signatures, reading and shared numerics): torch-free, it ships to the device inside the benchmark
# binary and is applied by the host alike, so no bench module needs whitelisting here.
BASE = {
    "edge_msd", "edge_msd.config", "edge_msd.artifacts", "edge_msd.errors", "edge_msd.paths",
    "edge_msd.lineage", "edge_msd.delegation", "edge_msd.quiet", "edge_msd.families", "edge_msd.eval",
    "edge_msd.contract",
}
# The bottom of the house: what the contract itself may import (the stdlib-only foundations), and the
# only third-party packages it may name: numpy, and cryptography where a signature key is used.
CONTRACT = "edge_msd.contract"
CONTRACT_DEPS = {"edge_msd", "edge_msd.errors", "edge_msd.artifacts"}
CONTRACT_THIRD_PARTY = {"numpy", "cryptography"}
# Pipeline stages in order (data → teachers → distill → quant → export → bench); a module may import its
# own stage and earlier ones. Students are made by distill; the family modules (float export and int8
# recipe of one device family) sit between distill and the quant and export stages that both use them.
STAGES = {
    "edge_msd.data": 1,
    "edge_msd.teachers": 2,
    "edge_msd.students": 3,
    "edge_msd.distill": 3,
    "edge_msd.families": 4,  # edge_msd.families.<name> and .common (the registry itself is BASE)
    "edge_msd.quant": 5,
    "edge_msd.export": 6,
    "edge_msd.bench": 7,
    "edge_msd.pipeline": 8,  # orchestration: chains the stages
    "edge_msd.sweep": 8,  # trains, exports and benchmarks several students
    "edge_msd.cli": 8,
}


def rank(module: str) -> int:
    """0 for shared modules, else the rank of the longest matching stage prefix."""
    if module in BASE or any(module.startswith(b + ".") for b in BASE if b not in STAGES and b != "edge_msd"):
        return 0
    best = max((p for p in STAGES if module == p or module.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{module}: no stage rank; add it to BASE or STAGES in this test"
    return STAGES[best]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every edge_msd module imported anywhere in the file (lazy imports inside functions too), except
    under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            node.body = []
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
    return {m for m in out if m == "edge_msd" or m.startswith("edge_msd.")}


def test_no_module_imports_a_later_pipeline_stage():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for dep in sorted(imported(tree, module, path.name == "__init__.py")):
            if rank(dep) > rank(module):
                violations.append(f"{module} (rank {rank(module)}) imports {dep} (rank {rank(dep)})")
    assert not violations, "imports up the pipeline:\n" + "\n".join(violations)


def test_the_rank_check_sees_lazy_and_relative_imports():
    source = ("def f():\n    from edge_msd.quant.pipeline import quantize_student\nfrom .bundle import x\n"
              "if TYPE_CHECKING:\n    from edge_msd.bench.run import y\n")
    found = imported(ast.parse(source), "edge_msd.export.onnx", is_package=False)
    assert found == {"edge_msd.quant.pipeline", "edge_msd.export.bundle"}
    assert rank("edge_msd.quant.pipeline") < rank("edge_msd.export.bundle")
    assert rank("edge_msd.families") == 0 < rank("edge_msd.families.tflite") < rank("edge_msd.quant.recipes")


def foreign_imports(tree: ast.AST) -> set[str]:
    """Top-level names of the packages a file imports that are neither the stdlib nor edge_msd."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"edge_msd"}


def test_the_contract_is_the_bottom_layer():
    """edge_msd.contract imports only itself, the stdlib-only foundations, numpy (and cryptography)."""
    files = sorted((PACKAGE / "contract").rglob("*.py"))
    assert {p.stem for p in files} >= {"__init__", "format", "integrity", "signing", "reading", "numerics"}
    violations = []
    for path in files:
        module = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for dep in sorted(imported(tree, module, path.name == "__init__.py")):
            if dep not in CONTRACT_DEPS and dep != CONTRACT and not dep.startswith(CONTRACT + "."):
                violations.append(f"{module} imports {dep}")
        violations += [f"{module} imports {p}" for p in sorted(foreign_imports(tree) - CONTRACT_THIRD_PARTY)]
    assert not violations, "the contract reaches above the bottom layer:\n" + "\n".join(violations)
    assert rank("edge_msd.contract.integrity") == 0
    assert rank("edge_msd.bench.engine") == STAGES["edge_msd.bench"]
