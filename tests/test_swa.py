"""Stochastic weight averaging in main.py (--swa-start, --swa-lr): the average, its LR, BN statistics updated at
the end, swa.* in the report, model_swa.pth.tar, and an exact --resume. CPU only, 32 px."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from image_classification.cli import UserError
from reports import by_step, epoch_summaries, read_report
from runs import train

SIZE = 32


def run_args(data: Path, workspace: Path, *extra: str) -> list[str]:
    return [str(data), "--arch", "efficientnet-b0", "--data-backend", "pytorch", "--image-size", str(SIZE), "-b", "12",
            "--num_classes", "3", "--workers", "0", "--epochs", "3", "--seed", "1", "--lr", "0.01",
            "--lr-schedule", "cosine", "--workspace", str(workspace), *extra]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_swa_averages_the_last_epochs_updates_bn_and_reports_swa_metrics(generated, tmp_path):
    summary = train(run_args(generated, tmp_path, "--swa-start", "1", "--swa-lr", "0.004", "--swa-anneal-epochs", "0",
                             "--gather-checkpoints", "3"))
    records = read_report(tmp_path / "experiment_raport.json")
    epochs = epoch_summaries(records)
    assert epochs[0]["train.lr"] == pytest.approx(0.01)  # the schedule's before --swa-start
    assert epochs[1]["train.lr"] == epochs[2]["train.lr"] == pytest.approx(0.004)  # SWALR's, no annealing
    assert epochs[2]["swa.top1"] is None  # registered, measured only at the end of the run
    final = by_step(records)[()]
    assert final["swa.top1"] == summary["swa.top1"] and {"swa.top5", "swa.loss"} <= set(final)
    assert {"swa.top1", "swa.loss"} <= {r["metric"] for r in records if r["type"] == "METADATA"}

    after = [load(tmp_path / f"checkpoint_{e:04}.pth.tar") for e in (2, 3)]  # weights after epochs 1 and 2
    swa = load(tmp_path / "model_swa.pth.tar")
    assert swa["swa_epochs_averaged"] == 2 and swa["optimizer"] == {} and "swa" not in swa
    for name, tensor in after[0]["state_dict"].items():
        if "running_" not in name and "num_batches" not in name:
            torch.testing.assert_close(swa["state_dict"][name], (tensor + after[1]["state_dict"][name]) / 2)
    # The average's BN statistics were measured at the end: not those it held during training (the initial
    # model's: AveragedModel averages parameters only). The end re-saves the last epoch's files with the new ones.
    during = after[0]["swa"]["state_dict"]
    stats = [name for name in swa["state_dict"] if name.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(swa["state_dict"][n], during[n]) for n in stats)
    latest = load(tmp_path / "checkpoint.pth.tar")["swa"]
    assert all(torch.equal(latest["state_dict"][n], swa["state_dict"][n]) for n in stats)

    # model_swa.pth.tar evaluates with --evaluate --resume and reproduces swa.top1.
    evaluated = train(run_args(generated, tmp_path / "eval", "--evaluate", "--resume",
                               str(tmp_path / "model_swa.pth.tar")))
    assert evaluated["val.top1"] == pytest.approx(summary["swa.top1"])


def stop_during_step(monkeypatch, number: int) -> None:
    """SIGTERM during training step `number` (from 1): the run saves after that step and returns."""
    from image_classification.train import epoch as training
    real_step, calls = training.train_step, [0]

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == number:
            signal.raise_signal(signal.SIGTERM)  # StopRequest's handler only sets its flag
        return real_step(*args, **kwargs)
    monkeypatch.setattr(training, "train_step", step)


@pytest.mark.slow
def test_resume_mid_epoch_with_swa_continues_the_average_and_the_lr_exactly(generated, tmp_path, monkeypatch):
    swa = ("--swa-start", "1", "--swa-lr", "0.002", "--swa-anneal-epochs", "3")
    full, split = tmp_path / "full", tmp_path / "split"
    train(run_args(generated, full, *swa))
    with monkeypatch.context() as patch:
        stop_during_step(patch, 2 * 2 + 1)  # 2 steps per epoch: the first step of epoch 2, an averaging epoch
        assert train(run_args(generated, split, *swa))["interrupted"]
    saved = load(split / "checkpoint.pth.tar")
    assert (saved["epoch"], saved["iteration"]) == (2, 1) and int(saved["swa"]["n_averaged"]) == 1
    assert not (split / "model_swa.pth.tar").exists()  # the run has not finished
    train(run_args(generated, split, *swa, "--resume", str(split / "checkpoint.pth.tar")))

    a, b = load(full / "checkpoint.pth.tar"), load(split / "checkpoint.pth.tar")
    for name, tensor in a["swa"]["state_dict"].items():
        assert torch.equal(tensor, b["swa"]["state_dict"][name]), name
    assert a["swa"]["scheduler"] == b["swa"]["scheduler"]
    for name, tensor in load(full / "model_swa.pth.tar")["state_dict"].items():
        assert torch.equal(tensor, load(split / "model_swa.pth.tar")["state_dict"][name]), name
    ra, rb = epoch_summaries(read_report(full / "experiment_raport.json")), \
        epoch_summaries(read_report(split / "experiment_raport.json"))
    assert [ra[e]["train.lr"] for e in range(3)] == [rb[e]["train.lr"] for e in range(3)]
    assert ra[0]["train.lr"] > ra[1]["train.lr"] > ra[2]["train.lr"] > 0.002  # annealing over 3 epochs
    assert by_step(read_report(full / "experiment_raport.json"))[()]["swa.top1"] == \
        by_step(read_report(split / "experiment_raport.json"))[()]["swa.top1"]


@pytest.mark.parametrize("extra, message", [
    (("--swa-lr", "0.01"), "--swa-lr needs --swa-start"),
    (("--swa-start", "1"), "--swa-start needs --swa-lr"),
    (("--swa-start", "3", "--swa-lr", "0.01"), "--swa-start 3 averages nothing in a run of --epochs 3"),
    (("--swa-start", "1", "--swa-lr", "0.01", "--evaluate"), "--swa-start is for training"),
])
def test_swa_flag_combinations_that_average_nothing_are_refused(generated, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        train(run_args(generated, tmp_path, *extra))
    assert not (tmp_path / "experiment_raport.json").exists()


def test_resume_without_swa_state_after_swa_start_is_refused(generated, tmp_path):
    train(run_args(generated, tmp_path, "--run-epochs", "2"))
    with pytest.raises(UserError, match="after --swa-start 1, and has no SWA state"):
        train(run_args(generated, tmp_path, "--swa-start", "1", "--swa-lr", "0.01", "--resume",
                       str(tmp_path / "checkpoint.pth.tar")))
