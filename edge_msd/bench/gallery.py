"""The gallery index artifact: embeddings of a bundle's eval split or of a folder of images, computed by
the bundle's own device runner, stored per storage (``edge_msd.bench.index``) with a manifest; and its
reading, refused when it was built for another student or embedding size, or names a path outside itself.

Standard library, numpy and the device runtime (Pillow only for a folder of images): ships to the device.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_msd.artifacts import atomic_dir, is_inside, read_manifest, verify_files, write_manifest
from edge_msd.bench import index, raw, sysinfo
from edge_msd.bench.options import _opt
from edge_msd.bench.run import bundle_backend, embed, profile_defaults
from edge_msd.bench.timing import Deadline
from edge_msd.contract.format import EVALSET
from edge_msd.contract.reading import Bundle, image_model_input, input_contract, open_bundle, tower_inputs
from edge_msd.errors import ArtifactError, ConfigError, DataError

KIND = "edge-msd-index"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
KS = (1, 5, 10)


@dataclasses.dataclass
class IndexOptions:
    """Options of ``edge-msd index`` and of the benchmark binary's ``index`` (one definition for both)."""

    bundle: str = _opt("runs/export/onnx", "deploy bundle whose image tower embeds the gallery")
    images: str | None = _opt(None, "folder of images to index (default: the bundle's eval split)")
    strict: bool = _opt(False, "stop at the first unreadable image (default: skip it, count it)")
    storage: list[str] = _opt(list(index.STORAGES), "storages to write, comma-separated")
    rerank: int = _opt(0, "binary: re-score this many Hamming candidates with fp32 (needs fp32 stored)")
    gallery: list[int] = _opt([], "also time search over N random unit vectors, e.g. 10000,100000,1000000")
    runtime: str | None = _opt(None, "runtime of the bundle's towers (default: the profile's, else auto)")
    batch: int | None = _opt(None, "batch of the embedding session (default: the profile's largest)")
    out: str | None = _opt(None, "index folder (default: runs/index/<bundle> from edge-msd index)")
    force: bool = _opt(False, "replace an existing index folder")

    def validate(self) -> None:
        unknown = sorted(set(self.storage) - set(index.KNOWN))
        if unknown or not self.storage:
            raise ConfigError(f"--storage: unknown {', '.join(unknown) or '(none)'}; known: "
                              f"{', '.join(index.KNOWN)} (hnsw: approximate, needs faiss-cpu)")
        if self.rerank and "fp32" not in self.storage:
            raise ConfigError("--rerank re-scores with the fp32 vectors: add fp32 to --storage")
        if self.rerank < 0 or any(n < 1 for n in self.gallery) or (self.batch is not None and self.batch < 1):
            raise ConfigError("--rerank must be ≥ 0, --gallery sizes and --batch ≥ 1")


def folder_images(folder: Path, pre: dict[str, Any], strict: bool) -> tuple[np.ndarray, list[str], list[str]]:
    """uint8 (N, H, W, 3) of the folder's images (sorted by name), their names, and the unreadable ones."""
    if reason := raw.pillow_missing():
        raise ConfigError(f"indexing a folder of images needs Pillow: {reason}")
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise ConfigError(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    size = tuple(pre.get("size") or ())
    if len(size) != 2:
        raise ArtifactError(f"bundle manifest: preprocessing.size is {pre.get('size')!r}, expected [H, W]")
    images, names, bad = [], [], []
    for p in files:
        try:
            images.append(raw.decode_image(p.read_bytes(), pre))  # the bundle's own decode rules
            names.append(p.relative_to(folder).as_posix())
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            if strict:
                raise DataError(f"{p}: cannot decode image ({e})") from None
            bad.append(p.relative_to(folder).as_posix())
    if not images:
        raise DataError(f"--images {folder}: no readable image ({len(bad)} unreadable)")
    return np.stack(images), names, bad


def _session_embed(bundle: Bundle, tower: str, x: np.ndarray, opts: IndexOptions) -> tuple[np.ndarray, str]:
    """Embeddings of ``x`` through the bundle's own runner for ``tower``, and the runtime's name."""
    files, backend = bundle_backend(bundle, [tower], opts.runtime, None)
    defaults = profile_defaults(bundle.target)
    threads = sysinfo.choose_threads(None, defaults.get("threads"))["threads"]
    batch = opts.batch or max(defaults.get("batch") or [1])
    path = next(p for f, p in files[tower].items() if f in backend.formats)
    session = backend().load(bundle.model(tower), path, threads, batch, {})
    try:
        return embed(session, x, batch, Deadline.after(None)), backend.name
    finally:
        session.close()


def _identity(bundle: Bundle, dim: int) -> dict[str, Any]:
    student = bundle.manifest.get("student") or {}
    return {"student": student.get("name"), "student_sha256": student.get("sha256"), "dim": dim,
            "bundle_digest": bundle.digest, "target": bundle.target.get("name")}


def _queries(bundle: Bundle, gallery: np.ndarray, opts: IndexOptions) -> tuple[np.ndarray, str]:
    """The quality queries: the eval split's captions through the text tower (an app's text query),
    else the gallery's own vectors."""
    evalset = bundle.load_npz(EVALSET)
    if evalset is not None and "text" in bundle.towers and "tokens" in evalset:
        emb, _ = _session_embed(bundle, "text", tower_inputs(bundle, "text", evalset), opts)
        return emb, f"{len(emb)} eval-split captions (text tower)"
    return gallery, f"{len(gallery)} gallery vectors"


def reference_top(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Row ids of fp32 exact search, the reference every storage's recall is measured against."""
    return index.search(index.encode(vectors, "fp32"), "fp32", queries, min(max(KS), len(vectors)))[1]


def quality(arrays: dict[str, Any], storage: str, vectors: np.ndarray, queries: np.ndarray,
            reference: np.ndarray, rerank: int) -> dict[str, Any]:
    """One storage: recall@1/5/10 of its top-k against fp32 exact search, ms per query at this N."""
    k = reference.shape[1]
    depth = rerank if storage == "binary" else 0
    index.search(arrays, storage, queries[:1], k, depth, vectors if depth else None)  # warm (hnsw: read)
    t0 = time.perf_counter()
    _, ids = index.search(arrays, storage, queries, k, depth, vectors if depth else None)
    ms = (time.perf_counter() - t0) * 1e3 / len(queries)
    return {"recall": {f"R@{n}": index.recall_at(ids, reference, n) for n in KS if n <= k},
            "overlap@10": index.overlap_at(ids, reference, k), "rerank": depth, "ms_per_query": round(ms, 4)}


def build_index(opts: IndexOptions, out: Path) -> dict[str, Any]:
    """Embed the gallery with the bundle's runner, write one file per storage and the manifest."""
    opts.validate()
    t0 = time.perf_counter()
    bundle = open_bundle(opts.bundle)
    pre = bundle.manifest.get("preprocessing") or {}
    if opts.images:
        images, names, bad = folder_images(Path(opts.images), pre, opts.strict)
        source = {"kind": "folder", "path": str(Path(opts.images).resolve()), "skipped": len(bad),
                  "skipped_files": bad[:100]}
    else:
        evalset = bundle.load_npz(EVALSET)
        if evalset is None:
            raise ArtifactError(f"{bundle.root}: no {EVALSET} to index; give --images FOLDER")
        images, names, source = evalset["images"], None, {"kind": "evalset", "path": EVALSET, "skipped": 0}
    x = image_model_input(images, pre, input_contract(bundle, "image"))
    vectors, runtime = _session_embed(bundle, "image", x, opts)
    build_s = time.perf_counter() - t0
    queries, described = _queries(bundle, vectors, opts)
    storages, reference = {}, reference_top(vectors, queries)
    with atomic_dir(out, force=opts.force) as tmp:
        for storage in opts.storage:  # one storage in memory at a time
            t_storage = time.perf_counter()
            arrays = index.encode(vectors, storage)
            np.savez(tmp / f"{storage}.npz", **arrays)
            storages[storage] = {"file": f"{storage}.npz", "bytes": (tmp / f"{storage}.npz").stat().st_size,
                                 "encode_s": round(time.perf_counter() - t_storage, 3),
                                 **quality(arrays, storage, vectors, queries, reference, opts.rerank)}
        if names is not None:
            (tmp / "items.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
        manifest = write_manifest(
            tmp, KIND, config=dataclasses.asdict(opts), identity=_identity(bundle, vectors.shape[1]),
            n=len(vectors), source=source, items="items.txt" if names is not None else None, runtime=runtime,
            build_s=round(build_s, 3), quality_queries=described, storages=storages,
            search_timings=index.search_timings(vectors.shape[1], opts.gallery, opts.storage,
                                                rerank=opts.rerank) if opts.gallery else [])
    return manifest


@dataclasses.dataclass
class GalleryIndex:
    root: Path
    manifest: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.manifest["identity"]["dim"])

    def arrays(self, storage: str) -> dict[str, np.ndarray]:
        entry = (self.manifest.get("storages") or {}).get(storage)
        if not isinstance(entry, dict):
            raise ConfigError(f"{self.root}: no {storage} storage in this index (it has "
                              f"{', '.join(self.manifest.get('storages') or {})})")
        path = _inside(self.root, entry.get("file"), f"storages.{storage}.file")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def search(self, queries: np.ndarray, storage: str = "int8", k: int = 10, rerank: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, gallery rows) of float32 queries (Q, dim) over one of the stored storages."""
        exact = self.arrays("fp32")["vectors"] if rerank else None
        return index.search(self.arrays(storage), storage, queries, k, rerank, exact)


def _inside(root: Path, rel: object, field: str) -> Path:
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or not is_inside(root, root / rel):
        raise ArtifactError(f"{root / 'manifest.json'}: {field} {rel!r} points outside the index")
    if rel not in (read_manifest(root).get("files") or {}):
        raise ArtifactError(f"{root / 'manifest.json'}: {field} {rel!r} is not among the hashed files")
    return root / rel


def open_index(path: str | Path, bundle: Bundle | None = None) -> GalleryIndex:
    """A verified index (kind, file sha256s, paths inside it); with ``bundle``, refused unless it was
    built for the same student and embedding size."""
    root = Path(path)
    manifest = read_manifest(root, kind=KIND)
    verify_files(root, manifest)
    for storage, entry in (manifest.get("storages") or {}).items():
        _inside(root, (entry or {}).get("file"), f"storages.{storage}.file")
    if manifest.get("items") is not None:
        _inside(root, manifest["items"], "items")
    found = GalleryIndex(root, manifest)
    if bundle is not None:
        check_compatible(found, bundle)
    return found


def check_compatible(found: GalleryIndex, bundle: Bundle) -> None:
    ident = found.manifest.get("identity") or {}
    dims = [o.get("shape", [None, None])[-1] for o in bundle.model("image").get("outputs") or [{}]]
    student = (bundle.manifest.get("student") or {}).get("name")
    if ident.get("student") != student or (dims and dims[0] is not None and ident.get("dim") != dims[0]):
        raise ConfigError(f"{found.root}: index built for student {ident.get('student')!r} (dim "
                          f"{ident.get('dim')}), the bundle {bundle.root} has student {student!r} "
                          f"(dim {dims[0]})")


def format_index(manifest: dict[str, Any], out: Path) -> str:
    """What ``edge-msd index`` prints: the index, then one line per storage and per timed N."""
    ident, fp32_bytes = manifest["identity"], (manifest["storages"].get("fp32") or {}).get("bytes")
    lines = [f"index: {out} ({manifest['n']} vectors of dim {ident['dim']}, student {ident['student']}, "
             f"{manifest['runtime']}, built in {manifest['build_s']:.2f} s, {manifest['source']['skipped']} "
             f"skipped); recall vs fp32 exact on {manifest['quality_queries']}",
             f"{'storage':8} {'bytes':>11} {'×fp32':>6} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'ms/query':>9}"]
    for name, e in manifest["storages"].items():
        ratio = f"{fp32_bytes / e['bytes']:.2f}" if fp32_bytes else "-"
        recall = " ".join(f"{e['recall'].get(k, float('nan')):>6.3f}" for k in ("R@1", "R@5", "R@10"))
        lines.append(f"{name:8} {e['bytes']:>11} {ratio:>6} {recall} {e['ms_per_query']:>9.3f}")
    for row in manifest["search_timings"]:
        lines.append(f"N={row['n']:<8} {row['storage']:8} {row['bytes']:>11} bytes "
                     f"{row['ms_per_query']:.3f} ms/query")
    return "\n".join(lines)
