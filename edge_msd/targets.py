"""Target profiles (targets/<name>.toml): the profile type, where profiles are found, and their loading.

Targets are data, target families are code (edge_msd/families): a profile names its family in
``exporter``, and is checked against what that family declares (its ``FamilyDecl``,
edge_msd/families/declarations.py): the typed class of its ``[options]`` table, the precisions it writes,
whether it writes a dynamic batch and its device-side runtimes. Only the declarations are imported here,
so listing and loading profiles imports no torch and no converter. The
``[bench]`` table is typed by ``ProfileBench``, which the torch-free benchmark reads back from the
bundle manifest.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edge_msd.bench.options import ProfileBench
from edge_msd.config import build_config, field, load_toml
from edge_msd.errors import ConfigError
from edge_msd.families.declarations import FamilyDecl, FamilyOptions, declaration, names

PRECISIONS = ("fp32", "fp16", "int8")


@dataclasses.dataclass
class TargetProfile:
    """A device profile (targets/<name>.toml): which exporter, precision, shapes and checks to use."""

    name: str = field(help="profile name (the file stem)")
    exporter: str = field(help="target family (edge_msd/families/<name>.py): onnx, tensorrt, coreml, ...")
    precision: str = field(help="default precision")
    precisions: list[str] = field(help="precisions this target accepts")
    resolution: int | str = field(help='image size in pixels, or "student" for the student\'s own')
    batch_sizes: list[int] = field(help="batch sizes to benchmark (and TensorRT's min/opt/max profile)")
    dynamic_batch: bool = field(help="export a dynamic batch dimension (else static at batch_sizes[0])")
    parity: dict = field(help="[parity.<precision>] min_cos, max_delta_r1 (percentage points)")
    options: FamilyOptions = field(help="exporter-specific settings ([options], typed by the family)")
    bench: ProfileBench = field(help="benchmark defaults ([bench] table)")
    description: str = field("", help="one line shown by `edge-msd targets`")
    source: str = field("", help="file the profile was read from (filled in by load_target)")

    def validate(self) -> None:
        where = self.source or self.name
        for p in [*self.precisions, self.precision]:
            if p not in PRECISIONS:
                raise ConfigError(f"{where}: field 'precisions' has {p!r}; expected one of {PRECISIONS}")
        if self.precision not in self.precisions:
            raise ConfigError(f"{where}: field 'precision' {self.precision!r} is not in precisions")
        if isinstance(self.resolution, str) and self.resolution != "student":
            raise ConfigError(f"{where}: field 'resolution' must be an int or \"student\"")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"{where}: field 'batch_sizes' must list positive ints")
        for p in self.precisions:
            t = self.parity.get(p)
            if not isinstance(t, dict) or set(t) != {"min_cos", "max_delta_r1"}:
                raise ConfigError(f"{where}: field 'parity.{p}' must be a table with min_cos, max_delta_r1")
        check_against_family(self, declaration(self.exporter))


def check_against_family(profile: TargetProfile, fam: FamilyDecl) -> None:
    """What the profile asks of its family: precisions it writes, a dynamic batch, a runtime of its files."""
    where = profile.source or profile.name
    writes = fam.precisions
    refused = [p for p in profile.precisions if p not in writes]
    if refused:
        raise ConfigError(f"{where}: field 'precisions' has {', '.join(refused)}, which {fam.name} does not "
                          f"write; expected some of {', '.join(writes)}")
    if profile.dynamic_batch and not fam.dynamic_batch:
        raise ConfigError(f"{where}: dynamic_batch is not supported by {fam.name}; set false")
    if profile.options.quant and fam.recipe is None:
        raise ConfigError(f"{where}: [options.quant]: {fam.name} has no int8 recipe to tune")
    runtime = profile.bench.runtime
    if runtime is not None and runtime not in fam.runtimes:
        raise ConfigError(f"{where}: [bench] runtime {runtime!r} cannot run {fam.name} files; "
                          f"expected one of {', '.join(fam.runtimes)}")


def targets_dirs() -> list[Path]:
    """Where target names are looked up: ./targets first (a user's own devices), then the shipped ones."""
    from edge_msd.paths import shipped

    return [Path.cwd() / "targets", shipped("targets")]


def known_targets() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in reversed(targets_dirs()):
        found.update({p.stem: p for p in sorted(d.glob("*.toml"))})
    return dict(sorted(found.items()))


def _table(data: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: field '{key}' must be a table")
    return value


def load_target(name_or_path: str | Path) -> TargetProfile:
    """Load a target profile by name (targets/<name>.toml) or path; ``alias = "other"`` follows a link.

    Its ``[options]`` are typed by its family's options class and its ``[bench]`` by ``ProfileBench``:
    an unknown key or a wrong type is an error naming the file, the table and the key."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        known = known_targets()
        if str(name_or_path) not in known:
            raise ConfigError(f"unknown target {str(name_or_path)!r}; known: {', '.join(known) or 'none'}")
        path = known[str(name_or_path)]
    data = load_toml(path)
    if "alias" in data:
        if set(data) != {"alias"}:
            raise ConfigError(f"{path}: an alias profile holds only field 'alias'")
        if data["alias"] == path.stem:
            raise ConfigError(f"{path}: field 'alias' points at itself")
        return load_target(data["alias"])
    missing = [f.name for f in dataclasses.fields(TargetProfile)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in data and f.name not in ("name", "options", "bench")]
    if missing:
        raise ConfigError(f"{path}: missing field(s) {', '.join(missing)}")
    if not (isinstance(data.get("resolution"), int | str) and not isinstance(data.get("resolution"), bool)):
        raise ConfigError(f"{path}: field 'resolution' must be an int or \"student\"")
    if data["exporter"] not in names():
        raise ConfigError(f"{path}: field 'exporter' is {data['exporter']!r}; expected one of {names()}")
    options_cls = declaration(data["exporter"]).options
    options = build_config(options_cls, _table(data, "options", path), f"{path} [options]")
    bench = build_config(ProfileBench, _table(data, "bench", path), f"{path} [bench]")
    values = {"name": path.stem, **data, "options": options, "bench": bench, "source": str(path)}
    return build_config(TargetProfile, values, str(path))
