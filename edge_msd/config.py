"""Typed stage configs: dataclasses that are filled from defaults, a TOML file, then CLI options.

Every stage's config is a dataclass whose fields carry ``metadata={"help": ...}``. ``config_command``
turns it into click options (one per field) plus ``--config FILE.toml``, so that everything the CLI
takes can also come from a file; the resolved config is saved beside each artifact.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import tomllib

from edge_msd.errors import ConfigError, storage_message

C = TypeVar("C")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None`` annotations."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (item,) = typing.get_args(base)[:1] or (str,)
        if isinstance(value, str):  # comma-separated on the command line: numbers arrive as text
            text = value
            value = [v.strip() for v in text.split(",") if v.strip()]
            if item in (int, float):
                try:
                    value = [item(v) for v in value]
                except ValueError as e:
                    msg = f"{where}: expected comma-separated {item.__name__}s, got {text!r}"
                    raise ConfigError(msg) from e
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if base is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: expected a table, got {value!r}")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if base in (int, float, str):
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, base) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected {base.__name__}, got {value!r}")
    return value


def load_toml(path: str | Path) -> dict[str, Any]:
    """Parse a UTF-8 TOML file; a missing, unreadable, non-UTF-8 or invalid file is a ConfigError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: config file not found") from e
    except OSError as e:
        raise ConfigError(storage_message(e, path) or f"{path}: cannot read the config file ({e})") from e
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x}); TOML files are UTF-8: save it as UTF-8"
        ) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e


def build_config(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Make ``cls`` from ``values``; unknown keys and wrong types name the field and the source."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        known = ", ".join(sorted(names))
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; known: {known}")
    kwargs = {k: _coerce(v, hints[k], f"{source}: field '{k}'") for k, v in values.items()}
    try:
        cfg = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from e
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _click_type(tp: Any) -> Any:
    base, _ = _base_type(tp)
    if typing.get_origin(base) in (list, tuple):
        return str  # comma-separated on the command line
    return {int: int, float: float, str: str}.get(base, str)


def config_command(cls: type, section: str | None = None) -> Callable:
    """Decorate a click command so it receives ``cfg: cls`` built from defaults < TOML < CLI.

    ``section`` names the TOML table to read (``[distill]``); a file without that table is read
    at its top level, so a stage's config file can be written either way.
    """

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(config_file: str | None, **kwargs: Any) -> Any:
            values: dict[str, Any] = {}
            source = "command line"
            if config_file:
                data = load_toml(config_file)
                values = dict(data.get(section, data)) if section else dict(data)
                source = f"{config_file}" + (f" [{section}]" if section and section in data else "")
            cli_values = {}
            for f in dataclasses.fields(cls):
                key = f.name
                if kwargs.get(key) is not None:
                    cli_values[key] = kwargs.pop(key)
                else:
                    kwargs.pop(key, None)
            cfg = build_config(cls, values, source) if values else None
            merged = {**(config_to_dict(cfg) if cfg else {}), **cli_values}
            return fn(cfg=build_config(cls, merged, source), **kwargs)

        hints = _field_types(cls)
        for f in reversed(dataclasses.fields(cls)):
            base, _ = _base_type(hints[f.name])
            opt = "--" + f.name.replace("_", "-")
            aliases = tuple(f.metadata.get("aliases", ()))
            help_text = f.metadata.get("help", "")
            default = f.default if f.default is not dataclasses.MISSING else None
            if default is not None and not isinstance(default, list | tuple):
                help_text = f"{help_text} [default: {default}]"
            if base is bool:
                wrapper = click.option(f"{opt}/--no-{opt[2:]}", f.name, default=None, help=help_text)(wrapper)
            else:
                wrapper = click.option(opt, *aliases, f.name, type=_click_type(hints[f.name]), default=None,
                                       help=help_text)(wrapper)
        wrapper = click.option(
            "--config", "config_file", type=click.Path(dir_okay=False),
            help=f"TOML file with these options{f' (table [{section}])' if section else ''}; "
            "options given on the command line win.",
        )(wrapper)
        return wrapper

    return decorate


def field(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002
    aliases: tuple[str, ...] = (),
    **kw: Any,
) -> Any:
    """``dataclasses.field`` with a help text shown by the CLI (and other option names for it there)."""
    meta = {"help": help, "aliases": aliases}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as TOML beside an artifact."""
    import tomli_w

    from edge_msd.artifacts import atomic_write_text

    items = config_to_dict(cfg).items()
    data = {k: (list(v) if isinstance(v, tuple) else v) for k, v in items if v is not None}
    atomic_write_text(path, tomli_w.dumps(data))


# ---- stage configs ------------------------------------------------------------------------
# Each stage's dataclass is defined in its own package (edge_msd/<stage>/config.py) with
# ``field(..., help=...)`` and an optional ``validate()``; this module holds the machinery.
# Target profiles (targets/*.toml) are typed and loaded by edge_msd.targets.
