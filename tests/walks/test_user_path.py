"""The path a real user walks, as a contract: the installed ``edge-msd`` run from the user's own folder
(outside the repository) on an image-caption CSV of real photos, with the user's own open_clip teacher
given as ``local-dir:`` and once as ``onnx:``, through every stage:

    features → distill → calibrate → ptq / qat → export (tflite int8 by PTQ, tflite --quantized, onnx)
    → bench → eval, and the chooser: sweep over presets (and again), sweep --reports of the bench reports

Every later stage must default to what the student recorded (its CSV data, feature root, splits, the
calibration set built from that CSV), never to the embedded demo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from export_helpers import make_tiny_student
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SUBJECTS = {"china.jpg": "an old chinese temple", "flower.jpg": "a pink flower"}
ROWS, COLS = ("top", "middle", "bottom"), ("left", "centre", "right")
PER_PHOTO = {"train": 32, "val": 8, "test": 8}
SWEEP_PRESETS = ("edge-xs", "edge-s")  # the two smallest
SWEEP_DISTILL = "[distill]\nbatch_size = 16\nqueue_size = 64\neval_every = 2\nckpt_every = 2\n"
BENCHED = ("tflite", "tflite-qat", "onnx")


def edge_msd(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    """Run the installed console script (``python -m edge_msd.cli`` where there is none) in ``cwd``."""
    script = Path(sys.executable).with_name("edge-msd")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "edge_msd.cli"]
    env = {**os.environ, "EDGE_MSD_HOME": str(cwd / ".edge-msd-home"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert (r.returncode == 0) is ok, f"edge-msd {' '.join(args)} → {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def write_photo_csv(folder: Path) -> Path:
    """Crops of scikit-learn's two sample photos, captioned by subject and position: pairs.csv + images/."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    lines = ["filepath,title,split"]
    for path, photo in zip(photos.filenames, photos.images, strict=True):
        subject, (h, w) = SUBJECTS[Path(path).name], photo.shape[:2]
        k = 0
        for split, n in PER_PHOTO.items():
            for _ in range(n):
                r, c = divmod(k % 9, 3)
                size = int(rng.integers(90, 140))
                y = int(np.clip((r + 0.5) * h / 3 - size / 2 + rng.integers(-20, 21), 0, h - size))
                x = int(np.clip((c + 0.5) * w / 3 - size / 2 + rng.integers(-20, 21), 0, w - size))
                name = f"images/{Path(path).stem}_{k:02d}.jpg"
                Image.fromarray(photo[y : y + size, x : x + size]).save(folder / name, quality=90)
                lines.append(f"{name},\"{subject}, {ROWS[r]} {COLS[c]} of the photo\",{split}")
                k += 1
    csv = folder / "pairs.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def walk(tmp_path_factory) -> dict:
    """The whole walk, once; returns the work folder, the specs and what the CLI printed."""
    from edge_msd.teachers import load_teacher
    from edge_msd.teachers.onnx_teacher import export_onnx_teacher

    root = tmp_path_factory.mktemp("user")
    assert REPO not in root.parents
    work = root / "work"
    work.mkdir()
    data = f"csv:{write_photo_csv(root / 'photos')}"
    teacher_dir = make_tiny_student(root / "teacher", seed=3)  # an open_clip folder: config + safetensors
    teacher = f"local-dir:{teacher_dir}"
    onnx_teacher = f"onnx:{export_onnx_teacher(load_teacher(teacher), root / 'teacher-onnx')}"
    started, t0 = time.time(), time.perf_counter()
    out: dict = {}
    # distill builds the val and test caches that are missing, in the same root as `features --out`
    edge_msd(work, "features", "--teacher", teacher, "--data", data, "--split", "train", "--batch-size", "32")
    edge_msd(work, "distill", "--teacher", teacher, "--data", data, "--preset", "edge-xs", "--steps", "6",
             "--batch-size", "16", "--eval-every", "6", "--ckpt-every", "6", "--queue-size", "64")
    out["calibrate"] = edge_msd(work, "calibrate", "--n", "32").stdout
    edge_msd(work, "ptq", "--target", "jetson")  # the TensorRT Q/DQ recipe: the quicker of the two here
    edge_msd(work, "qat", "--target", "tflite", "--steps", "2", "--batch-size", "16")
    r = edge_msd(work, "export", "--target", "tflite", "--precision", "int8")
    out["export_int8"] = r.stdout + r.stderr
    edge_msd(work, "export", "--target", "tflite", "--quantized", "runs/qat/tflite", "--out",
             "runs/export/tflite-qat", "--allow-parity-fail")  # 2 QAT steps: parity is not the point here
    edge_msd(work, "export", "--target", "onnx")
    for bundle in BENCHED:
        edge_msd(work, "bench", "--bundle", f"runs/export/{bundle}", "--iters", "2", "--warmup", "0",
                 "--pool", "1")
    out.update(sweep_walk(work, teacher, data))
    edge_msd(work, "distill", "--teacher", onnx_teacher, "--data", data, "--features", "features-onnx",
             "--out", "runs/distill-onnx", "--preset", "edge-xs", "--steps", "2", "--batch-size", "16",
             "--val-split", "", "--test-split", "", "--queue-size", "64")
    seconds = time.perf_counter() - t0
    print(f"\nuser path: {seconds:.0f} s for the CLI walk")
    return {"work": work, "data": data, "teacher": teacher, "teacher_dir": teacher_dir,
            "onnx_teacher": onnx_teacher, "out": out, "seconds": seconds, "started": started}


def sweep_walk(work: Path, teacher: str, data: str) -> dict:
    """``sweep`` as docs/sweep.md shows it: two presets on the user's teacher and CSV (2 steps each), the same
    again with no teacher or data (taken from the students the first run left), and ``--reports``."""
    t0 = time.perf_counter()
    (work / "distill.toml").write_text(SWEEP_DISTILL)
    sweep = ("sweep", "--presets", ",".join(SWEEP_PRESETS), "--steps", "2", "--target", "onnx",
             "--iters", "5", "--distill-config", "distill.toml")
    said = {"sweep": edge_msd(work, *sweep, "--teacher", teacher, "--data", data).stdout}
    said["sweep_json"] = (work / "runs/sweep/sweep.json").read_text()
    said["sweep_students"] = {p: manifest(work / "runs/sweep" / p / "student") for p in SWEEP_PRESETS}
    said["sweep_again"] = edge_msd(work, *sweep).stdout
    reports = ",".join(f"runs/bench/{b}.json" for b in BENCHED)
    said["sweep_reports"] = edge_msd(work, "sweep", "--reports", reports,
                                     "--out", "runs/sweep-devices").stdout
    print(f"\nuser path: {time.perf_counter() - t0:.0f} s of it for the three sweeps")
    return said


@pytest.mark.slow
def test_student_records_its_lineage(walk):
    m = manifest(walk["work"] / "runs/distill/student")
    assert m["data"] == walk["data"] and m["teacher"] == walk["teacher"]
    assert m["features"] == str(walk["work"] / "runs/features")  # absolute, whatever the cwd later
    assert m["splits"] == {"train": "train", "val": "val", "test": "test"}


@pytest.mark.slow
def test_every_stage_defaults_to_the_students_data_not_the_demo(walk):
    work, data = walk["work"], walk["data"]
    cal_path = work / "runs/calibration/csv-pairs.json"
    assert str(cal_path.relative_to(work)) in walk["out"]["calibrate"]
    cal = json.loads(cal_path.read_text())
    assert cal["dataset"] == data and cal["split"] == "train" and cal["n"] == 32
    for art in ("runs/qat/jetson-ptq", "runs/qat/tflite"):
        m = manifest(work / art)
        assert m["config"]["data"] == data and m["config"]["calibration"] == "runs/calibration/csv-pairs.json"
        assert m["calibration"]["sha256"] == cal["sha256"]
    assert manifest(work / "runs/qat/tflite")["config"]["features"] == str(work / "runs/features")
    for bundle in ("tflite", "tflite-qat", "onnx"):
        m = manifest(work / "runs/export" / bundle)
        assert m["data"]["spec"] == data and m["data"]["split"] == "test"
        assert m["data"]["eval_images"] == 2 * PER_PHOTO["test"]
        if bundle != "onnx":
            assert m["calibration"]["dataset"] == data and m["calibration"]["sha256"] == cal["sha256"]
    said = walk["out"]["export_int8"]
    assert "post-training quantization" in said and "csv-pairs.json" in said and data in said
    for text in [p.read_text() for p in (work / "runs").rglob("*.json")]:
        assert "demo-scenes" not in text


@pytest.mark.slow
def test_bundle_recall_is_measured_on_the_csv_test_split(walk, monkeypatch):
    from click.testing import CliRunner

    from edge_msd.cli import main

    work = walk["work"]
    monkeypatch.chdir(work)
    r = CliRunner().invoke(main, ["eval", "--model", "runs/distill/student", "--json", "runs/eval.json"])
    assert r.exit_code == 0, r.output
    student = json.loads((work / "runs/eval.json").read_text())
    assert student["data"] == walk["data"] and student["split"] == "test"
    assert student["n_images"] == 2 * PER_PHOTO["test"]
    recall = {}
    for bundle in ("tflite", "tflite-qat", "onnx"):
        report = json.loads((work / "runs/bench" / f"{bundle}.json").read_text())
        assert report["recall"]["eval"]["n_images"] == student["n_images"]
        recall[bundle] = report["recall"]["eval"]["mean_R@1"]
    assert recall["onnx"] == pytest.approx(student["mean_R@1"], abs=1e-6)  # ONNX Runtime fp32 = torch
    print(f"\nCSV test split mean R@1: fp32 student {student['mean_R@1']:.1f}, LiteRT int8 bundles: "
          f"PTQ {recall['tflite']:.1f}, QAT {recall['tflite-qat']:.1f}")


def dominated(p: dict, points: list[dict]) -> bool:
    """Another point of p's device is at least as fast and as accurate, and better in one of the two."""
    return any(q["device"] == p["device"] and q["latency_ms"] <= p["latency_ms"]
               and q["mean_r1"] >= p["mean_r1"]
               and (q["latency_ms"] < p["latency_ms"] or q["mean_r1"] > p["mean_r1"]) for q in points)


def one_line(text: str) -> str:
    """The CLI's output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.mark.slow
def test_sweep_measures_each_preset_on_the_csv_with_the_users_teacher(walk):
    """docs/sweep.md's claims, in the user's folder: sweep.{json,md,png} in ./runs/sweep; each point's
    recall is its bundle's on the CSV's test split, from a student of the user's teacher; its latency was
    timed here on the runtime of --target; the Pareto front is marked."""
    work, data, teacher = walk["work"], walk["data"], walk["teacher"]
    said = one_line(walk["out"]["sweep"])
    for name in ("sweep.json", "sweep.md", "sweep.png"):
        assert (work / "runs/sweep" / name).is_file() and f"runs/sweep/{name}" in said
        for other in (REPO / "runs/sweep" / name, Path.cwd() / "runs/sweep" / name):
            assert not other.is_file() or other.stat().st_mtime < walk["started"]
    assert not (work / ".edge-msd-home/teachers/demo").exists()  # the demo teacher was never built
    result = json.loads((work / "runs/sweep/sweep.json").read_text())
    assert result["settings"]["target"] == "onnx"
    lineage = {k: result["settings"]["distill"][k] for k in ("teacher", "data", "features", "steps")}
    assert lineage == {"teacher": teacher, "data": data, "features": str(work / "runs/features"), "steps": 2}
    cache_teacher = manifest(work / "runs/features/test")["teacher_id"]
    points = result["points"]
    assert [p["label"] for p in points] == list(SWEEP_PRESETS)
    for p in points:
        run = work / "runs/sweep" / p["label"]
        student = manifest(run / "student")
        assert (student["teacher"], student["data"], student["teacher_id"]) == (teacher, data, cache_teacher)
        bundle_data = manifest(run / "onnx")["data"]
        assert (bundle_data["spec"], bundle_data["split"]) == (data, "test")
        report = json.loads((work / p["report"]).read_text())
        recall = report["recall"]["eval"]
        assert recall["n_images"] == 2 * PER_PHOTO["test"] and p["mean_r1"] == recall["mean_R@1"]
        evaluated = json.loads((run / "eval.json").read_text())  # distill's eval of the PyTorch student
        assert (evaluated["data"], evaluated["split"]) == (data, "test")
        assert evaluated["teacher_id"] == cache_teacher
        assert p["mean_r1"] == pytest.approx(evaluated["student"]["mean_R@1"], abs=1e-6)  # ONNX fp32 = torch
        assert p["runtime"] == report["runtime"]["name"] == "onnxruntime"
        assert (report["settings"]["batches"], report["settings"]["iters"]) == ([1], 5)
        image, text = (report["towers"][t]["measurements"][0]["latency_ms"]["p50"] for t in ("image", "text"))
        assert (p["image_p50_ms"], p["text_p50_ms"]) == (image, text)
        assert p["latency_ms"] == pytest.approx(image + text)
        assert p["on_front"] is not dominated(p, points)
    marked = (work / "runs/sweep/sweep.md").read_text()
    assert sum(p["on_front"] for p in points) == marked.count("★ |") == said.count("★ |") >= 1
    assert (work / "runs/sweep/sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sweep_rerun_reuses_finished_presets_and_the_users_lineage(walk):
    """Run again without --teacher or --data: the lineage the students in runs/sweep record (never the
    demo's), and every student, bundle and report reused."""
    work, again = walk["work"], one_line(walk["out"]["sweep_again"])
    assert f"as the students in runs/sweep record: teacher {walk['teacher']}, data {walk['data']}" in again
    for preset in SWEEP_PRESETS:
        assert f"runs/sweep/{preset}/student: trained with these settings, reused" in again
        assert f"runs/sweep/{preset}/onnx: a verified bundle of {preset}, reused" in again
        assert f"runs/sweep/{preset}/bench-onnx.json: measured with these settings, reused" in again
        assert manifest(work / "runs/sweep" / preset / "student") == walk["out"]["sweep_students"][preset]
    assert (work / "runs/sweep/sweep.json").read_text() == walk["out"]["sweep_json"]


@pytest.mark.slow
def test_sweep_plots_the_walks_bench_reports(walk):
    """``sweep --reports`` on the reports ``bench`` wrote: one point per report, its recall and runtime."""
    work = walk["work"]
    result = json.loads((work / "runs/sweep-devices/sweep.json").read_text())
    assert result["settings"]["source"] == "device reports"
    assert "| student | device |" in walk["out"]["sweep_reports"]  # the table, as Markdown when piped
    assert all((work / "runs/sweep-devices" / f"sweep.{ext}").is_file() for ext in ("md", "png"))
    points = {Path(p["report"]).stem: p for p in result["points"]}
    assert set(points) == set(BENCHED)
    for name, p in points.items():
        report = json.loads((work / "runs/bench" / f"{name}.json").read_text())
        assert p["mean_r1"] == report["recall"]["eval"]["mean_R@1"]
        assert report["recall"]["eval"]["n_images"] == 2 * PER_PHOTO["test"]
        assert (p["runtime"], p["device"]) == (report["runtime"]["name"], report["device"]["label"])
        assert p["on_front"] is not dominated(p, list(points.values()))
    assert {p["runtime"] for p in points.values()} == {"litert", "onnxruntime"}


@pytest.mark.slow
def test_onnx_teacher_distils_the_same_data(walk):
    m = manifest(walk["work"] / "runs/distill-onnx/student")
    assert m["teacher"] == walk["onnx_teacher"] and m["data"] == walk["data"]
    cache = manifest(walk["work"] / "features-onnx/train")
    assert cache["teacher_id"].startswith("onnx:")


@pytest.mark.slow
def test_bad_input_on_the_user_path_is_one_clear_line(walk, monkeypatch, tmp_path):
    """Another dataset's calibration set, a split folder for a feature root, an empty split and a
    checkpoint that does not fit its architecture: exit 2, one line naming the file and what was expected,
    and nothing already written is touched."""
    import torch
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from edge_msd.cli import main
    from edge_msd.paths import demo_calibration

    work, data = walk["work"], walk["data"]
    monkeypatch.chdir(work)

    def fails(*args: str) -> str:
        r = CliRunner().invoke(main, list(args))
        assert r.exit_code == 2, r.output
        line = r.output.strip().splitlines()[-1]
        assert line.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
        return line

    before = manifest(work / "runs/qat/tflite")
    demo = str(demo_calibration())
    line = fails("ptq", "--target", "tflite", "--calibration", demo, "--out", "runs/qat/tflite", "--force")
    assert demo in line and f"expected one of {data!r}" in line and "--data" in line
    assert manifest(work / "runs/qat/tflite") == before  # --force replaces only after a successful run

    line = fails("qat", "--target", "tflite", "--features", "runs/features/train", "--out", f"{tmp_path}/q")
    assert "runs/features/train" in line and "<root>/train/manifest.json" in line
    assert "--features runs/features" in line
    line = fails("features", "--teacher", walk["teacher"], "--data", data, "--split", "val",
                 "--out", "runs/features/train")
    assert "--out runs/features" in line
    assert not (work / "runs/features/train/val").exists() and not (tmp_path / "q").exists()

    csv = Path(data.removeprefix("csv:"))
    no_test = csv.with_name("no-test.csv")
    rows = csv.read_text().splitlines(True)
    no_test.write_text("".join(row for row in rows if not row.rstrip().endswith(",test")))
    line = fails("eval", "--model", "runs/distill/student", "--data", f"csv:{no_test}")
    assert str(no_test) in line and "unknown split 'test'; valid splits: train, val" in line

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    shutil.copyfile(walk["teacher_dir"] / "open_clip_config.json", teacher / "open_clip_config.json")
    save_file({"visual.proj": torch.zeros(3, 3)}, str(teacher / "open_clip_model.safetensors"))
    line = fails("features", "--teacher", f"local-dir:{teacher}", "--data", data, "--out", f"{tmp_path}/f")
    assert str(teacher) in line and "keys do not fit this architecture" in line and "Missing key(s)" in line
    assert not (tmp_path / "f").exists()


def test_defaults_come_from_the_student_record(tmp_path, monkeypatch):
    """Without a student to read, nothing falls back to the demo: the error names the folder and option."""
    from edge_msd.errors import ArtifactError, ConfigError
    from edge_msd.lineage import calibration_path, data_slug
    from edge_msd.paths import demo_calibration
    from edge_msd.quant.config import CalibrateConfig, QuantConfig

    monkeypatch.chdir(tmp_path)
    assert data_slug("csv:/data/pairs.csv?root=/x") == "csv-pairs"
    assert data_slug("fashion-mnist") == "fashion-mnist"
    assert calibration_path("csv:/data/pairs.csv") == Path("runs/calibration/csv-pairs.json")
    assert calibration_path("demo-scenes") == demo_calibration()  # until one is built under runs/
    (tmp_path / "runs/calibration").mkdir(parents=True)
    (tmp_path / "runs/calibration/demo-scenes.json").write_text("{}")
    assert calibration_path("demo-scenes") == Path("runs/calibration/demo-scenes.json")
    with pytest.raises(ArtifactError, match="runs/distill/student: student folder not found.*--data SPEC"):
        QuantConfig(target="tflite").resolved()
    (tmp_path / "old").mkdir()
    with pytest.raises(ConfigError, match="old/manifest.json: the student records no data spec"):
        CalibrateConfig(student="old").resolved()
    cfg = CalibrateConfig(student="old", data="csv:/data/pairs.csv").resolved()
    assert (cfg.split, cfg.out) == ("train", "runs/calibration/csv-pairs.json")


def test_one_record_written_and_read_fills_every_later_config(tmp_path, monkeypatch):
    """The student record goes to a manifest and back unchanged, and the one fill step gives export, quant,
    calibrate and eval the same recorded data, splits and feature root (what the user gave wins)."""
    from edge_msd.artifacts import write_manifest
    from edge_msd.distill.config import EvalConfig
    from edge_msd.export.config import ExportConfig
    from edge_msd.lineage import STUDENT_KIND, StudentRecord, read_student_record
    from edge_msd.quant.config import CalibrateConfig, QuantConfig

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "s"
    record = StudentRecord(folder, data="csv:/d/pairs.csv", features=str(tmp_path / "f"), teacher="demo",
                           teacher_id="demo|sha256:ab", splits={"train": "tr", "val": "", "test": "te"})
    folder.mkdir()
    write_manifest(folder, STUDENT_KIND, config=None, **record.to_manifest())
    assert read_student_record(folder) == record
    assert StudentRecord.from_manifest(folder, {"kind": STUDENT_KIND}) == StudentRecord(folder)
    cal = "runs/calibration/csv-pairs.json"
    ex = ExportConfig(student=str(folder)).resolved(folder)
    assert (ex.data, ex.split, ex.calibration) == ("csv:/d/pairs.csv", "te", cal)
    q = QuantConfig(student=str(folder), method="ptq").resolved()
    assert (q.data, q.features, q.calibration) == ("csv:/d/pairs.csv", str(tmp_path / "f"), cal)
    c = CalibrateConfig(student=str(folder), split="mine").resolved()
    assert (c.data, c.split, c.features, c.out) == ("csv:/d/pairs.csv", "mine", str(tmp_path / "f"), cal)
    e = EvalConfig(model=str(folder), data="csv:/other.csv").resolved()
    assert (e.data, e.split) == ("csv:/other.csv", "te")
