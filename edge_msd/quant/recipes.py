"""The int8 recipe of a target: its family's default (edge_msd/families/declarations.py), tuned by the
profile's ``[options.quant]`` table, and the family's quantizer that applies it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edge_msd.errors import ConfigError
from edge_msd.families import declaration, family, names
from edge_msd.families.common.quantizer import Quantizer
from edge_msd.families.declarations import Recipe
from edge_msd.targets import TargetProfile, load_target


def recipe_for_target(target: TargetProfile | str | Path) -> Recipe:
    """The recipe of a target profile (``TargetProfile`` or name); no int8 recipe → ConfigError."""
    profile = load_target(target) if isinstance(target, str | Path) else target
    fam = declaration(profile.exporter)
    if fam.recipe is None:
        with_recipe = ", ".join(n for n in names() if declaration(n).recipe is not None)
        raise ConfigError(
            f"target {profile.name!r} (exporter {profile.exporter!r}) has no int8 quantization "
            f"recipe; exporters with one: {with_recipe}"
        )
    where = profile.source or profile.name
    overrides: dict[str, Any] = dict(profile.options.quant)
    known = {f.name for f in dataclasses.fields(Recipe)} - {"name", "exporter", "backend", "scheme"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(
            f"{where}: [options.quant] unknown field(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    if "keep_float" in overrides:
        overrides["keep_float"] = tuple(overrides["keep_float"])
    recipe = dataclasses.replace(fam.recipe, **overrides)
    quantizer_for(recipe).check_recipe(recipe, where)
    return recipe


def quantizer_for(recipe: Recipe) -> Quantizer:
    """The quantizer of the recipe's family, set up with ``recipe``."""
    cls = family(recipe.exporter).quantizer
    assert cls is not None, f"family {recipe.exporter} has a recipe but no quantizer"
    return cls(recipe)
