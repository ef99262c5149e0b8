"""``edge-msd sweep``: the Pareto front, points from bench reports, and the verb end to end on two tiny
presets (trained, exported and benchmarked here; skipped when done; device reports plotted per device)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from distill_helpers import TinyTeacher
from export_helpers import DATA

from edge_msd.cli import main
from edge_msd.data import open_dataset
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.sweep import run as sweep_run
from edge_msd.sweep.config import SweepConfig
from edge_msd.sweep.points import Point, mark_front, point_from_report, print_table
from edge_msd.teachers.cache import build_feature_cache

PRESETS = ["edge-xs", "edge-s"]
TINY_DISTILL = """[distill]
batch_size = 8
queue_size = 32
warmup_steps = 1
eval_every = 2
ckpt_every = 2
lr = 1e-3
"""


def point(label: str, latency: float, r1: float, device: str = "host") -> Point:
    return Point(label, device, "onnxruntime", "fp32", latency, None, None, r1, r1, r1, f"{label}.json")


def test_front_keeps_exactly_the_undominated_points_per_device():
    points = mark_front([
        point("fast", 1.0, 50.0),
        point("slow-better", 3.0, 80.0),
        point("dominated", 2.0, 40.0),  # slower and worse than "fast"
        point("tie-a", 2.0, 60.0),
        point("tie-b", 2.0, 60.0),  # equal points do not dominate each other
        point("same-speed-worse", 3.0, 70.0),  # as slow as "slow-better", less accurate
        point("device-b", 9.0, 10.0, device="jetson"),  # alone on its device: on its front
    ])
    front = {p.label for p in points if p.on_front}
    assert front == {"fast", "slow-better", "tie-a", "tie-b", "device-b"}


def bench_report(**over) -> dict:
    measurement = {"batch": 1, "latency_ms": {"p50": 0.5}}
    report = {
        "schema": "edge-msd-bench/1", "partial": False, "device": {"label": "orin"},
        "runtime": {"name": "tensorrt"},
        "bundle": {"student": "edge-s", "quantization": "qat",
                   "models": {"image": {"precision": "int8"}, "text": {"precision": "int8"}}},
        "towers": {"image": {"measurements": [measurement]},
                   "text": {"measurements": [{"batch": 1, "latency_ms": {"p50": 0.25}}]}},
        "recall": {"eval": {"mean_R@1": 80.0, "i2t": {"R@1": 78.0}, "t2i": {"R@1": 82.0}}},
    }
    report.update(over)
    return report


def test_point_from_a_device_report():
    p = point_from_report(bench_report(), "orin.json", "image+text")
    assert (p.label, p.device, p.runtime, p.precision) == ("edge-s int8 qat", "orin", "tensorrt", "int8 qat")
    assert p.latency_ms == pytest.approx(0.75) and p.mean_r1 == 80.0 and (p.i2t_r1, p.t2i_r1) == (78.0, 82.0)
    assert point_from_report(bench_report(), "orin.json", "text").latency_ms == pytest.approx(0.25)


@pytest.mark.parametrize(
    "over, says",
    [
        ({"partial": True, "interrupted": "Ctrl-C"}, "partial report (Ctrl-C)"),
        ({"recall": None}, "no recall on the eval set"),
        ({"recall": {"eval": {"mean_R@1": 90.0, "subset": {"n_images": 5, "of_images": 1000}}}},
         "recall on the first 5 of 1000 eval images (--eval-limit)"),
        ({"towers": {"image": {"measurements": [{"batch": 4, "latency_ms": {"p50": 1.0}}]}}},
         "no batch-1 latency of the image and text tower"),
    ],
)
def test_a_report_without_a_point_names_the_file(over, says):
    with pytest.raises(ArtifactError, match=f"^bad.json: .*{re.escape(says)}"):
        point_from_report(bench_report(**over), "bad.json", "image+text")


def test_reports_cannot_be_mixed_with_training():
    with pytest.raises(ConfigError, match="--reports"):
        SweepConfig(reports=["a.json"], presets=["edge-s"]).validate()


def test_the_table_is_markdown_when_piped_and_rich_in_a_terminal(monkeypatch, capsys):
    points = mark_front([point("fast", 1.0, 50.0), point("slow", 2.0, 40.0)])
    print_table(points, "image+text")
    assert "| fast | host | onnxruntime | fp32 |" in capsys.readouterr().out
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    print_table(points, "image+text")
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # without the terminal's styles
    assert "┃ student" in out and "│ fast" in out and "| fast |" not in out


def test_in_an_empty_folder_a_sweep_is_every_preset_on_the_demo(tmp_path, monkeypatch):
    """Nothing given and nothing recorded: the demo; data from --distill-config's [distill] table: that
    data with its train cache's teacher, never the demo teacher."""
    from edge_msd.students.presets import list_presets

    monkeypatch.chdir(tmp_path)
    assert sweep_run._presets(SweepConfig()) == list_presets()
    base = sweep_run.distill_base(SweepConfig())
    assert (base.teacher, base.data) == ("demo", "demo-scenes")
    assert base.features == str(tmp_path.resolve() / "runs" / "features")
    (tmp_path / "d.toml").write_text('[distill]\ndata = "csv:/data/pairs.csv"\nbatch_size = 8\n')
    base = sweep_run.distill_base(SweepConfig(distill_config="d.toml"))
    assert (base.teacher, base.data, base.batch_size) == ("", "csv:/data/pairs.csv", 8)


def test_students_of_different_test_sets_are_refused(tmp_path):
    candidates = []
    for name in ("a", "b"):
        (tmp_path / name / "onnx").mkdir(parents=True)
        data = {"spec": f"csv:/{name}.csv", "split": "test", "fingerprint": name}
        (tmp_path / name / "onnx" / "manifest.json").write_text(json.dumps({"data": data}))
        candidates.append(sweep_run.Candidate(name, tmp_path / name / "student", tmp_path / name))
    said = re.escape("evaluated on different test sets (a: csv:/a.csv [test]; b: csv:/b.csv [test])")
    with pytest.raises(ConfigError, match=said):
        sweep_run._same_test_set(candidates, "onnx")


def test_unknown_preset_is_refused_before_any_training(tmp_path, monkeypatch):
    monkeypatch.setattr("edge_msd.distill.run.run_distill", _refuse)
    r = CliRunner().invoke(main, ["sweep", "--presets", "edge-xs,edge-q", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "error: field 'presets': unknown edge-q; known: edge-xs" in r.output


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict:
    """The verb on two presets, a few steps each, on tiny data with a stand-in teacher's feature cache."""
    root = tmp_path_factory.mktemp("sweep")
    features = root / "features"
    for split in ("train", "val", "test"):
        build_feature_cache(TinyTeacher(), open_dataset(DATA, split), features / split, progress=False)
    (root / "distill.toml").write_text(TINY_DISTILL)
    cfg = SweepConfig(presets=PRESETS, data=DATA, features=str(features), steps=3, iters=5,
                      distill_config=str(root / "distill.toml"), out=str(root / "sweep"))
    written = sweep_run.run_sweep(cfg)
    return {"cfg": cfg, "written": written, "json": json.loads(written["json"].read_text()), "root": root}


@pytest.mark.slow
def test_sweep_trains_measures_and_plots_each_preset(swept):
    out = Path(swept["cfg"].out)
    points = swept["json"]["points"]
    assert [p["label"] for p in points] == PRESETS
    assert swept["written"]["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| edge-xs |" in swept["written"]["markdown"].read_text()
    for p in points:
        report = json.loads(Path(p["report"]).read_text())
        assert report["bundle"]["student"] == p["label"] and report["settings"]["threads"] == 1
        assert p["mean_r1"] == report["recall"]["eval"]["mean_R@1"]  # recall the runtime measured
        assert p["latency_ms"] == pytest.approx(p["image_p50_ms"] + p["text_p50_ms"])
        manifest = json.loads((out / p["label"] / "student" / "manifest.json").read_text())
        assert manifest["data"] == DATA and manifest["steps"] == 3  # the user's data, never the demo's
        assert manifest["distill_config"]["batch_size"] == 8  # from --distill-config
    a, b = points
    a_beats_b = a["latency_ms"] <= b["latency_ms"] and a["mean_r1"] >= b["mean_r1"]
    b_beats_a = b["latency_ms"] <= a["latency_ms"] and b["mean_r1"] >= a["mean_r1"]
    assert (a["on_front"], b["on_front"]) == (not b_beats_a or a_beats_b, not a_beats_b or b_beats_a)


def _refuse(*args, **kw):
    raise AssertionError("a finished stage ran again")


def stop_at_distill(monkeypatch) -> list:
    """The distill configs the sweep starts runs with, each stopped at once (RuntimeError 'stop here')."""
    started = []

    def record(dcfg):
        started.append(dcfg)
        raise RuntimeError("stop here")

    monkeypatch.setattr("edge_msd.distill.run.run_distill", record)
    return started


@pytest.mark.slow
def test_rerun_skips_finished_presets_and_retrains_on_other_settings(swept, monkeypatch):
    monkeypatch.setattr("edge_msd.distill.run.run_distill", _refuse)
    monkeypatch.setattr("edge_msd.pipeline.export_target", _refuse)
    monkeypatch.setattr("edge_msd.bench.run.run_bench", _refuse)
    again = sweep_run.run_sweep(swept["cfg"])
    assert json.loads(again["json"].read_text())["points"] == swept["json"]["points"]
    # without data or features: those the students in --out record, so the same run, not the demo's
    again = sweep_run.run_sweep(SweepConfig(**{**vars(swept["cfg"]), "data": None, "features": None}))
    assert json.loads(again["json"].read_text())["points"] == swept["json"]["points"]

    trained = stop_at_distill(monkeypatch)
    with pytest.raises(RuntimeError, match="stop here"):
        sweep_run.run_sweep(SweepConfig(**{**vars(swept["cfg"]), "steps": 4}))
    with pytest.raises(RuntimeError, match="stop here"):
        sweep_run.run_sweep(SweepConfig(**{**vars(swept["cfg"]), "force": True}))
    # other settings: trained afresh, not taken as done; --force: retrained although done
    assert [(c.preset, c.steps, c.force) for c in trained] == [("edge-xs", 4, True), ("edge-xs", 3, True)]

    benched = []

    def bench(opts, echo):
        benched.append((Path(opts.bundle).parent.name, opts.iters))
        raise RuntimeError("stop here")

    monkeypatch.setattr("edge_msd.distill.run.run_distill", _refuse)
    monkeypatch.setattr("edge_msd.bench.run.run_bench", bench)
    with pytest.raises(RuntimeError, match="stop here"):
        sweep_run.run_sweep(SweepConfig(**{**vars(swept["cfg"]), "iters": 6}))
    assert benched == [("edge-xs", 6)]  # other timing settings: timed again, not retrained or re-exported


@pytest.mark.slow
def test_a_run_cut_before_its_student_was_saved_resumes(swept, tmp_path, monkeypatch):
    import edge_msd.distill.run as distill_run

    out = tmp_path / "sweep"
    shutil.copytree(Path(swept["cfg"].out) / "edge-xs", out / "edge-xs")
    original = json.loads((out / "edge-xs" / "student" / "manifest.json").read_text())["files"]
    shutil.rmtree(out / "edge-xs" / "student")  # killed after the last checkpoint, before the save
    calls, real = [], distill_run.run_distill

    def spy(dcfg):
        calls.append((dcfg.resume, dcfg.force))
        return real(dcfg)

    monkeypatch.setattr(distill_run, "run_distill", spy)
    sweep_run.run_sweep(SweepConfig(**{**vars(swept["cfg"]), "presets": ["edge-xs"], "out": str(out)}))
    assert calls == [(True, False)]
    resumed = json.loads((out / "edge-xs" / "student" / "manifest.json").read_text())["files"]
    assert resumed == original  # the best checkpoint's weights, byte for byte


@pytest.mark.slow
def test_without_teacher_or_data_the_folders_distilled_student_is_followed(swept, tmp_path, monkeypatch):
    """In a folder where `edge-msd distill` ran on the user's data, a sweep trains on that data and feature
    root (and the train cache's teacher, as that student did), never the demo's."""
    shutil.copytree(Path(swept["cfg"].out) / "edge-xs" / "student", tmp_path / "runs/distill/student")
    monkeypatch.chdir(tmp_path)
    trained = stop_at_distill(monkeypatch)
    with pytest.raises(RuntimeError, match="stop here"):
        sweep_run.run_sweep(SweepConfig(presets=["edge-xs"], out="sweep"))
    assert [(c.teacher, c.data, c.features) for c in trained] == [
        ("", DATA, str((swept["root"] / "features").resolve()))]


@pytest.mark.slow
def test_a_distill_option_error_names_the_preset_and_where_a_sweep_sets_it(swept, tmp_path):
    big = TINY_DISTILL.replace("batch_size = 8", "batch_size = 64")  # the train split has 48 images
    (tmp_path / "big.toml").write_text(big.replace("queue_size = 32", "queue_size = 128"))
    r = CliRunner().invoke(main, ["sweep", "--presets", "edge-xs", "--data", DATA,
                                  "--features", str(swept["root"] / "features"),
                                  "--distill-config", str(tmp_path / "big.toml"),
                                  "--out", str(tmp_path / "sweep")])
    assert r.exit_code == 2, r.output
    assert re.search(r"^error: edge-xs: .*batch_size 64 .*the \[distill\] table of --distill-config FILE\)$",
                     r.output.strip().splitlines()[-1]), r.output


def test_a_target_whose_runtime_cannot_run_here_is_refused_before_training(tmp_path, monkeypatch):
    from edge_msd.bench.runtimes import BACKENDS

    if BACKENDS["tensorrt"].unavailable_reason() is None:
        pytest.skip("TensorRT runs on this machine")
    monkeypatch.setattr("edge_msd.distill.run.run_distill", _refuse)
    r = CliRunner().invoke(main, ["sweep", "--presets", "edge-xs", "--target", "jetson",
                                  "--out", str(tmp_path)])
    assert r.exit_code == 2
    assert "error: field 'target': jetson bundles run on tensorrt, which cannot run here" in r.output
    assert "--reports" in r.output and not any(tmp_path.iterdir())


@pytest.mark.slow
def test_given_student_is_measured_with_its_recorded_lineage(swept, monkeypatch):
    monkeypatch.setattr("edge_msd.distill.run.run_distill", _refuse)
    student = Path(swept["cfg"].out) / "edge-xs" / "student"
    cfg = SweepConfig(students=[str(student)], iters=5, out=str(swept["root"] / "given"))
    result = json.loads(sweep_run.run_sweep(cfg)["json"].read_text())
    assert result["settings"]["distill"]["data"] == DATA  # read from the student's manifest, not the demo
    (p,) = result["points"]
    assert p["label"] == f"edge-xs ({student})" and p["on_front"]
    assert p["mean_r1"] == swept["json"]["points"][0]["mean_r1"]  # same student, same eval set


@pytest.mark.slow
def test_a_tflite_sweep_times_the_student_in_litert(swept):
    student = Path(swept["cfg"].out) / "edge-xs" / "student"
    cfg = SweepConfig(students=[str(student)], target="tflite", iters=5, out=str(swept["root"] / "tflite"))
    (p,) = json.loads(sweep_run.run_sweep(cfg)["json"].read_text())["points"]
    report = json.loads(Path(p["report"]).read_text())
    assert p["runtime"] == report["runtime"]["name"] == "litert" and report["bundle"]["target"] == "tflite"
    assert p["mean_r1"] == swept["json"]["points"][0]["mean_r1"]  # the same student on the same test split


@pytest.mark.slow
def test_device_reports_are_plotted_with_a_front_per_device(swept, tmp_path):
    paths = []
    for p in swept["json"]["points"]:
        report = json.loads(Path(p["report"]).read_text())
        for device in ("phone", "jetson"):
            report["device"]["label"] = device
            path = tmp_path / f"{device}-{p['label']}.json"
            path.write_text(json.dumps(report))
            paths.append(str(path))
    r = CliRunner().invoke(main, ["sweep", "--reports", ",".join(paths), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "| student | device |" in r.output  # Markdown when not a terminal
    points = json.loads((tmp_path / "out" / "sweep.json").read_text())["points"]
    assert sorted(p["device"] for p in points) == ["jetson", "jetson", "phone", "phone"]
    for device in ("phone", "jetson"):  # each device has its own front
        assert any(p["on_front"] for p in points if p["device"] == device)

    (tmp_path / "other.json").write_text(json.dumps({"schema": "edge-msd-bench/9"}))
    r = CliRunner().invoke(main, ["sweep", "--reports", str(tmp_path / "other.json"), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "other.json: report schema 'edge-msd-bench/9' is not supported" in r.output
