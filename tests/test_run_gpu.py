"""bench/run_gpu.sh, the GPU acceptance run: its quick (CPU) mode passes, a failing step is a FAIL that does not stop
the run, and a command that exits 0 without its outputs does not pass. No timings are checked.

The quick mode runs once, as a user runs it (bash bench/run_gpu.sh --quick OUT_DIR, about 1.5 minutes on 2 cores),
with its Python processes forked from tests/prefork.py's server (under 30 s); the failing step runs through
run_gpu.sh too, with only two steps and a Python of its own. The last two tests drive
bench/gpu_acceptance.py's `main` in-process with a stand-in runner (no process at all): they check GPU mode's
command lines and that nothing passes without its outputs.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import prefork

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_acceptance", ROOT / "bench" / "gpu_acceptance.py")
gpu_acceptance = importlib.util.module_from_spec(_spec)
sys.modules["gpu_acceptance"] = gpu_acceptance  # dataclasses look their module up
_spec.loader.exec_module(gpu_acceptance)

pytestmark = pytest.mark.timeout(600)

# What a CPU cannot run, and the reason each says so.
CPU_SKIPS = {"ddp-nccl": gpu_acceptance.NO_GPU, "dali-gpu": gpu_acceptance.NO_GPU,
             "compile-train": gpu_acceptance.QUICK_ONLY, "compile-eval": gpu_acceptance.QUICK_ONLY}
OPTIONAL = {"dali-cpu": "nvidia.dali", "qat": "modelopt"}  # SKIP only where the module is not installed


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[int, Path]:
    """run_gpu.sh --quick, its Python (PYTHON, which run_gpu.sh honours) forked from tests/prefork.py's server, and
    so every step's command lines too."""
    out = tmp_path_factory.mktemp("acceptance")
    done = subprocess.run(["bash", str(ROOT / "bench" / "run_gpu.sh"), "--quick", str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHON": prefork.python()}, capture_output=True, text=True,
                          timeout=900)
    assert "PASS" in done.stdout or "FAIL" in done.stdout, done.stdout + done.stderr
    return done.returncode, out


@pytest.mark.slow
def test_quick_mode_passes_every_step_a_cpu_can_run(quick_run):
    status, out = quick_run
    steps = summary(out)["steps"]
    assert [name for name in steps] == [s.name for s in gpu_acceptance.STEPS]
    for name, result in steps.items():
        if name in CPU_SKIPS:
            assert result["status"] == "SKIP" and result["reason"].startswith(CPU_SKIPS[name]), (name, result)
        elif name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name]) is None:
            assert result["status"] == "SKIP" and "does not import" in result["reason"], (name, result)
        else:
            assert result["status"] == "PASS", (name, result["reason"], (out / result["log"]).read_text()[-3000:])
            assert (out / result["log"]).is_file() and result["commands"] and result["seconds"] > 0
    assert status == 0 and summary(out)["result"] == "PASS"


@pytest.mark.slow
def test_quick_mode_records_the_numbers(quick_run):
    _, out = quick_run
    steps = summary(out)["steps"]
    metrics = {name: result["metrics"] for name, result in steps.items()}
    assert metrics["env"]["versions"]["torch"] and metrics["env"]["cuda_available"] is False
    cpu = metrics["env"]["fp32_depthwise"]["cpu_bf16"]
    assert cpu["_Fp32Conv"] == cpu["depthwise_conv_bn_act"] == 16  # b0's MBConv blocks: the counter works
    assert metrics["data"]["images"] == {"train": 32, "val": 16}
    assert metrics["launch-train"]["steady_ips"] > 0 and metrics["launch-train"]["iterations"] == 3
    assert metrics["launch-train"]["train.grad_scale"] == 1.0  # no loss scaling on a CPU
    assert metrics["launch-infer"]["val.compute_ips"] > 0
    latency = metrics["launch-infer"]
    assert 0 < latency["val.compute_latency_at90"] <= latency["val.compute_latency_at100"]
    assert len(metrics["train-resume"]["val.top1 per epoch"]) == 2 and metrics["train-resume"]["resumed_at_epoch"] == 1
    assert len(metrics["classify-onnx"]["top5"]) == 4  # 4 classes
    assert metrics["classify-onnx"]["onnx_max_abs_difference"] < 1e-3
    for name, models in (("bench-train", {"ours", "timm"}), ("bench-infer", {"ours", "timm"})):
        rows = metrics[name]["results"]
        assert rows and all("bs" in label for label in rows)
        assert {label.split()[0] for label in rows} == models
        assert all(row["img_per_s"] > 0 and row["peak_memory_mib"] > 0 for row in rows.values())
        assert "img/s" in steps[name]["tables"]
    assert len(metrics["ddp-gloo"]["train.total_ips per epoch"]) == 2
    if steps["qat"]["status"] == "PASS":
        assert metrics["qat"]["calibration"] and metrics["qat"]["step_s"] > 0
    markdown = (out / "summary.md").read_text()
    assert markdown.startswith("# GPU acceptance run: PASS")
    assert "| launch-train | PASS |" in markdown and "| dali-gpu | SKIP |" in markdown
    assert '"steady_ips"' in markdown and "launch.py --model efficientnet-b0" in markdown


@pytest.mark.slow
def test_a_failing_step_is_reported_and_the_later_steps_still_run(tmp_path):
    """run_gpu.sh itself (QUICK=1): env killed by its timeout, data still runs, the exit status says FAIL."""
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "bench" / "run_gpu.sh"), "--steps", "env,data", "--step-timeout",
                           "env=0.5", str(out)], cwd=tmp_path, env={**os.environ, "QUICK": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    steps = summary(out)["steps"]
    assert steps["env"]["status"] == "FAIL" and steps["env"]["reason"].startswith("timed out after 0.5 s")
    assert steps["data"]["status"] == "PASS"
    assert {steps[name]["reason"] for name in steps if name not in ("env", "data")} == {"not selected (--steps)"}
    assert summary(out)["mode"] == "quick (CPU)" and summary(out)["result"] == "FAIL"
    assert re.search(r"^env\s+FAIL\s+[\d.]+\s+timed out", done.stdout, re.M), done.stdout
    assert "FAIL: 1 passed, 1 failed, 13 skipped" in done.stdout


def test_a_command_that_exits_0_without_its_outputs_fails_its_step(tmp_path):
    """GPU mode with a runner whose commands do nothing and exit 0: every step fails on its missing output, and
    the command lines are the GPU ones."""
    out = tmp_path / "out"
    for split in ("train", "val"):  # what the data and train-resume steps would leave, so later steps run too
        (out / "data" / split / "circle").mkdir(parents=True)
        (out / "data" / split / "circle" / "circle_00000.jpg").write_bytes(b"")
    (out / "ws" / "train-resume").mkdir(parents=True)
    for name in ("model_best.pth.tar", "raport.json"):
        (out / "ws" / "train-resume" / name).write_bytes(b"")
    (out / "ws" / "train-resume" / "classes.txt").write_text("circle\n")
    commands = []

    def exits_0(argv, *, cwd, env, timeout):
        commands.append(" ".join(map(str, argv)))
        return subprocess.CompletedProcess(argv, 0, "", "")

    steps = [s.name for s in gpu_acceptance.STEPS if s.name not in ("data", "train-resume")]
    assert gpu_acceptance.main(["--steps", ",".join(steps), str(out)], runner=exits_0) == 1
    results = summary(out)["steps"]
    assert {name: results[name]["status"] for name in steps} == {name: "FAIL" for name in steps}
    assert "no report" in results["launch-train"]["reason"]
    assert "wrote no" in results["bench-train"]["reason"] and "wrote no" in results["qat"]["reason"]
    assert "did not print the image path" in results["classify-onnx"]["reason"]
    text = "\n".join(commands)
    assert "launch.py --model efficientnet-b0 --precision AMP --mode benchmark_training_short --platform DGXH200" \
        in text
    assert "--dist-backend nccl" in text and "--data-backend dali-gpu --augmentation autoaugment" in text
    assert "--jit compile" in text and "--device cuda" in text and "--device cpu" not in text


def test_a_step_whose_input_is_missing_is_skipped_naming_the_step_that_makes_it(tmp_path):
    out = tmp_path / "out"
    status = gpu_acceptance.main(["--quick", "--steps", "classify-onnx", str(out)],
                                 runner=lambda argv, **_: pytest.fail(f"ran {argv}"))
    result = summary(out)["steps"]["classify-onnx"]
    assert status == 0 and result["status"] == "SKIP"
    assert result["reason"] == ("needs ws/train-resume/model_best.pth.tar of step train-resume "
                                "(SKIP: not selected (--steps))")
