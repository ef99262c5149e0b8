"""Target families, registered by name: what each declares (``declaration``, torch-free) and the family
itself (``family``). ``edge_msd/families/declarations.py`` holds every family's ``FamilyDecl`` (its typed
``[options]`` class, precisions, int8 recipe, dynamic batch, runtimes); ``edge_msd/families/<name>.py``
defines ``FAMILY``, the ``Family`` object (edge_msd.families.common.base) that owns its float export,
quantizer, graph checks and device-side runners, and takes its declared facts from its ``FamilyDecl``.
A profile's ``exporter`` field names its family (docs/adding-a-target.md).

This module and the declarations import no toolchain: the profile loader (edge_msd.targets) lists,
types and checks profiles from here without importing torch. The families never import the profile
loader (only its type, for annotations), so the two do not import each other.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from edge_msd.errors import ConfigError
from edge_msd.families.declarations import DECLARATIONS, FamilyDecl, FamilyOptions

if TYPE_CHECKING:
    from edge_msd.families.common.base import Family

__all__ = ["FamilyDecl", "FamilyOptions", "declaration", "family", "names"]


def names() -> tuple[str, ...]:
    """The registered families: those declared in ``declarations``, each with its module here."""
    return tuple(sorted(DECLARATIONS))


def declaration(name: str) -> FamilyDecl:
    """What the family ``name`` declares to its profiles; imports no toolchain."""
    if name not in DECLARATIONS:
        raise ConfigError(f"no target family {name!r}; families: {', '.join(names())}")
    return DECLARATIONS[name]


def family(name: str) -> Family:
    """The family registered as ``name`` (its module is imported now, with its toolchain's imports)."""
    declaration(name)
    return importlib.import_module(f"{__name__}.{name}").FAMILY

