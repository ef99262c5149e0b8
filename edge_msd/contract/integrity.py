"""The one rule set for reading a deploy bundle (docs/bundle.md, "Verification").

``edge-msd bundle verify`` on the host and ``edge-msd bench`` / the benchmark binary on the device
all call ``check_bundle``, so they accept and refuse the same bundles: kind and schema; every path
the manifest names stays inside the bundle; the digest (and signature) when asked for; every listed
file's sha256; no file the manifest does not list, except those the device itself adds.
Standard library only: this module ships inside the benchmark binary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from edge_msd.artifacts import read_manifest, verify_files
from edge_msd.contract.format import (
    ENGINES_JSON,
    KIND,
    MANIFEST,
    SCHEMA,
    SIGNATURE,
    TABLES,
    at,
    engine_file,
    timing_cache_file,
)
from edge_msd.errors import ArtifactError, ConfigError

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass
class Verified:
    """A bundle that passed the rules: its manifest, digest and (when a key was given) signature."""

    manifest: dict[str, Any]
    digest: str
    signature: dict[str, str] | None = None


def canonical_manifest(manifest: dict[str, Any]) -> bytes:
    """The bytes the digest covers: the parsed manifest as sorted, compact, UTF-8 JSON."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def bundle_digest(manifest: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical manifest; the manifest lists every file's sha256, so this covers all."""
    return hashlib.sha256(canonical_manifest(manifest)).hexdigest()


def confined(root: Path, rel: object, field: str) -> Path:
    """``root/rel`` once ``rel`` is a relative path that stays inside ``root``, symbolic links resolved."""
    where = f"{root / MANIFEST}: {field}"
    if not isinstance(rel, str) or not rel:
        raise ArtifactError(f"{where} must be a path relative to the bundle, got {rel!r}")
    parts = PurePosixPath(rel).parts
    if rel.startswith("/") or "\\" in rel or re.match(r"[A-Za-z]:", rel):
        raise ArtifactError(f"{where} {rel!r} is absolute; paths must be relative to the bundle")
    if ".." in parts:
        raise ArtifactError(f"{where} {rel!r} leaves the bundle ('..')")
    if not (root / rel).resolve().is_relative_to(root.resolve()):
        raise ArtifactError(f"{where} {rel!r} leads outside the bundle through a symbolic link")
    return root / rel


def manifest_paths(manifest: dict[str, Any]) -> list[tuple[str, object]]:
    """(field, path) of every manifest entry naming a file or folder that a reader opens or writes.

    Provenance fields (``config``, ``student.source``, ``quantization.artifact``) record the exporting
    host and are never opened."""
    out: list[tuple[str, object]] = [(f"files[{rel!r}]", rel) for rel in manifest["files"]]
    for tower, entry in manifest["models"].items():
        out.append((f"models.{tower}.file", entry.get("file")))
        if entry.get("engine") is not None:
            out.append((f"models.{tower}.engine.file", at(entry, "engine", "file")))
    if manifest.get("tokenizer") is not None:
        out.append(("tokenizer.dir", at(manifest, "tokenizer", "dir")))
    out.append(("target.options.timing_cache", timing_cache_file(manifest)))
    return out


def device_added(manifest: dict[str, Any]) -> set[str]:
    """Files a bundle may hold beyond its manifest: the signature and what the device builds there."""
    engines = {engine_file(t) for t in manifest["models"]}
    engines |= {at(e, "engine", "file") for e in manifest["models"].values()} - {None}
    return {SIGNATURE, ENGINES_JSON, timing_cache_file(manifest), *engines}


def _check_structure(root: Path, manifest: dict[str, Any]) -> None:
    where = root / MANIFEST
    if manifest.get("schema_version") != SCHEMA:
        raise ArtifactError(f"{where}: bundle schema_version {manifest.get('schema_version')!r}; this "
                            f"edge-msd reads schema {SCHEMA} (use the edge-msd that wrote the bundle)")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(h, str) and _HEX64.fullmatch(h)
                                              for h in files.values()):
        raise ArtifactError(f"{where}: 'files' must map relative paths to sha256 hex digests")
    models = manifest.get("models")
    if not isinstance(models, dict) or not models or not all(isinstance(e, dict) for e in models.values()):
        raise ArtifactError(f"{where}: 'models' is missing, empty or not a table of model entries")
    for key in TABLES:
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):  # readers look inside
            raise ArtifactError(f"{where}: '{key}' must be a table, got {type(manifest[key]).__name__}")


def _check_paths(root: Path, manifest: dict[str, Any]) -> None:
    for field, rel in manifest_paths(manifest):
        confined(root, rel, field)
    listed = {PurePosixPath(f).as_posix() for f in manifest["files"]}
    for tower, entry in manifest["models"].items():
        rel = PurePosixPath(entry["file"]).as_posix()
        if rel not in listed and not any(f.startswith(rel + "/") for f in listed):
            raise ArtifactError(f"{root / MANIFEST}: models.{tower}.file {rel!r} is not among the files "
                                "whose sha256 the manifest lists")


def present_files(root: Path) -> list[str]:
    """Every file and symbolic link under ``root`` (relative POSIX paths, links not followed)."""
    out = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        for name in files + [d for d in dirs if (here / d).is_symlink()]:
            path = here / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
                raise ArtifactError(f"{path}: symbolic link leading outside the bundle")
            out.append(rel)
    return out


def _check_unlisted(root: Path, manifest: dict[str, Any]) -> None:
    allowed = set(manifest["files"]) | device_added(manifest) | {MANIFEST}
    foreign = sorted(set(present_files(root)) - allowed)
    if foreign:
        raise ArtifactError(f"{root / foreign[0]}: not listed in {MANIFEST} (foreign file)")


def parse_digest(text: str, option: str = "--expect-digest") -> str:
    """A user-given digest, lower-cased; anything but 64 hex digits is a ConfigError."""
    digest = text.strip().lower()
    if not _HEX64.fullmatch(digest):
        raise ConfigError(f"{option}: expected the 64 hex digits of a bundle digest, got {text!r}")
    return digest


def check_bundle(root: str | Path, expect_digest: str | None = None, public_key: str | Path | None = None
                 ) -> Verified:
    """Apply the rule set to the bundle folder ``root``; raise ArtifactError naming the first breach.

    The manifest is trusted first (digest, signature), then the files it lists."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root}: bundle folder not found (unpack a .tar.gz bundle first)")
    manifest = read_manifest(root, kind=KIND)
    _check_structure(root, manifest)
    _check_paths(root, manifest)
    digest = bundle_digest(manifest)
    if expect_digest is not None and digest != parse_digest(expect_digest):
        raise ArtifactError(f"{root / MANIFEST}: bundle digest {digest} differs from the expected "
                            f"{parse_digest(expect_digest)} (the manifest was edited or is another bundle)")
    signature = None
    if public_key is not None:
        from edge_msd.contract.signing import verify_signature

        signature = verify_signature(root / SIGNATURE, digest, Path(public_key))
    verify_files(root, manifest)
    _check_unlisted(root, manifest)
    return Verified(manifest, digest, signature)
