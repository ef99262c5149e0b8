"""A teacher given as two ONNX graphs (image.onnx, text.onnx) plus teacher.json, run with onnxruntime.

teacher.json says how to feed them::

    {"preprocess": {"size": [224, 224], "mean": [..3], "std": [..3],
                    "interpolation": "bicubic", "resize_mode": "shortest"},
     "tokenizer": {"kind": "clip-bpe", "context_length": 77}}      # open_clip's CLIP BPE tokenizer
     # or {"kind": "hf", "dir": "tokenizer", "context_length": 32}  # HF tokenizer files in that subfolder
     # or {"kind": "open_clip", "name": "ViT-B-32", "context_length": 77}

Each graph takes one input (NCHW float32 images; int64 token ids) and returns (B, D) embeddings;
they are L2-normalised here whether or not the graph does it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from edge_msd.artifacts import atomic_dir, atomic_write_json, sha256_bytes, sha256_file, write_manifest
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.teachers.open_clip_teacher import eval_transform, set_offline

TEACHER_JSON = "teacher.json"
IMAGE_ONNX = "image.onnx"
TEXT_ONNX = "text.onnx"
KIND = "edge-msd-onnx-teacher"


def _require(meta: dict, path: Path, *keys: str) -> Any:
    node: Any = meta
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise ArtifactError(f"{path}: field '{'.'.join(keys[: i + 1])}' is missing")
        node = node[key]
    return node


def _make_tokenizer(meta: dict, folder: Path, path: Path) -> Any:
    import open_clip
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    tok = _require(meta, path, "tokenizer")
    kind = _require(meta, path, "tokenizer", "kind")
    context_length = int(_require(meta, path, "tokenizer", "context_length"))
    if kind == "clip-bpe":
        return SimpleTokenizer(context_length=context_length)
    if kind == "open_clip":
        return open_clip.get_tokenizer(
            _require(meta, path, "tokenizer", "name"), context_length=context_length
        )
    if kind == "hf":
        tok_dir = folder / tok.get("dir", "tokenizer")
        if not tok_dir.is_dir():
            raise ArtifactError(f"{path}: tokenizer folder {tok_dir} is missing")
        return HFTokenizer(str(tok_dir), context_length=context_length)
    raise ArtifactError(f"{path}: field 'tokenizer.kind' is {kind!r}, expected clip-bpe, hf or open_clip")


class OnnxTeacher:
    """A Teacher whose towers run in onnxruntime (CPU, or CUDA when asked for and available)."""

    def __init__(self, folder: str | Path, spec: str, device: str = "cpu"):
        set_offline()  # an HF tokenizer folder must never trigger a download
        import onnxruntime as ort

        folder = Path(folder).expanduser().resolve()
        path = folder / TEACHER_JSON
        for name in (TEACHER_JSON, IMAGE_ONNX, TEXT_ONNX):
            if not (folder / name).is_file():
                raise ConfigError(
                    f"teacher spec {spec!r}: {folder / name} is missing "
                    f"(an ONNX teacher folder has {IMAGE_ONNX}, {TEXT_ONNX} and {TEACHER_JSON})"
                )
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path}: not valid JSON ({e})") from e
        pre = _require(meta, path, "preprocess")
        _require(meta, path, "preprocess", "size")  # checked here so the error names the field
        self.preprocess_cfg = dict(pre)
        self._transform = eval_transform(self.preprocess_cfg)
        self.tokenizer = _make_tokenizer(meta, folder, path)
        self.device = torch.device("cpu")  # where encode_* take their inputs (onnxruntime copies them)
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self._sessions = {}
        for tower, name in (("image", IMAGE_ONNX), ("text", TEXT_ONNX)):
            try:
                self._sessions[tower] = ort.InferenceSession(str(folder / name), providers=providers)
            except Exception as e:  # onnxruntime raises its own exception types for bad graphs
                raise ArtifactError(f"{folder / name}: onnxruntime cannot load it ({e})") from e
        self._text_dtype = np.int32 if "int32" in self._sessions["text"].get_inputs()[0].type else np.int64
        hashes = "".join(sha256_file(folder / n) for n in (IMAGE_ONNX, TEXT_ONNX, TEACHER_JSON))
        self.id = f"{spec}|sha256:{sha256_bytes(hashes.encode())}"
        self.embed_dim = int(self.encode_text(self.tokenize(["a photo"])).shape[1])

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._transform(image)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def _run(self, tower: str, x: np.ndarray) -> torch.Tensor:
        sess = self._sessions[tower]
        (out,) = sess.run([sess.get_outputs()[0].name], {sess.get_inputs()[0].name: x})
        return torch.nn.functional.normalize(torch.from_numpy(np.asarray(out, dtype=np.float32)), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._run("image", images.detach().cpu().numpy().astype(np.float32))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run("text", tokens.detach().cpu().numpy().astype(self._text_dtype))


class _Tower(torch.nn.Module):
    """One tower of an open_clip model as a graph with one input and normalised embeddings out."""

    def __init__(self, model: torch.nn.Module, which: str):
        super().__init__()
        self.model, self.which = model, which

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = self.model.encode_image if self.which == "image" else self.model.encode_text
        return fn(x, normalize=True)


def _tokenizer_meta(teacher: Any, folder: Path) -> dict:
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    tok = teacher.tokenizer
    if isinstance(tok, HFTokenizer):
        tok.save_pretrained(str(folder / "tokenizer"))
        return {"kind": "hf", "dir": "tokenizer", "context_length": tok.context_length}
    if isinstance(tok, SimpleTokenizer):
        return {"kind": "clip-bpe", "context_length": tok.context_length}
    raise ConfigError(
        f"ONNX export: the tokenizer {type(tok).__name__} cannot be described in {TEACHER_JSON} "
        "(supported: open_clip SimpleTokenizer, HFTokenizer)"
    )


def export_onnx_teacher(teacher: Any, out: str | Path, opset: int = 18, force: bool = False) -> Path:
    """Write an open_clip teacher as an ONNX teacher folder (image.onnx, text.onnx, teacher.json, manifest).

    ``teacher`` is an OpenClipTeacher; the batch dimension of both graphs is dynamic.
    """
    out = Path(out)
    model = teacher.model.float().cpu().eval()
    h, w = teacher.image_size
    image = torch.randn(2, 3, h, w)
    tokens = teacher.tokenize(["a photo of a cat", "two dogs"])
    with atomic_dir(out, force=force) as tmp:
        for which, x, in_name in (("image", image, "image"), ("text", tokens, "tokens")):
            torch.onnx.export(
                _Tower(model, which),
                (x,),
                str(tmp / f"{which}.onnx"),
                input_names=[in_name],
                output_names=["embedding"],
                dynamic_axes={in_name: {0: "batch"}, "embedding": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
        meta = {
            "source": teacher.id,
            "embed_dim": teacher.embed_dim,
            "preprocess": {
                k: teacher.preprocess_cfg[k]
                for k in ("size", "mean", "std", "interpolation", "resize_mode", "fill_color")
                if k in teacher.preprocess_cfg
            },
            "tokenizer": _tokenizer_meta(teacher, tmp),
        }
        atomic_write_json(tmp / TEACHER_JSON, meta)
        write_manifest(tmp, KIND, config={"opset": opset}, source=teacher.id)
    return out
