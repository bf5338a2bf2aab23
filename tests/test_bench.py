"""The bench/ scripts run (in --quick mode) and write the JSON fields their readers rely on. No timings checked."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import prefork

ROOT = Path(__file__).resolve().parents[1]
MACHINE_FIELDS = {"cpu", "cpu_count", "torch_threads", "device", "torch", "torchvision", "timm"}


def run_bench(script: str, tmp_path: Path, *flags: str) -> dict:
    """The script's quick run, forked from tests/prefork.py's server (as are the processes it starts itself)."""
    out = tmp_path / f"{script}.json"
    result = prefork.run([sys.executable, str(ROOT / "bench" / script), "--quick", "--json", str(out), *flags],
                         cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert MACHINE_FIELDS <= set(report["machine"])
    assert report["settings"]["quick"] is True
    return report


@pytest.mark.slow
def test_bench_train_quick(tmp_path):
    report = run_bench("bench_train.py", tmp_path, "--models", "ours,ours+nhwc,timm,torchvision")
    assert report["benchmark"] == "train_step"
    models = [row["model"] for row in report["results"]]
    assert models == ["ours", "ours+nhwc", "timm", "torchvision"]
    for row in report["results"]:
        assert row["img_per_s"] > 0 and row["step_ms_median"] > 0
        assert {"arch", "batch_size", "image_size", "precision", "memory_format", "compile", "first_step_s",
                "peak_memory_mib"} <= set(row)
    pairs = {(r["ours"], r["peer"]) for r in report["ratios"]}
    assert pairs == {(o, p) for o in ("ours", "ours+nhwc") for p in ("timm", "torchvision")}
    assert all(r["img_per_s_ratio"] > 0 for r in report["ratios"])
    # The plain entries all run NCHW eager: that is the like-for-like pair; ours+nhwc has no NHWC peer here.
    assert {(r["ours"], r["peer"]) for r in report["same_config_ratios"]} == {("ours", "timm"),
                                                                               ("ours", "torchvision")}
    (best,) = report["best_ratios"]
    assert best["ours"] in ("ours", "ours+nhwc") and best["peer"] in ("timm", "torchvision")


@pytest.mark.slow
def test_bench_train_aten_entry_pairs_with_the_peer_in_its_layout(tmp_path):
    report = run_bench("bench_train.py", tmp_path, "--models", "ours+nhwc,ours+nhwc+aten,timm+nhwc")
    assert {(r["ours"], r["peer"]) for r in report["same_config_ratios"]} == {("ours+nhwc", "timm+nhwc"),
                                                                               ("ours+nhwc+aten", "timm+nhwc")}


@pytest.mark.slow
def test_bench_train_quick_bf16(tmp_path):
    report = run_bench("bench_train.py", tmp_path, "--models", "ours,timm", "--precision", "bf16")
    assert report["settings"]["autocast_dtype"] == "bfloat16"
    assert {row["precision"] for row in report["results"]} == {"bf16"}


@pytest.mark.slow
def test_bench_inference_quick(tmp_path):
    report = run_bench("bench_inference.py", tmp_path, "--batch-sizes", "1,2")
    assert report["benchmark"] == "inference"
    assert {(r["model"], r["batch_size"]) for r in report["results"]} == {
        (m, b) for m in ("ours", "timm", "torchvision") for b in (1, 2)}
    for row in report["results"]:
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p95"] <= row["latency_ms_p99"]
    assert len(report["ratios"]) == 4


@pytest.mark.slow
def test_bench_e2e_quick(tmp_path):
    report = run_bench("bench_e2e.py", tmp_path)
    (row,) = report["results"]
    assert report["benchmark"] == "e2e_training"
    assert row["e2e_img_per_s"] > 0 and row["bare_img_per_s"] > 0
    assert row["overhead"] == pytest.approx(1 - row["e2e_img_per_s"] / row["bare_img_per_s"])
    assert 0 <= row["outside_step"] < 1  # data, metrics and logging take some of the loop, never all


@pytest.mark.slow
def test_bench_rejects_unknown_model(tmp_path):
    result = prefork.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--quick", "--models", "resnet"],
                         cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert "ours, timm or torchvision" in result.stderr


def test_cpu_peak_memory_counts_live_tensors_not_the_heap():
    """The CPU peak is the most tensor bytes live at once above the start, whatever the allocator keeps."""
    import torch
    sys.path.insert(0, str(ROOT / "bench"))
    import common
    from image_classification.context import create_context

    ctx = create_context("cpu", amp=False)
    mib = 2**20 // 4  # float32 elements in one MiB
    held = torch.ones(3 * mib)  # live before the block: not counted
    with common.PeakMemory(ctx) as peak:
        a = torch.ones(2 * mib)
        b = torch.ones(5 * mib)
        del a, b
        c = torch.ones(4 * mib)  # 4 MiB live now, below the 7 MiB peak
        del held
    assert peak.mib == pytest.approx(7.0, abs=0.01)
    del c


@pytest.mark.slow
def test_bench_inference_quick_engines(tmp_path):
    """Engine entries: ONNX exports in onnxruntime and OpenVINO, INT8 rows, best-vs-best first, peak RSS alone."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    report = run_bench("bench_inference.py", tmp_path, "--batch-sizes", "1", "--peak-rss", "--models",
                       "ours,ours+onnxruntime,ours+openvino+int8,timm,timm+onnxruntime")
    rows = {row["model"]: row for row in report["results"]}
    assert list(rows) == ["ours", "ours+onnxruntime", "ours+openvino+int8", "timm", "timm+onnxruntime"]
    assert rows["ours+openvino+int8"]["precision"] == "int8" and rows["ours+onnxruntime"]["precision"] == "fp32"
    assert rows["ours+onnxruntime"]["engine_settings"]["graph_optimization"] == "ORT_ENABLE_ALL"
    assert rows["ours+openvino+int8"]["engine_settings"]["int8_convolutions"] == 81  # every b0 convolution
    assert rows["ours"]["engine_settings"] is None
    for row in rows.values():
        assert row["img_per_s"] > 0 and row["peak_rss_mib"] > 0
    # best vs best: one row per precision of ours, each against the peers' fastest entry
    assert [r["ours"] for r in report["best_ratios"]] in (
        [a, "ours+openvino+int8"] for a in ("ours", "ours+onnxruntime"))
    assert {r["peer"] for r in report["best_ratios"]} <= {"timm", "timm+onnxruntime"}
    assert {(r["ours"], r["peer"]) for r in report["same_config_ratios"]} == {
        ("ours", "timm"), ("ours+onnxruntime", "timm+onnxruntime")}


@pytest.mark.slow
def test_bench_inference_quick_lite_against_timms_tf_port(tmp_path):
    """--archs lite0: timm's entry is tf_efficientnet_lite0, the INT8 entry efficientnet-quant-lite0."""
    pytest.importorskip("openvino")
    report = run_bench("bench_inference.py", tmp_path, "--archs", "lite0", "--batch-sizes", "1", "--models",
                       "ours,ours+openvino+int8,timm")
    assert {row["arch"] for row in report["results"]} == {"lite0"}
    rows = {row["model"]: row for row in report["results"]}
    assert rows["ours+openvino+int8"]["engine_settings"]["int8_convolutions"] == 49  # every Lite0 convolution
    sys.path.insert(0, str(ROOT / "bench"))
    import common
    assert type(common.build_model(common.Entry("timm"), "lite0").conv_stem).__name__ == "Conv2dSame"
    with pytest.raises(ValueError, match="torchvision has no EfficientNet-Lite"):
        common.build_model(common.Entry("torchvision"), "lite0")


@pytest.mark.slow
def test_lite_int8_agreement_quick(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("skimage")
    report = run_bench("lite_int8_agreement.py", tmp_path)
    assert report["benchmark"] == "lite_int8_agreement" and report["views"] == {"photos": 19, "generated": 4}
    rows = {row["model"]: row for row in report["results"]}
    assert list(rows) == ["float (fp32 ONNX)", "INT8, calibrated (max)", "INT8, calibrated (histogram)",
                          "INT8, histogram + 1 QAT steps"]
    assert rows["float (fp32 ONNX)"]["int8_convolutions"] == 0 and rows["float (fp32 ONNX)"]["all_top1"] == 100.0
    for name, row in rows.items():
        assert 0 <= row["all_top1"] <= row["all_top5"] <= 100
        if name != "float (fp32 ONNX)":
            assert row["int8_convolutions"] == 49
    assert len(report["qat_losses"]) == 1


def test_engine_entries_refuse_options_they_cannot_honour():
    sys.path.insert(0, str(ROOT / "bench"))
    import common

    for text, message in [("ours+nhwc+openvino", "chooses its own layout"), ("timm+openvino+int8", "peers have none"),
                          ("ours+int8", "needs an engine"), ("ours+onnxruntime+openvino", "one engine")]:
        with pytest.raises(ValueError, match=message):
            common.parse_entries(text, "nchw", False, allow_freeze=True)
    with pytest.raises(ValueError, match="inference only"):
        common.parse_entries("ours+openvino", "nchw", False)
    (entry,) = common.parse_entries("ours+openvino+int8", "nchw", False, allow_freeze=True)
    assert (entry.engine, entry.int8, entry.label, entry.configuration) == (
        "openvino", True, "ours+openvino+int8", "openvino+int8")


@pytest.mark.slow
def test_toolkit_table_runs_every_row_and_knows_a_finished_run(tmp_path):
    from image_classification.data.generated import generate_dataset
    # Ten classes, as the main job (scripts/demo.sh classifies with --num_classes 10); 20 training images each.
    default, transfer = (generate_dataset(tmp_path / name, num_classes=10, train_per_class=2, val_per_class=1,
                                          image_size=48, class_set=name) for name in ("default", "transfer"))
    command = [sys.executable, "bench/toolkit_table.py", "--data", str(default), "--transfer-data", str(transfer),
               "--workspace", str(tmp_path / "runs"), "--epochs", "2", "--teacher-epochs", "2",
               "--transfer-epochs", "1", "--average-last", "2", "--bn-batches", "1", "--eval-sizes", "48", "56", "--", "-b", "4"]
    # Its 27 Python processes (scripts/demo.sh's main.py and classify.py per training row, eval_sizes.py, ...) forked
    # from tests/prefork.py's server: demo.sh runs $PYTHON.
    result = prefork.run(command, cwd=ROOT, env={**os.environ, "PYTHON": prefork.python()}, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads((tmp_path / "runs" / "toolkit.json").read_text())["rows"]
    assert [r["group"] for r in rows].count("transfer") == 5 and len(rows) == 17  # 2 rows of --eval-sizes
    assert all(0 <= r["top1"] <= 100 for r in rows)
    assert all(r["commands"] for r in rows) and "--teacher-weights" in rows[11]["commands"][0]
    # A second invocation reads finished runs back instead of training them again.
    sys.path.insert(0, str(ROOT / "bench"))
    from toolkit_table import finished
    assert finished(tmp_path / "runs" / "base", 2) and not finished(tmp_path / "runs" / "base", 3)
