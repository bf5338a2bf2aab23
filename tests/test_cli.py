"""Every entry point: a missing file and a bad flag are one `<script>: error: ...` line and a documented status."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prefork
from image_classification.cli import EXIT_ERROR, EXIT_USAGE, Number

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/no/such/file.pth"

# (script, its arguments with a missing file, the start of its error line)
MISSING_FILE = [
    ("main.py", ["--data-backend", "pytorch", "/no/such/data"], "main.py: error: data folder /no/such/data does not"),
    ("main.py", ["--data-backend", "synthetic", "--resume", MISSING], f"main.py: error: --resume {MISSING}: no such"),
    ("main.py", ["--data-backend", "synthetic", "--pretrained-from-file", MISSING],
     f"main.py: error: {MISSING}: no such file"),
    ("quant_main.py", ["--arch", "efficientnet-quant-b0", "--data-backend", "synthetic", "--resume", MISSING],
     f"quant_main.py: error: --resume {MISSING}: no such file"),
    ("launch.py", ["--model", "efficientnet-b0", "--precision", "FP32", "--mode", "convergence", "--platform", "CPU",
                   "/no/such/data"], "launch.py: error: data folder /no/such/data does not exist"),
    ("launch.py", ["--cfg_file", "/no/such/configs.yml", "--model", "efficientnet-b0", "--precision", "FP32",
                   "--mode", "convergence", "--platform", "CPU"], "launch.py: error: --cfg_file /no/such/configs.yml"),
    ("multiproc.py", ["/no/such/script.py"], "multiproc.py: error: /no/such/script.py: no such file"),
    ("classify.py", ["--arch", "efficientnet-b0", "--pretrained-from-file", MISSING, "--image", "x.jpg"],
     f"classify.py: error: {MISSING}: no such file"),
    ("classify.py", ["--arch", "efficientnet-b0", "--image", "/no/such/image.jpg", "--class-names", MISSING],
     f"classify.py: error: --class-names {MISSING}: cannot read"),
    ("model2onnx.py", ["--arch", "efficientnet-b0", "--pretrained-from-file", MISSING],
     f"model2onnx.py: error: {MISSING}: no such file"),
    ("checkpoint2model.py", ["--checkpoint-path", MISSING, "--weight-path", "/tmp/out.pth"],
     f"checkpoint2model.py: error: {MISSING}: no such file"),
    ("scripts/plot_report.py", ["/no/such/raport.json"], "plot_report.py: error: /no/such/raport.json: no such"),
    ("scripts/inference_table.py", ["/no/such/raport.json"],
     "inference_table.py: error: /no/such/raport.json: No such file"),
]

BAD_FLAG = [
    ("main.py", ["--bogus"], "main.py: error: unrecognized arguments: --bogus; valid flags:"),
    ("main.py", ["--lr", "nan"], "main.py: error: argument --lr/--learning-rate: must be a finite number >= 0"),
    ("quant_main.py", ["-b", "0"], "quant_main.py: error: argument -b/--batch-size: must be an integer >= 1"),
    ("quant_main.py", ["--calibration-batches", "0"], "quant_main.py: error: argument --calibration-batches:"),
    ("launch.py", ["--model", "efficientnet-b0", "--precision", "FP32", "--mode", "convergence", "--platform", "CPU",
                   "--bogus"], "launch.py: error: unrecognized arguments: --bogus"),
    ("multiproc.py", ["--nproc_per_node", "0", "main.py"], "multiproc.py: error: argument --nproc_per_node:"),
    ("classify.py", ["--arch", "efficientnet-b0", "--image", "a.jpg", "--image-size", "0"],
     "classify.py: error: argument --image-size: must be an integer >= 1"),
    ("model2onnx.py", ["--arch", "efficientnet-b0", "--opset", "12"], "model2onnx.py: error: argument --opset:"),
    ("checkpoint2model.py", ["--bogus"], "checkpoint2model.py: error:"),
    ("scripts/plot_report.py", ["--bogus", "r.json"], "plot_report.py: error: unrecognized arguments: --bogus"),
    ("scripts/inference_table.py", ["--prefix", "x", "r.json"], "inference_table.py: error: argument --prefix:"),
]


def run_script(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    return prefork.run([sys.executable, script, *argv], cwd=ROOT, timeout=300)  # a process of its own, imports shared


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("script,argv,expected", MISSING_FILE, ids=[f"{s}-{i}" for i, (s, *_) in
                                                                     enumerate(MISSING_FILE)])
@pytest.mark.slow
def test_a_missing_file_is_one_line_and_status_1(script, argv, expected):
    result = run_script(script, argv)
    assert result.returncode == EXIT_ERROR, result.stderr
    assert one_error_line(result).startswith(expected)


@pytest.mark.parametrize("script,argv,expected", BAD_FLAG, ids=[f"{s}-{i}" for i, (s, *_) in enumerate(BAD_FLAG)])
@pytest.mark.slow
def test_a_bad_flag_is_one_line_and_status_2(script, argv, expected):
    result = run_script(script, argv)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert one_error_line(result).startswith(expected)


@pytest.mark.slow
def test_unsafe_weights_file_is_refused_in_one_line(tmp_path):
    unsafe = tmp_path / "unsafe.pth"
    unsafe.write_bytes(pickle.dumps({"state_dict": {"w": torch.zeros(1)}, "hook": Number(int)}))
    torch.save({"state_dict": {}, "code": Number(int, low=1)}, unsafe)
    result = run_script("quant_main.py", ["--arch", "efficientnet-quant-b0", "--data-backend", "synthetic",
                                          "--pretrained-from-file", str(unsafe)])
    assert result.returncode == EXIT_ERROR
    assert one_error_line(result).startswith(f"quant_main.py: error: {unsafe}: refused to load")


def test_number_type_describes_and_checks_bounds():
    assert Number(int, low=1, off=-1).describe() == "an integer >= 1, or -1 (off)"
    assert Number(float, low=0, high=1, high_open=True).describe() == "a finite number in [0, 1)"
    check = Number(float, low=0, low_open=True)
    assert check("0.5") == 0.5 and check.admits(None) and not check.admits(float("inf"))
    assert not check.admits(0.0) and not Number(int).admits(1.5) and not Number(int).admits(True)
