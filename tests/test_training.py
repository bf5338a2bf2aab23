"""main.py's job end to end, in-process: reports, checkpoints, signals, one-line errors, divergence."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import prefork
from reports import by_step, epoch_summaries, read_report
from runs import SIZE, float_tensors, folder_args, needs_data_module, run_args, train

from image_classification import checkpoint as ckpt
from image_classification.cli import EXIT_INTERRUPTED

ROOT = Path(__file__).resolve().parents[1]


TRAIN_KEYS = {"train.loss", "train.total_ips", "train.compute_ips", "train.data_time", "train.compute_time",
              "train.lr", "train.grad_scale"}


VAL_KEYS = {"val.loss", "val.top1", "val.top5", "val.total_ips", "val.compute_ips", "val.data_time",
            "val.compute_latency", "val.compute_latency_at100", "val.compute_latency_at99",
            "val.compute_latency_at95", "val.compute_latency_at90", "val.first_batch_latency"}


def test_short_run_writes_report_and_checkpoints(tmp_path):
    needs_data_module()
    summary = train(run_args(tmp_path, "--use-ema", "0.9", "--gather-checkpoints", "1", "--label-smoothing",
                             "0.1", "--mixup", "0.2"))
    records = read_report(tmp_path / "experiment_raport.json")
    params = [r for r in records if r["type"] == "LOG" and r["step"] == "PARAMETER"]
    assert params[0]["data"]["arch"] == "efficientnet-b0" and params[1]["data"]["model.num_classes"] == 4
    metadata = {r["metric"] for r in records if r["type"] == "METADATA"}
    assert TRAIN_KEYS | VAL_KEYS <= metadata
    iterations = [data for step, data in by_step(records).items() if len(step) == 2]
    assert iterations and TRAIN_KEYS <= set(iterations[0])
    epochs = epoch_summaries(records)
    assert sorted(epochs) == [0, 1]
    for data in epochs.values():
        assert TRAIN_KEYS | VAL_KEYS | {k.replace("val.", "val_ema.") for k in VAL_KEYS} <= set(data)
    assert epochs[0]["train.lr"] == pytest.approx(0.01)  # warmup 1 epoch: lr·1/1
    final = [r for r in records if r["type"] == "LOG" and r["step"] == []]
    assert len(final) == 2 and by_step(records)[()]["val.top1"] == pytest.approx(summary["val.top1"])

    for name in ("checkpoint.pth.tar", "model_best.pth.tar", "checkpoint_0002.pth.tar", "classes.txt"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "checkpoint_0001.pth.tar").exists()  # --gather-checkpoints 1 keeps the last one
    assert (tmp_path / "classes.txt").read_text().split() == ["0", "1", "2", "3"] or \
        len((tmp_path / "classes.txt").read_text().split()) == 4
    saved = torch.load(tmp_path / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert {"epoch", "best_prec1", "state_dict", "optimizer", "state_dict_ema", "scaler", "rng", "iteration",
            "data_seed", "arch", "args"} <= set(saved)
    assert saved["epoch"] == 2 and saved["iteration"] == 0
    assert not any(k.startswith("module.") for k in saved["state_dict"])
    assert not list(tmp_path.glob(".*.tmp"))


# This suite's metrics beyond the reference's (README, Differences from the reference).
OUR_METRICS = ("image_size", "bad_files", "compute_latency_at90", "first_batch_latency", "per_class_top1",
               "confusion_matrix")


def _reference_shape(records: list[dict]) -> list[tuple]:
    """Each record as what the reference's format fixes: its keys in order, type, step, and the metric names in
    order (the metrics this suite adds left out); values are the run's own."""
    shape = []
    for record in records:
        if record["type"] == "METADATA":
            if not record["metric"].endswith(OUR_METRICS):
                shape.append((tuple(record), record["metric"], json.dumps(record["metadata"])))
        elif record["step"] != "PARAMETER":
            names = tuple(name for name in record["data"] if not name.endswith(OUR_METRICS))
            if names:
                shape.append((tuple(record), record["step"], names))
    return shape


@pytest.mark.slow
def test_report_matches_the_references_record_for_record(tmp_path):
    """tests/fixtures/reference_report.json is what the reference's DLLogger writes for this run (main.py with the
    same flags, synthetic data): record order, verbosity split, keys and metadata must be the same."""
    needs_data_module()
    train(["--arch", "efficientnet-b0", "--data-backend", "synthetic", "--image-size", str(SIZE), "-b", "4",
           "--num_classes", "4", "--workers", "0", "--epochs", "2", "--print-freq", "2", "--prof", "3",
           "--workspace", str(tmp_path)])
    ours = read_report(tmp_path / "experiment_raport.json")
    reference = read_report(ROOT / "tests" / "fixtures" / "reference_report.json")
    assert _reference_shape(ours) == _reference_shape(reference)
    parameters = [r for r in ours if r["type"] == "LOG" and r["step"] == "PARAMETER"]
    expected = [r for r in reference if r["type"] == "LOG" and r["step"] == "PARAMETER"]
    assert len(parameters) == len(expected) == 2
    for mine, theirs in zip(parameters, expected):
        assert set(theirs["data"]) <= set(mine["data"])  # plus this suite's flags
    assert all(r["datetime"].endswith("+00:00") for r in ours)
    # Epoch and run summaries hold every registered metric: null where the run has none (--training-only).
    only = tmp_path / "training_only"
    train(run_args(only, "--training-only"))
    summary = by_step(read_report(only / "experiment_raport.json"))[()]
    assert summary["val.top1"] is None and isinstance(summary["train.loss"], float)


@pytest.mark.slow
def test_main_py_prints_one_line_errors(tmp_path):
    result = prefork.run([sys.executable, "main.py", *run_args(tmp_path, "--resume", str(tmp_path / "nope"))],
                         cwd=ROOT, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"main.py: error: --resume {tmp_path / 'nope'}: no such file"]
    result = prefork.run([sys.executable, "main.py", *run_args(tmp_path, "--optimizer-batch-size", "6")],
                         cwd=ROOT, timeout=120)
    assert result.returncode == 1 and "multiple of world size x batch size" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_exits_cleanly(tmp_path):
    needs_data_module()
    argv = [sys.executable, "main.py", *run_args(tmp_path, "--prof", "40", "--epochs", "1", "--print-freq", "1")]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    report = tmp_path / "experiment_raport.json"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the first logged iteration
        if report.is_file() and '"step": [0, 1]' in report.read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err  # not 0: a retry loop must tell it from a finished run
    saved = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert saved["epoch"] == 0 and 1 <= saved["iteration"] < 40
    assert "stopped by signal" in out
    # --resume finishes the interrupted epoch from the next batch.
    summary = train(run_args(tmp_path, "--prof", "40", "--epochs", "1", "--resume", str(tmp_path / "checkpoint.pth.tar")))
    saved = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert saved["epoch"] == 1 and saved["iteration"] == 0 and summary["epoch"] == 1


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_saves_and_resumes(tiny_data, tmp_path):
    # SLURM cancellation, preemption and systemd stop a job by sending SIGTERM to its whole process group: the
    # DataLoader workers receive it too and must leave the stop to the main process.
    argv = [sys.executable, "main.py", *folder_args(tiny_data, tmp_path, "--workers", "2", "--epochs", "3",
                                                     "--print-freq", "1")]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    report = tmp_path / "experiment_raport.json"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:  # wait for the second epoch's first iteration
        if report.is_file() and '"step": [1, 1]' in report.read_text():
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "killed by signal" not in err and "Traceback" not in err
    saved = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert saved["epoch"] in (1, 2)
    summary = train(folder_args(tiny_data, tmp_path, "--workers", "2", "--epochs", "3", "--resume",
                                str(tmp_path / "checkpoint.pth.tar")))
    assert summary["epoch"] == 3 and not summary["interrupted"]


@pytest.mark.slow
def test_diverging_run_stops_with_one_line_and_keeps_the_finite_checkpoint(tmp_path):
    # One finite epoch, then the same run resumed at a learning rate no network survives.
    train(run_args(tmp_path, "--run-epochs", "1"))
    finite = float_tensors(tmp_path / "checkpoint.pth.tar")
    result = prefork.run([sys.executable, "main.py", *run_args(tmp_path, "--lr", "1e30", "--resume",
                                                               str(tmp_path / "checkpoint.pth.tar"))],
                         cwd=ROOT, timeout=300)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("main.py: error: training diverged at epoch 1, iteration "), lines
    assert "last finite loss" in lines[0] and "--lr" in lines[0]
    after = float_tensors(tmp_path / "checkpoint.pth.tar")
    assert all(torch.equal(finite[k], after[k]) for k in finite)  # not overwritten
    assert not list(tmp_path.glob(".*.tmp"))


def test_refused_run_leaves_no_report_and_an_earlier_report_untouched(tmp_path):
    with pytest.raises(ckpt.CheckpointError):
        train(run_args(tmp_path, "--resume", str(tmp_path / "missing.pth.tar")))
    assert list(tmp_path.iterdir()) == []
    report = tmp_path / "experiment_raport.json"
    report.write_text("DLLL {}\n")
    with pytest.raises(ValueError, match="data folder"):
        train(run_args(tmp_path, "--data-backend", "pytorch", str(tmp_path / "no-such-data")))
    assert report.read_text() == "DLLL {}\n"


def test_weights_made_non_finite_by_the_last_step_stop_the_run_before_validation(tmp_path, monkeypatch):
    # The loss of the epoch's last step is finite (computed before the step), the step itself leaves NaN weights.
    from image_classification.train import epoch as training
    real_step = training.train_step

    calls = {"n": 0}

    def poisoned_step(engine, *args, **kwargs):
        loss = real_step(engine, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the epoch's last (--prof 3)
            with torch.no_grad():
                engine.model.classifier.fc.bias.fill_(float("nan"))
        return loss
    monkeypatch.setattr(training, "train_step", poisoned_step)
    from image_classification.train.divergence import DivergenceError
    with pytest.raises(DivergenceError, match=r"epoch 0, iteration 3: the weights hold NaN or infinite values "
                                              r"\(classifier.fc.bias\) after its last step"):
        train(run_args(tmp_path, "--print-freq", "100"))
    assert not (tmp_path / "checkpoint.pth.tar").exists()
