"""Experiment trackers beside the DLLogger report: TensorBoard (--tensorboard DIR) and MLflow (--mlflow [URI]).

They are backends of the report's Logger: every record it logs reaches them too, so a tracker shows exactly the
numbers of the report, under the report's metric names, with the report's step turned into one global step
number (the training iteration counted over the run):

    report step          tracker                                    global step
    "PARAMETER"          parameters (TensorBoard: a text table)     -
    [epoch, it]          train.* as is (train.loss, train.lr, ...)  epoch * iterations_per_epoch + it
    [epoch]              epoch/<metric> (epoch/val.top1, ...)       (epoch + 1) * iterations_per_epoch
    []                   summary/<metric>                           the last step logged
    [epoch, it, val_it], ["Calibration", it]: per-batch records, left to the report.

Only the main process (rank 0) has a Logger that writes, so only it writes to the trackers. Nothing is created
before the run begins (a run refused at start-up leaves no event file or MLflow run).
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .cli import UserError

# The MLflow experiment of runs that name none (MLFLOW_EXPERIMENT_NAME overrides it, as in MLflow's own API).
MLFLOW_EXPERIMENT = "efficientnet"
# MLflow accepts at most this many parameters in one batch.
MLFLOW_PARAMS_PER_BATCH = 100


class Tracker:
    """A receiver of the report's parameters and metrics; `open` before the first record, `close` at the end."""

    def open(self) -> None:
        """Create the tracker's files or run; called when the run begins writing."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The run's flags (one PARAMETER record)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Numeric metrics at a global step."""

    def flush(self) -> None:
        """Make what was logged visible to readers."""

    def close(self, failed: bool = False) -> None:
        """End the tracker's run (`failed`: it ended with an error)."""


class TensorBoardTracker(Tracker):
    """Scalars (and the flags as a text table) in a TensorBoard event file under `log_dir`."""

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch says "TensorBoard logging requires TensorBoard ..."
            raise UserError(f"--tensorboard needs the tensorboard package ({err}); pip install -r "
                            "requirements.txt") from None
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self.writer = None

    def open(self) -> None:
        self.writer = self._writer_class(log_dir=str(self.log_dir))

    def log_params(self, params: Mapping[str, Any]) -> None:
        rows = "\n".join(f"| {key} | {value} |" for key, value in params.items())
        self.writer.add_text("parameters", f"| flag | value |\n|---|---|\n{rows}")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def mlflow_tracking_uri(uri: str, workspace: str | Path) -> str:
    """--mlflow's URI: the one given, else MLFLOW_TRACKING_URI, else a file store in <workspace>/mlruns."""
    if uri:
        return uri
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(workspace) / "mlruns").resolve().as_uri()


def is_file_store(uri: str) -> bool:
    """Whether an MLflow tracking URI names a local folder (file:///..., or a plain path)."""
    return urlparse(uri).scheme in ("", "file")


class MLflowTracker(Tracker):
    """One MLflow run: the flags as parameters, the metrics with their global steps; FINISHED or FAILED at the
    end."""

    def __init__(self, uri: str, run_name: str) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UserError("--mlflow needs the mlflow package (mlflow-skinny is enough); pip install -r "
                            "requirements.txt") from None
        self._client_class = MlflowClient
        self.uri = uri
        self.run_name = run_name
        self.client = None
        self.run_id: str | None = None

    def open(self) -> None:
        if is_file_store(self.uri):
            # MLflow 3 keeps its folder store in maintenance mode and refuses it unless asked: the folder store is
            # what needs no database or server, so it is this flag's default.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = self._client_class(tracking_uri=self.uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + MLFLOW_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def build_trackers(tensorboard: str | None, mlflow: str | None, workspace: str | Path) -> list[Tracker]:
    """The trackers --tensorboard and --mlflow ask for (not yet open); a clear error when a package is missing."""
    trackers: list[Tracker] = []
    if tensorboard is not None:
        trackers.append(TensorBoardTracker(tensorboard))
    if mlflow is not None:
        trackers.append(MLflowTracker(mlflow_tracking_uri(mlflow, workspace), run_name=Path(workspace).resolve().name))
    return trackers


class TrackerFanOut:
    """Turns the report's records into tracker calls (see the module's docstring for the step mapping)."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers
        self.last_step = 0
        self._pending: list[tuple[Any, dict, int]] | None = []  # records logged before open()

    def open(self) -> None:
        """Open every tracker and hand it what was logged before."""
        if self._pending is None:
            return
        for tracker in self.trackers:
            tracker.open()
        pending, self._pending = self._pending, None
        for record in pending:
            self.record(*record)

    def record(self, step, data: Mapping[str, Any], iterations_per_epoch: int) -> None:
        """One report record (JSON-able values) of a run with `iterations_per_epoch` training iterations per epoch
        (0 without training)."""
        if self._pending is not None:
            self._pending.append((step, dict(data), iterations_per_epoch))
            return
        if isinstance(step, str):
            for tracker in self.trackers:
                tracker.log_params(data)
            return
        step = list(step)
        if step and isinstance(step[0], str):
            return  # calibration batches: the report has them
        if len(step) == 2:
            prefix, number = "", step[0] * iterations_per_epoch + step[1]
        elif len(step) == 1:
            prefix, number = "epoch/", (step[0] + 1) * iterations_per_epoch
        elif len(step) == 0:
            prefix, number = "summary/", self.last_step
        else:
            return  # validation batches: the report has them
        metrics = {prefix + name: float(value) for name, value in data.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}
        self.last_step = max(self.last_step, number)
        if metrics:
            for tracker in self.trackers:
                tracker.log_metrics(metrics, number)

    def flush(self) -> None:
        if self._pending is None:
            for tracker in self.trackers:
                tracker.flush()

    def close(self, failed: bool = False) -> None:
        if self._pending is None:
            for tracker in self.trackers:
                tracker.close(failed)
        self._pending = []  # closed: later records are held and never sent
        self.trackers = []
