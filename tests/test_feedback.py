"""What a run tells while it works: the start-up banner, iteration i/N with speed and time left, the compile note,
the labelled summary line, and the scripts that say where their files went. CPU only, tiny sizes."""
from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import pytest

from image_classification import models
from image_classification.logger import SUMMARY_LABEL, Logger, Progress
import prefork
from reports import read_report
from runs import free_port, train
import tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(models._REGISTRY, tiny_model.NAME, tiny_model.TinyEntry())


def folder_run(data: Path, workspace: Path, *extra: str) -> list[str]:
    """tiny-bn-free on the generated images (24 train, 15 val, 3 classes), batches of 4 accumulated in pairs."""
    return [str(data), "--arch", tiny_model.NAME, "--data-backend", "pytorch", "-b", "4", "--optimizer-batch-size",
            "8", "--epochs", "2", "--print-freq", "2", "--seed", "1", "-j", "0", "--device", "cpu", "--topk", "2",
            "--workspace", str(workspace), *extra]  # --topk 2 of 3 classes: no note that top-5 covers every class


@pytest.mark.slow
def test_banner_progress_and_summary_label(tiny, generated, tmp_path, capsys):
    workspace = tmp_path / "ws"
    train(folder_run(generated, workspace))
    out = capsys.readouterr().out
    lines = out.splitlines()
    # The banner: the "=> " lines but the per-class accuracy of the last validation, which ends the run.
    banner = [line for line in lines if line.startswith("=> ") and not line.startswith("=> val top-1 per class")]
    assert re.fullmatch(rf"=> {tiny_model.NAME}: 189 parameters, 3 classes; cpu, \d+ threads? per process; fp32, "
                        "memory format nchw, --jit no", banner[0]), banner[0]
    assert banner[1] == (f"=> data: {generated} (pytorch backend, 0 workers per process): train 24 images, "
                         "val 15 images; train size 8, eval size 8")
    assert banner[2] == "=> batch 4 per process x 1 process x accumulation 2 = 8 images per optimizer step"
    assert banner[3].startswith("=> 2 epochs of 6 iterations (from epoch 0); lr 0.1, sgd, step schedule")
    assert banner[4] == f"=> workspace: {workspace.resolve()} (report experiment_raport.json, checkpoints on)"
    # The banner comes before the first step's line; each step line says i/N.
    assert lines.index(banner[-1]) < next(i for i, line in enumerate(lines) if line.startswith("DLL "))
    assert [line.split(" - ")[1].split(" train.loss")[0] for line in lines if " Iteration: " in line
            and "Validation" not in line] == [f"Epoch: {e} Iteration: {i}/6" for e in (0, 1) for i in (2, 4, 6)]
    summary = [line for line in lines if "Summary" in line]
    assert len(summary) == 1 and f" - {SUMMARY_LABEL} train.loss : " in summary[0]
    # The report's run summary stays the reference's record: step [], the metrics, no label.
    (record,) = [r for r in read_report(workspace / "experiment_raport.json") if r.get("step") == [] and
                 "val.top1" in r["data"]]
    assert set(record) == {"timestamp", "datetime", "elapsedtime", "type", "step", "data"}


def test_jit_says_it_compiles_before_the_first_step(tiny, tmp_path, capsys):
    train(["--arch", tiny_model.NAME, "--data-backend", "synthetic", "-b", "4", "--epochs", "1", "--prof", "2",
           "--jit", "script", "-j", "0", "--device", "cpu", "--workspace", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    note = f"=> --jit script: compiling {tiny_model.NAME} with TorchScript (first steps take longer)"
    assert note in lines and lines.index(note) < next(i for i, line in enumerate(lines) if line.startswith("DLL "))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_a_bar_on_a_terminal_and_writes_plain_lines_elsewhere():
    terminal = Terminal()
    progress = Progress("train 0", 4, stream=terminal)
    for i in range(4):
        progress.update(i, 8)
    progress.close()
    drawn = terminal.getvalue()
    assert drawn.startswith("\rtrain 0 [") and " 4/4 " in drawn and " img/s eta 00:00" in drawn
    assert drawn.endswith("\n")

    log = io.StringIO()
    progress = Progress("train 0", 4, stream=log, interval=0)
    for i in range(4):
        progress.update(i, 8)
    progress.close()
    lines = log.getvalue().splitlines()
    # One line per iteration at interval 0, but none for the last: the epoch's own log line follows it.
    assert [line.split(",")[0] for line in lines] == ["train 0: 1/4 iterations", "train 0: 2/4 iterations",
                                                      "train 0: 3/4 iterations"]
    assert all(" img/s, eta " in line and "\r" not in line for line in lines)
    quiet = io.StringIO()
    progress = Progress("train 0", 4, stream=quiet)  # every 30 s by default: a short epoch prints nothing
    for i in range(4):
        progress.update(i, 8)
    assert quiet.getvalue() == ""


def test_a_log_line_on_a_terminal_clears_the_progress_bar_first():
    terminal = Terminal()
    Logger(None, stdout=terminal).log((0, 2), {"train.loss": 1.0})
    assert terminal.getvalue().startswith("\r\x1b[KDLL ")


@pytest.mark.slow
def test_plot_report_says_where_the_png_went_and_draws_the_learning_rate(tmp_path):
    report = tmp_path / "raport.json"
    logger = Logger(report, print_stdout=False)
    for epoch in range(3):
        logger.log((epoch,), {"train.loss": 2.0 - epoch * 0.5, "val.loss": 2.1, "val.top1": 30.0 + 10 * epoch,
                              "val.top5": 80.0, "train.lr": 0.1 * (epoch + 1)})
    logger.close()
    output = tmp_path / "plots" / "curves.png"
    result = prefork.run([sys.executable, "scripts/plot_report.py", str(report), "--output", str(output)], cwd=ROOT,
                         timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"plot_report.py: wrote the loss, top-1, top-5 and learning-rate curves of 3 epochs to "
                             f"{output}\n")
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import plot_report
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert ("lr", ("train",)) in plot_report.PANELS


def test_stdout_steps_say_i_of_n_and_label_the_summary():
    stream = io.StringIO()
    logger = Logger(None, stdout=stream)
    logger.iterations_per_epoch = 31
    logger.log((0, 20), {"train.loss": 1.0})
    logger.log((0, 31, 5), {"val.top1": 1.0})
    logger.log((), {"val.top1": 1.0})
    assert [line.split(" - ")[1].split(" val.")[0].split(" train.")[0] for line in stream.getvalue().splitlines()] \
        == ["Epoch: 0 Iteration: 20/31", "Epoch: 0 Iteration: 31/31 Validation Iteration: 5", SUMMARY_LABEL]


@pytest.mark.slow
def test_two_gloo_processes_in_nhwc_amp_print_each_note_once_and_no_ddp_stride_warning(tmp_path):
    # A DGX recipe line on two CPU processes: channels_last with bf16 autocast is where the depthwise weights'
    # gradients came back with other strides than their DDP bucket views; launch.py's notes, the ignored
    # --gpu-affinity warning and the banner were printed by every rank.
    command = [sys.executable, "multiproc.py", "--nproc_per_node", "2", "--master_port", str(free_port()), "launch.py",
               "--model", "efficientnet-b0", "--precision", "AMP", "--mode", "benchmark_training_short", "--platform",
               "DGXA100", "--memory-format", "nhwc", "--image-size", "32", "-b", "2", "--prof", "3", "--num_classes",
               "3", "--device", "cpu", "--workspace", str(tmp_path / "ws"),
               "--optimizer-batch-size", "4"]  # a step every iteration: DDP's reducer runs (the recipe's 4096 never)
    result = prefork.run(command, cwd=ROOT, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Grad strides do not match bucket view strides" not in result.stderr
    assert result.stderr.count("launch.py: note: workers 10 of this platform") == 1, result.stderr
    assert result.stderr.count("--gpu-affinity socket_unique_contiguous pins processes") == 1, result.stderr
    assert result.stdout.count("launch.py: main.py ") == 1
    assert result.stdout.count("=> efficientnet-b0: ") == 1
    assert "AMP (bf16 autocast), memory format nhwc" in result.stdout and ", 2 processes;" in result.stdout
