"""Student presets build, and a saved student loads with plain open_clip to the same embeddings."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edge_msd.artifacts import read_manifest
from edge_msd.cli import main
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.students import create_student, list_presets, load_open_clip_student, save_student, tower_params


def test_presets_grow_and_build():
    assert list_presets() == ["edge-xs", "edge-s", "edge-m"]
    sizes = []
    for preset in list_presets():
        m = create_student(preset)
        with torch.no_grad():
            img = m.encode_image(torch.zeros(2, 3, 64, 64))
            txt = m.encode_text(torch.ones(2, 32, dtype=torch.long))
        assert img.shape == txt.shape == (2, 256)
        sizes.append(tower_params(m)["total"])
    assert sizes == sorted(sizes)
    assert create_student("edge-xs", embed_dim=48).text_projection.shape == (96, 48)


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="known: edge-xs, edge-s, edge-m"):
        create_student("edge-xl")


@pytest.mark.parametrize(("preset", "size"), [("edge-xs", 64), ("edge-s", 64)])
def test_save_then_plain_open_clip_load_gives_same_embeddings(tmp_path, preset, size):
    torch.manual_seed(0)
    model = create_student(preset, embed_dim=32).eval()
    for m in model.modules():  # BatchNorm statistics that are not the defaults must survive the round trip
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    out = save_student(model, tmp_path / "student", preset, {"note": "test"})
    assert {p.name for p in out.iterdir()} == {"open_clip_config.json", "open_clip_model.safetensors",
                                                "manifest.json"}
    assert read_manifest(out, "student")["note"] == "test"

    plain, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    plain.eval()
    image = Image.new("RGB", (96, 96), (200, 30, 30))
    x = preprocess(image)[None]
    assert x.shape == (1, 3, size, size)
    tokens = tokenizer(["a small red circle on a plain white background"])
    assert tokens.shape == (1, 32)
    with torch.no_grad():
        assert torch.equal(plain.encode_image(x), model.encode_image(x))
        assert torch.equal(plain.encode_text(tokens), model.encode_text(tokens))
    loaded = load_open_clip_student(out)
    assert loaded.preset == preset
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_text(loaded.tokenizer(["a cat"])),
                           model.encode_text(tokenizer(["a cat"])))


def test_tampered_student_refused(tmp_path):
    out = save_student(create_student("edge-xs"), tmp_path / "s", "edge-xs")
    cfg = json.loads((out / "open_clip_config.json").read_text())
    cfg["model_cfg"]["embed_dim"] = 999
    (out / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="open_clip_config.json"):
        load_open_clip_student(out)


def test_students_table():
    result = CliRunner().invoke(main, ["students"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for preset in list_presets():
        assert preset in result.output
    assert "MFLOPs" in result.output and "(default)" in result.output


def test_eval_cli_reads_a_config_and_writes_json(tmp_path):
    out = save_student(create_student("edge-xs", embed_dim=32), tmp_path / "s", "edge-xs")
    toml = tmp_path / "eval.toml"
    toml.write_text(f'[eval]\nmodel = "{out}"\ndata = "demo-scenes?n_train=8&n_val=8&n_test=12&size=32"\n'
                    f'json = "{tmp_path / "m.json"}"\n')
    result = CliRunner().invoke(main, ["eval", "--config", str(toml)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n_images"] == 12 and 0 <= metrics["mean_R@1"] <= 100
    result = CliRunner().invoke(main, ["eval"])
    assert result.exit_code != 0 and "field 'model': required" in result.output


def test_identical_weights_save_to_identical_bytes(tmp_path):
    model = create_student("edge-xs", embed_dim=32)
    # Several saves: the safetensors header once listed its metadata in hash order, different per save.
    weights = {
        (save_student(model, tmp_path / f"s{i}", "edge-xs") / "open_clip_model.safetensors").read_bytes()
        for i in range(4)
    }
    assert len(weights) == 1
