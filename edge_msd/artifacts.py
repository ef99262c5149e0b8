"""Artifacts on disk: atomic writes, sha256, and the manifest every artifact carries.

An artifact is a folder with a ``manifest.json``: what produced it (versions, config, git
revision), what it is (``kind``), and the sha256 of each file in it. Writes go to a temp path
first and are renamed into place, so an interrupted run never leaves a half-written artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from edge_msd import __version__
from edge_msd.errors import ArtifactError, StorageError, storage_message

MANIFEST = "manifest.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def current_umask() -> int:
    # Python has no getter: set a strict mask for an instant (never a looser one), then restore it.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike, within: Path | None = None) -> Iterator[None]:
    """Turn an OSError the user can fix into a StorageError naming what failed; other OSErrors pass.

    ``path`` is what is being written, ``within`` the temp folder that becomes ``path`` (atomic_dir).
    """
    try:
        yield
    except OSError as e:
        msg = storage_message(e, _failed_path(Path(path), e.filename, within))
        if msg is None:
            raise
        raise StorageError(f"{msg} (nothing already there was changed)") from e


def _failed_path(path: Path, filename: str | None, within: Path | None) -> Path:
    if not filename:
        return path
    failed = Path(filename)
    if within is not None and failed.is_relative_to(within):
        return path / failed.relative_to(within)  # named as it will be once renamed
    if within is not None or path.is_relative_to(failed):
        return failed  # a file read on the way, or a parent folder that cannot be made
    return path  # the temp file beside ``path``


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` (mode 0666 & ~umask) once the block ends without error."""
    path = Path(path)
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp makes 0600
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final`` in one rename.

    An existing ``final`` is refused unless ``force``; with ``force`` it is only removed once the
    new folder is complete, so a failure never loses what was there. A file at ``final`` is always
    refused. The folder gets mode 0777 & ~umask, like one made by mkdir.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise ArtifactError(f"{final} is a file, expected a folder for this output; choose another path")
    if final.exists() and not force:
        raise ArtifactError(f"{final} already exists; pass --force to replace it")
    with storage_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        with storage_errors(final, tmp):
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
            yield tmp
            _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is put back if the second rename fails."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def producer_info() -> dict[str, Any]:
    """Versions of what produced an artifact (only packages already imported are listed)."""
    versions = {"edge-msd": __version__, "python": platform.python_version()}
    for mod in ("torch", "numpy", "open_clip", "timm", "onnx", "onnxruntime", "coremltools", "litert_torch"):
        if mod in sys.modules:
            versions[mod] = getattr(sys.modules[mod], "__version__", "unknown")
    return {
        "versions": versions,
        "git_revision": git_revision(),
        "host": platform.node(),
        "platform": platform.platform(),
        "created_unix": round(time.time(), 3),
    }


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative POSIX paths), the manifest itself excluded."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(folder).as_posix()] = sha256_file(p)
    return out


def write_manifest(folder: str | os.PathLike, kind: str, config: Any = None, **fields: Any) -> dict:
    """Write ``folder/manifest.json`` with producer, config, the given fields and file hashes."""
    folder = Path(folder)
    manifest = {
        "kind": kind,
        "producer": producer_info(),
        "config": config,
        **fields,
        "files": file_hashes(folder),
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def read_json(path: str | os.PathLike) -> Any:
    """Parse a UTF-8 JSON file; bytes that are not JSON are an ArtifactError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from e


def read_manifest(folder: str | os.PathLike, kind: str | None = None) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} is not an edge-msd artifact: {MANIFEST} is missing")
    manifest = read_json(path)
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{path}: kind is {manifest.get('kind')!r}, expected {kind!r}")
    return manifest


def is_inside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path`` is ``root`` or lies under it once ``..`` and symlinks are resolved."""
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


def verify_files(folder: str | os.PathLike, manifest: dict | None = None) -> None:
    """Raise ArtifactError naming the first file that lies outside ``folder``, is missing or whose
    sha256 differs."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    for rel, expected in manifest.get("files", {}).items():
        p = folder / rel
        if not is_inside(folder, p):
            raise ArtifactError(f"{folder / MANIFEST}: file {rel!r} lies outside the artifact")
        if not p.is_file():
            raise ArtifactError(f"{p}: listed in {MANIFEST} but missing")
        actual = sha256_file(p)
        if actual != expected:
            raise ArtifactError(f"{p}: sha256 {actual[:16]}… differs from manifest {expected[:16]}…")
