"""The bench tests' tiny ONNX bundle (numpy references, so parity and recall have known answers),
the clean environment the benchmark binary runs in (no torch, no editable install), fake vendor
tools and the recorded tool output under tests/bench/data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edge_msd.artifacts import atomic_write_json, file_hashes
from edge_msd.bench.options import BenchOptions
from edge_msd.contract.reading import preprocess_images


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """Run with ``python -S``: no site processing, so the editable edge_msd install is invisible and the
    package comes from the .pyz only; site-packages is on the path for numpy and the runtime, behind a
    ``torch`` that raises on import: the binary must not need it."""
    import site

    poison = tmp_path / "poison"
    poison.mkdir(exist_ok=True)
    (poison / "torch.py").write_text("raise ImportError('the benchmark binary must not import torch')\n")
    path = os.pathsep.join([str(poison), *site.getsitepackages()])
    return {"PATH": os.environ["PATH"], "PYTHONPATH": path, "HOME": str(tmp_path), "LANG": "C.UTF-8"}


H = W = 8
DIM, VOCAB, CTX = 16, 50, 6
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _tower_graph(kind: str, weight: np.ndarray, path: Path) -> None:
    """image: flatten → matmul → L2 norm; text: gather → mean over tokens → L2 norm (dynamic batch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if kind == "image":
        inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, H, W])
        nodes = [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["raw"]),
        ]
    else:
        inp = helper.make_tensor_value_info("tokens", TensorProto.INT32, ["batch", CTX])
        nodes = [
            helper.make_node("Gather", ["W", "tokens"], ["emb"], axis=0),
            helper.make_node("ReduceMean", ["emb", "axes"], ["raw"], keepdims=0),
        ]
    nodes += [
        helper.make_node("ReduceL2", ["raw", "axes_last"], ["norm"], keepdims=1),
        helper.make_node("Div", ["raw", "norm"], ["embedding"]),
    ]
    inits = [
        numpy_helper.from_array(weight.astype(np.float32), "W"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes_last"),
    ]
    if kind == "text":
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIM])
    graph = helper.make_graph(nodes, kind, [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _reference(kind: str, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    """What the graph computes, in numpy: the 'PyTorch student' of these tests."""
    raw = x.reshape(len(x), -1) @ weight if kind == "image" else weight[x].mean(axis=1)
    return _normalise(raw.astype(np.float32))


PRE = {
    "size": [H, W],
    "resize": "bicubic",
    "crop": "center",
    "color_order": "RGB",
    "scale": 1 / 255,
    "mean": MEAN,
    "std": STD,
    "layout": "NCHW",
}


def _weights(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The image and text towers' weights of ``make_bundle`` (its first draws from ``rng``)."""
    return rng.normal(size=(3 * H * W, DIM)), rng.normal(size=(VOCAB, DIM))


def make_bundle(root: Path, n_images: int = 12, caps_per_image: int = 2, target: dict | None = None) -> Path:
    rng = np.random.default_rng(0)
    (root / "models").mkdir(parents=True)
    w_img, w_txt = _weights(rng)
    _tower_graph("image", w_img, root / "models" / "image.onnx")
    _tower_graph("text", w_txt, root / "models" / "text.onnx")
    pre = PRE
    for name in ("probe", "evalset"):
        images = rng.integers(0, 256, size=(n_images, H, W, 3), dtype=np.uint8)
        tokens = rng.integers(0, VOCAB, size=(n_images * caps_per_image, CTX)).astype(np.int32)
        cap_img = np.repeat(np.arange(n_images), caps_per_image).astype(np.int64)
        arrays = {
            "images": images,
            "tokens": tokens,
            "caption_image_index": cap_img,
            "texts": np.array([f"caption {i}" for i in range(len(tokens))]),
        }
        if name == "probe":
            arrays["image_emb"] = _reference("image", w_img, preprocess_images(images, pre))
            arrays["text_emb"] = _reference("text", w_txt, tokens)
        np.savez(root / f"{name}.npz", **arrays)
    entry = {
        "format": "onnx",
        "precision": "fp32",
        "outputs": [{"name": "embedding", "shape": [-1, DIM], "dtype": "float32"}],
    }
    manifest = {
        "kind": "edge-msd-bundle",
        "schema_version": 1,
        "producer": {},
        "config": {},
        "target": target or {"name": "onnx", "batch_sizes": [1, 4], "bench": {"warmup": 2, "iterations": 5}},
        "student": {"name": "tiny", "source": "test", "sha256": ""},
        "models": {
            "image": {
                **entry,
                "file": "models/image.onnx",
                "inputs": [{"name": "image", "shape": [-1, 3, H, W], "dtype": "float32", "layout": "NCHW"}],
            },
            "text": {
                **entry,
                "file": "models/text.onnx",
                "inputs": [{"name": "tokens", "shape": [-1, CTX], "dtype": "int32"}],
            },
        },
        "preprocessing": pre,
        "tokenizer": {"dir": "tokenizer", "context_length": CTX, "sot_token": 49406, "eot_token": 49407},
        "parity": {},
        "calibration": None,
        "files": file_hashes(root),
    }
    atomic_write_json(root / "manifest.json", manifest)
    return root


def _opts(bundle: Path, out: Path, **kw) -> BenchOptions:
    base = {"bundle": str(bundle), "out": str(out), "iters": 5, "warmup": 1, "batch": [1, 4], "threads": 1}
    return BenchOptions(**{**base, **kw})


# benchmark_model --enable_op_profiling=true: real output as published in public GitHub repositories'
# notes, trimmed to a few rows. _xnnpack: LiteRT's linux_x86-64 binary on an int8 EfficientDet-Lite0, with
# XNNPACK's per-op profiling inside the delegate (no [start] column). _nnapi: an older release,
# tab-separated with a [start] column, on DeepLabV3 with the NNAPI delegate (one TfLiteNnapiDelegate node
# per delegated partition; the ops NNAPI refused run on the interpreter).
DATA = Path(__file__).parent / "bench" / "data"


def _fake_tool(folder: Path, name: str, output: str, log: Path) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "out.txt").write_text(output)
    tool = folder / name
    tool.write_text(f'#!/bin/sh\necho "$@" > {log}\ncat {folder / "out.txt"}\n')
    tool.chmod(0o755)
