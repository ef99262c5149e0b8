"""Dataset spec strings: ``KIND[:PATH][?key=value&key=value]``.

One string selects a dataset everywhere (CLI option, TOML config, feature-cache manifest), so it
is parsed in one place; each kind declares its options with defaults, and the parser checks names
and types against them, naming the spec and the option when something is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from edge_msd.errors import ConfigError


@dataclass(frozen=True)
class Spec:
    """A parsed spec: the kind, an optional path and the raw option strings."""

    text: str
    kind: str
    path: str | None
    options: dict[str, str]


def parse_spec(text: str) -> Spec:
    """Split a spec into kind, path and options (values still strings; see ``resolve_options``)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"dataset spec {text!r}: expected KIND[:PATH][?key=value&...]")
    text = text.strip()
    head, _, query = text.partition("?")
    kind, sep, path = head.partition(":")
    kind = kind.strip().lower()
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        key, value = unquote(key).strip(), unquote(value)  # not unquote_plus: paths may hold '+'
        if not eq or not key:
            raise ConfigError(f"dataset spec {text!r}: expected key=value after '?', got {item!r}")
        if key in options:
            raise ConfigError(f"dataset spec {text!r}: option '{key}' given twice")
        options[key] = value
    return Spec(text=text, kind=kind, path=path if sep and path else None, options=options)


def _coerce(spec: Spec, key: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"dataset spec {spec.text!r}: option '{key}': expected true or false, got {raw!r}")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(
                f"dataset spec {spec.text!r}: option '{key}': expected an integer, got {raw!r}"
            ) from None
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(
                f"dataset spec {spec.text!r}: option '{key}': expected a number, got {raw!r}"
            ) from None
    return raw


def resolve_options(spec: Spec, defaults: dict[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with the spec's options, typed like the defaults; unknown keys are errors.

    A default of ``None`` means "a string, optional".
    """
    unknown = sorted(set(spec.options) - set(defaults))
    if unknown:
        known = ", ".join(sorted(defaults)) or "(none)"
        raise ConfigError(
            f"dataset spec {spec.text!r}: unknown option(s) {', '.join(unknown)}; {spec.kind} takes: {known}"
        )
    out = dict(defaults)
    for key, raw in spec.options.items():
        out[key] = _coerce(spec, key, raw, defaults[key])
    return out


def require_path(spec: Spec, what: str) -> str:
    if not spec.path:
        raise ConfigError(f"dataset spec {spec.text!r}: {spec.kind} needs a path, e.g. {spec.kind}:{what}")
    return spec.path


def check_split(spec: Spec, split: str, valid: list[str]) -> None:
    if split not in valid:
        raise ConfigError(
            f"dataset spec {spec.text!r}: unknown split {split!r}; valid splits: {', '.join(valid)}"
        )


def check_positive(spec: Spec, opts: dict[str, Any], *keys: str, allow_zero: bool = False) -> None:
    for key in keys:
        value = opts[key]
        if value < 0 or (value == 0 and not allow_zero):
            expected = "a non-negative integer" if allow_zero else "a positive integer"
            raise ConfigError(f"dataset spec {spec.text!r}: option '{key}': expected {expected}, got {value}")
