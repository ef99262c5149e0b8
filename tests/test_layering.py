"""The pipeline runs one way: no module imports from a later pipeline stage, and no module-level imports
run in a circle (read from the source, ast)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import edge_msd

PACKAGE = Path(edge_msd.__file__).parent

# Shared modules every stage may import: configs, target profiles (the families are found through the
# registry, itself stdlib only), artifacts, errors, paths, the lineage records, the family registry, the
# numpy-only retrieval metrics, and the bundle contract (its format, rules, signatures, reading and shared
# numerics): torch-free, it ships to the device inside the benchmark binary and is applied by the host
# alike. The benchmark's options with the typed [bench] table of a profile are among them (stdlib only:
# the profile loader types [bench] with them). The torchrun plumbing (rank device, process group,
# barrier, broadcast) is shared too: the feature pass (teachers, stage 2) and training (distill, stage 3)
# both run under torchrun, and it knows no pipeline stage. The families' declarations (typed [options],
# precisions, int8 recipe, runtimes) are shared with the registry: the profile loader checks profiles
# against them without importing a family's toolchain.
BASE = {
    "edge_msd", "edge_msd.config", "edge_msd.targets", "edge_msd.artifacts", "edge_msd.errors",
    "edge_msd.paths", "edge_msd.lineage", "edge_msd.delegation", "edge_msd.quiet", "edge_msd.families",
    "edge_msd.eval", "edge_msd.contract", "edge_msd.bench.options", "edge_msd.torchrun",
    "edge_msd.families.declarations",
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


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module of a ``from ... import`` (relative ones against this module's package)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts[: len(parts) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def _named(node: ast.AST, module: str, is_package: bool) -> set[str]:
    """The modules one import statement names; ``from pkg import sub`` names ``pkg.sub`` where that is a
    module of the package, else ``pkg``."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = _resolve(node, module, is_package)
    subs = {f"{base}.{a.name}" for a in node.names} & MODULES
    return subs or {base}


def _ours(names: set[str]) -> set[str]:
    return {m for m in names if m == "edge_msd" or m.startswith("edge_msd.")}


def imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every edge_msd module imported anywhere in the file (lazy imports inside functions too), except
    under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    for node in ast.walk(tree):
        if _is_type_checking(node):
            node.body = []
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add(_resolve(node, module, is_package))
    return _ours(out)


def imported_at_load(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """The edge_msd modules the file imports while it is itself imported: statements of the module and
    of its class bodies and if/try/with blocks, not inside functions nor under ``if TYPE_CHECKING:``."""
    out: set[str] = set()
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) or _is_type_checking(node):
            continue
        out |= _named(node, module, is_package)
        todo.extend(ast.iter_child_nodes(node))
    return _ours(out)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (``[a, b, ..., a]``) per strongly connected group of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:  # Tarjan's strongly connected components
        index[m] = low[m] = len(index)
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if dep not in index:
                visit(dep)
                low[m] = min(low[m], low[dep])
            elif dep in stack:
                low[m] = min(low[m], index[dep])
        if low[m] == index[m]:
            group = []
            while not group or group[-1] != m:
                group.append(stack.pop())
            if len(group) > 1 or m in graph.get(m, ()):
                cycles.append(_circle(graph, set(group), min(group)))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return cycles


def _circle(graph: dict[str, set[str]], group: set[str], start: str) -> list[str]:
    """A shortest path from ``start`` back to itself inside ``group`` (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for m in frontier:
            for dep in sorted(graph.get(m, ()) & group):
                if dep == start:
                    return [*paths[m], start]
                if dep not in paths:
                    paths[dep] = [*paths[m], dep]
                    nxt.append(dep)
        frontier = nxt
    raise AssertionError(f"{start} is in no circle of {sorted(group)}")


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


def test_no_module_level_import_circle():
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[module] = imported_at_load(tree, module, path.name == "__init__.py") - {module}
    cycles = import_cycles(graph)
    assert not cycles, "module-level imports in a circle:\n" + "\n".join(" → ".join(c) for c in cycles)


def test_the_circle_check_sees_module_level_imports_only():
    source = ("import edge_msd.errors\nfrom edge_msd.bench import options\nif TYPE_CHECKING:\n"
              "    from edge_msd.targets import TargetProfile\nclass A:\n    from edge_msd import paths\n"
              "try:\n    from edge_msd.artifacts import MANIFEST\nexcept ImportError:\n    pass\n"
              "def f():\n    from edge_msd.pipeline import run_demo\n")
    found = imported_at_load(ast.parse(source), "edge_msd.x", is_package=False)
    assert found == {"edge_msd.errors", "edge_msd.bench.options", "edge_msd.paths", "edge_msd.artifacts"}
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert import_cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


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


# Blocked for the profile loader: torch (``sys.modules[m] = None`` makes ``import m`` raise) and the
# family toolchains, so that listing and loading profiles stays torch-free, also where they are absent.
TOOLCHAINS = ("torch", "open_clip", "onnx", "onnxruntime", "coremltools", "executorch", "modelopt",
              "ai_edge_litert", "ai_edge_torch", "tensorflow")


def test_listing_and_loading_every_profile_imports_no_torch(tmp_path):
    """`edge-msd targets` and load_target type and check every packaged profile from the families'
    declarations alone (a family module imports torch and its converter)."""
    code = (f"import sys\nfor m in {TOOLCHAINS!r}:\n    sys.modules[m] = None\n"
            "from edge_msd.targets import known_targets, load_target\n"
            "names = list(known_targets())\n"
            "assert len(names) >= 5, names\n"
            "for n in names:\n    load_target(n).validate()\n"
            "from edge_msd.cli import main\nmain(['targets'], standalone_mode=False)\n"
            "print(' '.join(names))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert {"onnx", "jetson-orin", "coreml", "tflite", "executorch"} <= set(r.stdout.split()), r.stdout


def test_every_family_module_is_declared():
    """The registry's names are the declarations'; each has its module, and every module is declared."""
    from edge_msd.families import declaration, names

    modules = {p.stem for p in (PACKAGE / "families").glob("*.py")} - {"__init__", "declarations"}
    assert set(names()) == modules
    assert all(declaration(n).name == n for n in names())
