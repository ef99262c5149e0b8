"""Deploy bundles (docs/bundle.md): export a student for a target, check parity, write, verify.

fp32/fp16 models are converted here by the target's family (edge_msd/families). int8 models are made
before export, by the quant stage with the family's recipe: the bundle ships a quantized artifact
(``edge-msd qat`` or ``ptq`` output, ``--quantized``; ``edge_msd.pipeline.export_target`` runs PTQ
first when none is given). Either way parity is measured against the float student, and the
artifact's recipe and calibration set are recorded in the bundle manifest.

The bundle is written into a temp folder and renamed into place, so a failed export (conversion
error, failing parity) never leaves a half-written bundle nor touches an existing one.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from edge_msd.artifacts import (
    MANIFEST,
    atomic_dir,
    atomic_writer,
    file_hashes,
    producer_info,
    read_manifest,
    sha256_file,
    verify_files,
)
from edge_msd.contract.format import (
    EVALSET,
    KIND,
    PROBE,
    SCHEMA,
    SIGNATURE,
    TARGET_TOML,
    TOKENIZER_DIR,
    TOKENIZER_JSON,
    TOWERS,
    model_file,
)
from edge_msd.contract.integrity import Verified, bundle_digest, check_bundle
from edge_msd.contract.raw import IMAGE_BYTES, JPEG_QUALITY, pack_files
from edge_msd.contract.reading import image_model_input
from edge_msd.contract.signing import write_signature
from edge_msd.data.base import ImageTextDataset
from edge_msd.data.files import FileImageDataset
from edge_msd.distill.images import split_preprocess
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.eval.retrieval import first_images
from edge_msd.export.config import ExportConfig
from edge_msd.export.parity import parity_report
from edge_msd.families import family
from edge_msd.families.common.base import ExportRequest, Family
from edge_msd.families.common.quantizer import QUANTIZED_KIND, file_size
from edge_msd.students.towers import Student, load_student_towers
from edge_msd.targets import TargetProfile, load_target

console = Console(stderr=True)


def model_images(student: Student, ds: ImageTextDataset, indices: list[int]) -> np.ndarray:
    """uint8 (N, H, W, 3): open_clip's own eval resize + crop, stopping before ToTensor/Normalize."""
    to_uint8 = split_preprocess(student.val_transform)[0]
    return np.stack([to_uint8(ds.load_image(i)) for i in indices])


def image_file(ds: ImageTextDataset, index: int) -> bytes:
    """Image ``index`` as an encoded file for the device to decode: the dataset's own file when it has
    files, else a JPEG (quality ``JPEG_QUALITY``, no chroma subsampling) of the decoded image."""
    if isinstance(ds, FileImageDataset):
        return Path(ds.paths[index]).read_bytes()
    buf = io.BytesIO()
    ds.load_image(index).convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def image_files_kind(ds: ImageTextDataset) -> str:
    """How ``image_file`` encodes this dataset's images (recorded in the manifest)."""
    return "source files" if isinstance(ds, FileImageDataset) else f"jpeg q{JPEG_QUALITY} 4:4:4"


def image_text_set(student: Student, ds: ImageTextDataset, n_images: int) -> dict[str, np.ndarray]:
    """The first ``n_images`` images (0: all) with all their captions, as bundle arrays: the images
    prepared here (``images``, ``tokens``) and raw (``image_bytes``/``image_offsets``, ``texts``)."""
    cap_idx = np.asarray(ds.caption_image_index, dtype=np.int64)
    n, caps = first_images(cap_idx, ds.n_images, n_images)
    if len(caps) == 0:
        raise ConfigError(f"{ds.spec} [{ds.split}]: the first {n} images have no captions")
    texts = [ds.captions[j] for j in caps]
    tokens = np.asarray(student.tokenizer(texts), dtype=np.int32)
    return {"images": model_images(student, ds, list(range(n))), "tokens": tokens,
            "caption_image_index": cap_idx[caps], "texts": np.array(texts, dtype=str),
            **pack_files([image_file(ds, i) for i in range(n)])}


@torch.no_grad()
def torch_embeddings(student: Student, images_u8: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
    x = torch.from_numpy(student.preprocess.normalise(images_u8))
    return {"image": student.image(x).numpy().astype(np.float32),
            "text": student.text(torch.from_numpy(tokens)).numpy().astype(np.float32)}


def write_tokenizer(student: Student, folder: Path) -> dict:
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    if not isinstance(student.tokenizer, SimpleTokenizer):
        raise ConfigError(f"student tokenizer {type(student.tokenizer).__name__}: only open_clip's CLIP BPE "
                          "tokenizer ships in bundles")
    folder.mkdir(parents=True)
    vocab = Path(default_bpe())
    shutil.copyfile(vocab, folder / vocab.name)
    meta = {"vocab": vocab.name, "context_length": student.context_length, "clean": "lower",
            "sot_token": student.tokenizer.sot_token_id, "eot_token": student.tokenizer.eot_token_id,
            "source": f"open_clip {open_clip.__version__} SimpleTokenizer"}
    (folder / TOKENIZER_JSON).write_text(json.dumps(meta, indent=2))
    return {"dir": folder.name, **{k: meta[k] for k in ("context_length", "sot_token", "eot_token")}}


def read_quantized(art: Path, profile: TargetProfile, exporter: Family) -> dict:
    """The manifest of a verified quantized artifact made for ``profile`` in ``exporter``'s format."""
    if not art.is_dir():
        raise ArtifactError(f"{art}: quantized artifact not found (`edge-msd qat --target {profile.name}`)")
    manifest = read_manifest(art, QUANTIZED_KIND)
    verify_files(art, manifest)
    if manifest.get("target") != profile.name:
        raise ConfigError(f"{art} was quantized for target {manifest.get('target')!r}, not {profile.name!r}; "
                          f"export it with --target {manifest.get('target')} or quantize for {profile.name}")
    for tower in TOWERS:
        if Path(manifest["towers"][tower]["file"]).suffix != f".{exporter.ext}":
            raise ArtifactError(f"{art}: the {tower} model {manifest['towers'][tower]['file']} is not "
                                f".{exporter.ext}, the {profile.exporter} format")
    return manifest


def ship_quantized(exporter: Family, art: Path, manifest: dict, folder: Path, student: Student,
                   profile: TargetProfile, source: str | None) -> tuple[dict[str, dict], dict]:
    """Copy the artifact's int8 towers into the bundle; returns their model entries and a summary.

    ``source``: the artifact's path as given, None when export made it (PTQ, not kept)."""
    models, towers = {}, {}
    for tower in TOWERS:
        entry = manifest["towers"][tower]
        rel = model_file(tower, exporter.ext)
        exporter.ship(art / entry["file"], folder / rel, tower, student, profile)
        models[tower] = exporter.describe(folder, rel, tower, "int8", profile)
        if "delegation" in entry:  # what the delegate took, known only when the quantizer lowered it
            models[tower]["delegation"] = entry["delegation"]
        towers[tower] = {k: entry[k] for k in ("quantization", "kept_float", "calibration_cosine",
                                               "fallback_reason") if k in entry}
        towers[tower]["quantized_layers"] = len(entry.get("quantized_layers", []))
    info = {"method": manifest["method"], "recipe": manifest["recipe"], "towers": towers, "artifact": source,
            "artifact_manifest_sha256": sha256_file(art / MANIFEST), "train": manifest.get("train")}
    return models, info


def export_precision(cfg: ExportConfig, profile: TargetProfile) -> str:
    """The precision this export writes (``--quantized`` ships int8; else the option or the profile's)."""
    precision = "int8" if cfg.quantized else cfg.precision or profile.precision
    if precision not in profile.precisions:
        raise ConfigError(f"target {profile.name}: precision {precision!r} not in {profile.precisions}")
    if precision == "int8" and profile.options.image_input == "uint8_nhwc":
        raise ConfigError(f"{profile.source}: the int8 recipes do not fuse the uint8_nhwc image input yet; "
                          'set [options] image_input = "float_nchw" for int8')
    return precision


def export_bundle(cfg: ExportConfig, dataset: ImageTextDataset | None = None,
                  made_for_export: Path | None = None) -> dict:
    """Export for ``cfg.target`` into the bundle ``cfg.out_dir()``; returns the manifest.

    ``dataset`` (the probe and eval set) defaults to ``cfg.data`` [``cfg.split``], which default to the
    student's recorded data and test split; the manifest's ``data`` names the set actually used.
    int8 ships ``cfg.quantized``, or ``made_for_export``: an artifact the pipeline quantized for this
    export and does not keep (``edge_msd.pipeline.export_target``).
    """
    cfg.validate()
    profile = load_target(cfg.target)
    precision = export_precision(cfg, profile)
    out = cfg.out_dir()
    if out.exists() and not cfg.force:
        raise ArtifactError(f"{out} already exists; pass --force to replace it")
    exporter = family(profile.exporter)  # the profile was checked against it when loaded
    if precision == "int8" and not (cfg.quantized or made_for_export):
        raise ConfigError(f"target {profile.name}: int8 ships a quantized artifact; make one with "
                          f"`edge-msd ptq --target {profile.name}` (or qat) and pass it as --quantized")
    art_manifest = read_quantized(Path(cfg.quantized), profile, exporter) if cfg.quantized else None
    student_dir = (Path(cfg.student) if cfg.student else
                   Path(art_manifest["student"]["source"]) if art_manifest else cfg.student_dir())
    student = load_student_towers(student_dir)
    cfg = cfg.resolved(student_dir, need_data=dataset is None)
    if profile.resolution != "student" and tuple(student.preprocess.size) != (profile.resolution,) * 2:
        raise ConfigError(f"{profile.source}: resolution {profile.resolution} differs from the student's "
                          f"{student.preprocess.size}; use \"student\" or re-train at that size")
    if dataset is None:
        from edge_msd.data import open_dataset

        dataset = open_dataset(cfg.data, cfg.split)
    evalset = image_text_set(student, dataset, cfg.eval_images)
    probe = image_text_set(student, dataset, cfg.probe_images)
    ref = torch_embeddings(student, probe["images"], probe["tokens"])
    calibration = quantization = None
    with atomic_dir(out, cfg.force) as tmp:
        t0 = time.perf_counter()
        if precision == "int8":
            art = Path(cfg.quantized) if cfg.quantized else made_for_export
            manifest = art_manifest or read_quantized(art, profile, exporter)
            if manifest["student"]["sha256"] != student.sha256:
                raise ArtifactError(f"{art} was quantized from another student "
                                    f"({manifest['student']['source']}), not {student.source}")
            models, quantization = ship_quantized(exporter, art, manifest, tmp, student, profile,
                                                  cfg.quantized)
            calibration = manifest["calibration"]
        else:
            with console.status(f"exporting {student.name} for {profile.name} ({precision})"):
                models = exporter.export(ExportRequest(student, profile, precision), tmp)
        export_s = time.perf_counter() - t0
        tokenizer = write_tokenizer(student, tmp / TOKENIZER_DIR)
        shutil.copyfile(profile.source, tmp / TARGET_TOML)
        np.savez(tmp / PROBE, **probe, image_emb=ref["image"], text_emb=ref["text"])
        np.savez(tmp / EVALSET, **evalset)
        parity = run_parity(exporter, models, tmp, student, probe, ref, profile.parity[precision])
        for entry in models.values():
            entry["size_bytes"] = file_size(tmp / entry["file"])
        delegate_check, delegate_warnings = check_delegate(exporter, profile, models, tmp)
        manifest = {
            "kind": KIND, "schema_version": SCHEMA, "producer": producer_info(),
            "config": asdict(cfg),
            "target": {k: v for k, v in asdict(profile).items() if k != "source"},
            "student": {"name": student.name, "source": student.source, "sha256": student.sha256},
            "models": models, "preprocessing": student.preprocess.to_manifest(), "tokenizer": tokenizer,
            "parity": parity, "calibration": calibration, "quantization": quantization,
            "data": {"spec": dataset.spec, "split": dataset.split, "fingerprint": dataset.fingerprint(),
                     "probe_images": len(probe["images"]), "eval_images": len(evalset["images"]),
                     "raw": {"images": image_files_kind(dataset), "probe_bytes": int(probe[IMAGE_BYTES].size),
                             "eval_bytes": int(evalset[IMAGE_BYTES].size)}},
            "delegate_check": delegate_check, "delegate_warnings": delegate_warnings,
            "export_seconds": round(export_s, 2), "files": file_hashes(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        if parity.get("passed") is False and not cfg.allow_parity_fail:
            raise ArtifactError(f"{out}: parity failed for {profile.name} {precision}: "
                                f"{_parity_line(parity)}; pass --allow-parity-fail to keep the bundle")
    if cfg.tar:
        pack(out)
    return manifest


def check_delegate(exporter: Family, profile: TargetProfile, models: dict,
                   folder: Path) -> tuple[dict, list[str]]:
    """The family's graph check of the exported models, and its warnings, printed as they come; the
    bench report repeats them beside the placement it measures."""
    warnings: list[str] = []

    def warn(line: str) -> None:
        warnings.append(line)
        console.print(f"warning: {line}", soft_wrap=True, markup=False)

    return exporter.check_graph(profile, models, folder, warn), warnings


def run_parity(exporter: Family, models: dict, folder: Path, student: Student, probe: dict, ref: dict,
               thresholds: dict) -> dict:
    runners = {t: exporter.runner(e, folder) for t, e in models.items()}
    skipped = {t: r for t, r in runners.items() if isinstance(r, str)}
    if skipped:
        return {"skipped": next(iter(skipped.values())), "passed": None, "thresholds": dict(thresholds)}
    # through the model's own input contract: uint8 frames where normalisation is in the model
    x = image_model_input(probe["images"], student.preprocess.to_manifest(), models["image"]["inputs"][0])
    out = {"image": runners["image"](x), "text": runners["text"](probe["tokens"])}
    report = parity_report(ref, out, probe["caption_image_index"], thresholds)
    report["runtime"] = models["image"].get("parity_runtime", exporter.format)
    report["probe"] = {"images": len(x), "captions": len(probe["tokens"])}
    return report


def _parity_line(p: dict) -> str:
    return ", ".join(f"{t} min_cos {p[t]['min_cos']:.4f} ΔR@1 {p[t]['delta_R@1']:+.2f}"
                     for t in ("image", "text"))


def pack(folder: Path) -> Path:
    """Write ``<folder>.tar.gz`` (atomically) holding the bundle under its folder name."""
    dest = folder.with_name(folder.name + ".tar.gz")
    with atomic_writer(dest) as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return dest


def verify_bundle(path: str | Path, expect_digest: str | None = None, public_key: str | None = None
                  ) -> Verified:
    """Check a bundle folder (or .tar.gz) by the rule set the benchmark applies (``check_bundle``)."""
    path = Path(path)
    if path.is_file() and path.name.endswith(".tar.gz"):
        with tempfile.TemporaryDirectory() as d:
            try:
                with tarfile.open(path) as tar:
                    tar.extractall(d, filter="data")
            except (tarfile.TarError, EOFError, OSError) as e:
                raise ArtifactError(f"{path}: truncated or not a tar.gz ({e})") from e
            inner = [p for p in Path(d).iterdir() if p.is_dir()]
            if len(inner) != 1:
                raise ArtifactError(f"{path}: expected one bundle folder inside")
            return verify_bundle(inner[0], expect_digest, public_key)
    return check_bundle(path, expect_digest, public_key)


def sign_bundle(path: str | Path, private_key: str | Path) -> dict[str, str]:
    """Verify the bundle folder, then write its signature (``manifest.sig``); re-pack ``<bundle>.tar.gz``
    when one lies beside it, so that the packed copy carries the signature too."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: sign a bundle folder (unpack a .tar.gz first)")
    checked = check_bundle(path)
    sig = write_signature(path / SIGNATURE, checked.digest, Path(private_key))
    if path.with_name(path.name + ".tar.gz").is_file():
        pack(path)
    return sig


def summary(manifest: dict, out: str) -> None:
    """Print the export's sizes and parity as a rich table, and the bundle digest (from the written file)."""
    from rich.table import Table

    parity = manifest["parity"]
    table = Table("tower", "file", "precision", "size", "min cos", "mean cos", "ΔR@1", "parity",
                  title=f"{out}  ({manifest['target']['name']}, {manifest['export_seconds']} s)")
    for tower, e in manifest["models"].items():
        p = parity.get(tower, {})
        status = ("skipped: " + parity["skipped"] if "skipped" in parity
                  else "ok" if p.get("passed") else "FAIL")
        table.add_row(tower, e["file"], e["precision"], f"{e['size_bytes'] / 1e6:.2f} MB",
                      f"{p['min_cos']:.5f}" if p else "-", f"{p['mean_cos']:.5f}" if p else "-",
                      f"{p['delta_R@1']:+.2f}" if p else "-", status)
    console.print(table)
    console.print(f"bundle digest: {bundle_digest(read_manifest(Path(out), KIND))}", soft_wrap=True)
