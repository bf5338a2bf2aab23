"""--tensorboard and --mlflow: the report's records reach TensorBoard's event file and an MLflow run, read back
with each tool's own reader. CPU only, tiny sizes."""
from __future__ import annotations

import pytest

from image_classification import models
from image_classification.logger import Logger
from image_classification.trackers import Tracker, TrackerFanOut
from reports import by_step, read_report
from runs import train
import tiny_model


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(models._REGISTRY, tiny_model.NAME, tiny_model.TinyEntry())


def tiny_run(workspace, *extra: str) -> list[str]:
    """tiny-bn-free on synthetic batches: 2 epochs of 3 iterations, a log record every 2."""
    return ["--arch", tiny_model.NAME, "--data-backend", "synthetic", "-b", "4", "--epochs", "2", "--prof", "3",
            "--print-freq", "2", "--seed", "1", "--lr", "0.05", "-j", "0", "--device", "cpu", "--workspace",
            str(workspace), *extra]


@pytest.mark.slow
def test_tensorboard_and_mlflow_receive_the_reports_records(tiny, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the run opts in to the folder store itself
    workspace = tmp_path / "ws"
    train(tiny_run(workspace, "--tensorboard", str(tmp_path / "tb"), "--mlflow"))
    steps = by_step(read_report(workspace / "experiment_raport.json"))
    # The report's values at the global step (iteration over the run): [epoch, it] -> epoch * 3 + it.
    interval_loss = {step[0] * 3 + step[1]: data["train.loss"] for step, data in steps.items()
                     if len(step) == 2 and isinstance(step[0], int)}  # not ["Per class", epoch]
    epoch_top1 = {(step[0] + 1) * 3: data["val.top1"] for step, data in steps.items() if len(step) == 1}
    assert sorted(interval_loss) == [2, 5] and sorted(epoch_top1) == [3, 6]

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train.loss", "train.lr", "epoch/train.loss", "epoch/val.top1", "summary/val.top1"} \
        <= set(events.Tags()["scalars"])
    assert {e.step: e.value for e in events.Scalars("train.loss")} == pytest.approx(interval_loss)
    assert {e.step: e.value for e in events.Scalars("epoch/val.top1")} == pytest.approx(epoch_top1)
    assert events.Scalars("summary/val.top1")[0].value == pytest.approx(max(epoch_top1.values()))
    assert "parameters/text_summary" in events.Tags()["tensors"]  # the flags, as a text table

    client = MlflowClient((workspace / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("efficientnet")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "ws"
    assert run.data.params["lr"] == "0.05" and run.data.params["model.num_classes"] == "3"
    history = client.get_metric_history(run.info.run_id, "train.loss")
    assert {m.step: m.value for m in history} == pytest.approx(interval_loss)
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "epoch/val.top1")} \
        == pytest.approx(epoch_top1)


class Recorder(Tracker):
    def __init__(self):
        self.calls = []

    def open(self):
        self.calls.append(("open",))

    def log_params(self, params):
        self.calls.append(("params", dict(params)))

    def log_metrics(self, metrics, step):
        self.calls.append(("metrics", dict(metrics), step))

    def close(self, failed=False):
        self.calls.append(("close", failed))


def test_fan_out_maps_steps_and_waits_for_the_run_to_begin():
    recorder = Recorder()
    fan_out = TrackerFanOut([recorder])
    fan_out.record("PARAMETER", {"lr": 0.1}, 0)
    assert recorder.calls == []  # nothing before the run begins (a refused run leaves no tracker run)
    fan_out.open()
    fan_out.record((1, 4), {"train.loss": 2.0, "train.note": "text", "train.flag": True}, 10)
    fan_out.record((1, 10, 3), {"val.top1": 50.0}, 10)           # a validation batch: the report's only
    fan_out.record(("Calibration", 2), {"calib.total_ips": 5.0}, 10)
    fan_out.record((1,), {"val.top1": 50.0, "val.loss": "nan"}, 10)
    fan_out.record((), {"val.top1": 60.0}, 10)
    fan_out.close(failed=True)
    assert recorder.calls == [("open",), ("params", {"lr": 0.1}), ("metrics", {"train.loss": 2.0}, 14),
                              ("metrics", {"epoch/val.top1": 50.0}, 20), ("metrics", {"summary/val.top1": 60.0}, 20),
                              ("close", True)]


def test_logger_ends_the_tracker_run_as_failed_on_an_error_and_ranks_above_0_track_nothing(tmp_path):
    recorder = Recorder()
    with pytest.raises(RuntimeError):
        with Logger(tmp_path / "r.json", trackers=[recorder], print_stdout=False) as logger:
            logger.log((0, 1), {"train.loss": 1.0})
            raise RuntimeError("diverged")
    assert recorder.calls[-1] == ("close", True)
    other_rank = Recorder()
    Logger(tmp_path / "r.json", enabled=False, trackers=[other_rank]).log((0, 1), {"train.loss": 1.0})
    assert other_rank.calls == []
