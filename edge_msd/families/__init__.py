"""Target families, one module each, registered by name: ``edge_msd/families/<name>.py`` defines
``FAMILY``, the ``Family`` object (edge_msd.families.common.base) that owns its float export, int8
recipe and quantizer, graph checks and the names of its device-side runners. A profile's ``exporter``
field names its family (docs/adding-a-target.md).

This module imports only the standard library: the profile loader (edge_msd.targets) lists the
families from here without importing any toolchain. ``FamilyOptions`` is the base of each family's
typed ``[options]`` class; the families never import the profile loader (only its type, for
annotations), so the two do not import each other.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import TYPE_CHECKING

from edge_msd.errors import ConfigError

if TYPE_CHECKING:
    from edge_msd.families.common.base import Family
    from edge_msd.targets import TargetProfile


@dataclasses.dataclass
class FamilyOptions:
    """The ``[options]`` of a profile; each family subclasses it with its own typed fields."""

    quant: dict = dataclasses.field(
        default_factory=dict,
        metadata={"help": "[options.quant]: tuning of the family's int8 recipe (edge_msd.quant.recipes)"},
    )


def names() -> tuple[str, ...]:
    """The registered families: the modules of this package (shared helpers live in ``common``)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg))


def family(name: str) -> Family:
    """The family registered as ``name`` (its module is imported now, with its toolchain's imports)."""
    if name not in names():
        raise ConfigError(f"no target family {name!r}; families: {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}").FAMILY


def family_for(profile: TargetProfile) -> Family:
    """The family of a target profile (its ``exporter`` field)."""
    return family(profile.exporter)
