"""Target families, registered by name: what each declares (``declaration``, torch-free) and the family
itself (``family``). ``edge_msd/families/declarations.py`` holds every family's ``FamilyDecl`` (its typed
``[options]`` class, precisions, int8 recipe, dynamic batch, runtimes); ``edge_msd/families/<name>.py``
defines ``FAMILY``, the ``Family`` object (edge_msd.families.common.base) that owns its float export,
quantizer, graph checks and device-side runners, and takes its declared facts from its ``FamilyDecl``.
A profile's ``exporter`` field names its family (docs/adding-a-target.md).

This module and the declarations import no toolchain. The profile loader (edge_msd.targets) lists,
types and checks profiles from ``declarations`` alone (no torch); the families import only the profile
type from it, for annotations, so no import runs from the loader back into this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from edge_msd.families.declarations import FamilyDecl, FamilyOptions, declaration, names

if TYPE_CHECKING:
    from edge_msd.families.common.base import Family

__all__ = ["FamilyDecl", "FamilyOptions", "declaration", "family", "names"]


def family(name: str) -> Family:
    """The family registered as ``name`` (its module is imported now, with its toolchain's imports)."""
    declaration(name)
    return importlib.import_module(f"{__name__}.{name}").FAMILY

