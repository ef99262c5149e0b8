"""Export-time delegate warnings through the export into the manifest, stderr and the bench report
(the per-family rules are tested in tests/families/test_tensorrt.py and test_coreml.py)."""

from export_helpers import tiny_dataset


def test_export_prints_and_records_the_warnings(tmp_path, student_dir, capsys):
    from edge_msd.bench.report import format_table
    from edge_msd.export.bundle import ExportConfig, export_bundle

    cfg = ExportConfig(target="jetson", student=str(student_dir), out=str(tmp_path / "b"), probe_images=8)
    m = export_bundle(cfg, dataset=tiny_dataset())
    (line,) = m["delegate_warnings"]
    assert line.startswith("jetson-orin text tower: ops on integer inputs")
    assert m["delegate_check"]["text"]["warnings"] == [line.removeprefix("jetson-orin text tower: ")]
    assert f"warning: {line}" in capsys.readouterr().err
    report = {"bundle": {"delegate_warnings": [line]}, "towers": {"image": {"placement": {
        "available": True, "source": "s", "accelerator": "XNNPACK", "ops": 2, "on_accelerator": 2,
        "by_device": {"XNNPACK": 2}, "fallback_ops": {}, "cost_unit": "ms", "slowest": [],
        "op_times": {"available": False, "reason": "no profiler"}}}}}
    table = format_table(report, "markdown")
    assert f"  export: {line}" in table and "  image: no per-op times: no profiler" in table
