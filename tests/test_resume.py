"""--resume (train/resume.py): exact continuation after an epoch and mid-epoch, and its refusals."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import prefork
from reports import by_step, epoch_summaries, read_report
from runs import float_tensors, folder_args, needs_data_module, run_args, stop_at_iteration, train

from image_classification import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_resume_after_one_epoch_equals_uninterrupted_run(tmp_path):
    needs_data_module()
    full, split = tmp_path / "full", tmp_path / "split"
    train(run_args(full, "--use-ema", "0.9", "--mixup", "0.2"))
    train(run_args(split, "--use-ema", "0.9", "--mixup", "0.2", "--run-epochs", "1"))
    assert torch.load(split / "checkpoint.pth.tar", weights_only=True)["epoch"] == 1
    train(run_args(split, "--use-ema", "0.9", "--mixup", "0.2", "--resume", str(split / "checkpoint.pth.tar")))

    a = torch.load(full / "checkpoint.pth.tar", weights_only=True)
    b = torch.load(split / "checkpoint.pth.tar", weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    assert a["best_prec1"] == b["best_prec1"]
    ra, rb = epoch_summaries(read_report(full / "experiment_raport.json")), \
        epoch_summaries(read_report(split / "experiment_raport.json"))
    for epoch in (0, 1):
        for key in ("train.loss", "train.lr", "val.loss", "val.top1", "val.top5", "val_ema.loss"):
            assert ra[epoch][key] == rb[epoch][key], (epoch, key)


def test_resume_refuses_missing_corrupt_and_finished_checkpoints(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no such file"):
        train(run_args(tmp_path, "--resume", str(tmp_path / "missing.pth.tar")))
    corrupt = tmp_path / "corrupt.pth.tar"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ckpt.CheckpointError, match="not a readable"):
        train(run_args(tmp_path, "--resume", str(corrupt)))
    weights = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1)}, weights)
    with pytest.raises(ckpt.CheckpointError, match="not a training checkpoint"):
        train(run_args(tmp_path, "--resume", str(weights)))
    finished = tmp_path / "finished.pth.tar"
    torch.save({"epoch": 2, "best_prec1": 0.0, "state_dict": {}, "optimizer": {}}, finished)
    with pytest.raises(ckpt.CheckpointError, match="already run 2 epochs"):
        train(run_args(tmp_path, "--resume", str(finished)))


@pytest.mark.parametrize("backend", ["pytorch", "dali-cpu"])
@pytest.mark.slow
def test_resume_mid_epoch_equals_the_uninterrupted_run(tiny_data, tmp_path, monkeypatch, backend):
    # Dropout (b0's 0.2), stochastic depth, mixup and EMA all draw random numbers during the steps after the stop.
    extra = ["--data-backend", backend, "--survival_prob", "0.8", "--mixup", "0.2", "--use-ema", "0.9"]
    if backend.startswith("dali"):
        pytest.importorskip("nvidia.dali")
    full, split = tmp_path / "full", tmp_path / "split"
    train(folder_args(tiny_data, full, *extra))
    with monkeypatch.context() as patch:
        stop_at_iteration(patch, 8 + 3)  # epoch 1, after its third batch
        summary = train(folder_args(tiny_data, split, *extra))
    assert summary["interrupted"]
    saved = torch.load(split / "checkpoint.pth.tar", weights_only=True)
    assert (saved["epoch"], saved["iteration"]) == (1, 3)
    train(folder_args(tiny_data, split, *extra, "--resume", str(split / "checkpoint.pth.tar")))
    expected, resumed = float_tensors(full / "checkpoint.pth.tar"), float_tensors(split / "checkpoint.pth.tar")
    assert expected.keys() == resumed.keys()
    for name, value in expected.items():
        assert (value - resumed[name]).abs().max().item() <= 1e-6, name
    # The interrupted epoch is reported once, by the run that finished it, with the uninterrupted train.loss;
    # the run summary once, over both runs' epochs.
    ra, rb = read_report(full / "experiment_raport.json"), read_report(split / "experiment_raport.json")
    epochs = [r["step"][0] for r in rb if r["type"] == "LOG" and isinstance(r["step"], list) and len(r["step"]) == 1]
    assert epochs == [0, 0, 1, 1]  # one record per verbosity level
    assert epoch_summaries(ra)[1]["train.loss"] == epoch_summaries(rb)[1]["train.loss"]
    summaries = [r for r in rb if r["type"] == "LOG" and r["step"] == []]
    assert len(summaries) == 2 and by_step(rb)[()]["val.top1"] == by_step(ra)[()]["val.top1"]


@pytest.mark.slow
def test_resume_mismatch_names_the_architecture_and_the_class_count(tmp_path):
    train(run_args(tmp_path, "--run-epochs", "1", "--arch", "efficientnet-b1"))
    path = str(tmp_path / "checkpoint.pth.tar")
    result = prefork.run([sys.executable, "main.py", *run_args(tmp_path, "--resume", path)], cwd=ROOT, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"main.py: error: --resume {path}: the checkpoint is efficientnet-b1, --arch is efficientnet-b0; resume "
        "with --arch efficientnet-b1"]
    with pytest.raises(ValueError, match=r"the checkpoint has 4 classes, --num_classes is 5; resume with "
                                         r"--num_classes 4$"):
        train(run_args(tmp_path, "--arch", "efficientnet-b1", "--num_classes", "5", "--resume", path))
