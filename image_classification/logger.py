"""The run's report and console output, in the reference's DLLogger formats.

JSON lines (the `--raport-file`), record for record as the reference's DLLogger JSONStreamBackend writes them:
every line is `DLLL ` followed by one JSON object

    DLLL {"timestamp": "1712.3", "datetime": "2024-... +00:00", "elapsedtime": "12.5", "type": "LOG",
          "step": [0, 10], "data": {"train.loss": 2.3, ...}}
    DLLL {"timestamp": "1712.3", "elapsedtime": "0.1", "datetime": "...", "type": "METADATA",
          "metric": "train.loss", "metadata": {"unit": null, "format": ":.5f"}}

Steps: "PARAMETER" (the run's flags, then the model's as model.*), [epoch, it] for training iterations,
[epoch, it, val_it] for validation iterations, ["Calibration", it], [epoch] for epoch summaries and [] for
the run summary. Each metric has a verbosity level (the reference's DEFAULT or VERBOSE): a step's metrics
are written as one record per level, DEFAULT first, each in the order the metrics were registered; epoch
and run summaries hold every registered metric, null where the run has no value (val.* with
--training-only); calibration's values reach the run summary as the reference's do. The dllogger package is not on the registry, so this module writes the format itself.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from numbers import Number
from pathlib import Path
from typing import IO, Any

from .trackers import Tracker, TrackerFanOut

# DLLogger's verbosity levels: the reference's stdout shows DEFAULT metrics, its report both.
DEFAULT, VERBOSE = 0, 1

# Metric metadata of the reference (unit and print format), by metric name without its prefix; train.lr is
# registered without metadata there.
METRIC_METADATA: dict[str, dict[str, str]] = {
    "loss": {"unit": None, "format": ":.5f"},
    "kd_loss": {"unit": None, "format": ":.5f"},  # distillation.py's term of train.loss
    "top1": {"unit": "%", "format": ":.2f"},
    "top5": {"unit": "%", "format": ":.2f"},
    "total_ips": {"unit": "images/s", "format": ":.2f"},
    "compute_ips": {"unit": "images/s", "format": ":.2f"},
    "data_time": {"unit": "s", "format": ":.5f"},
    "compute_time": {"unit": "s", "format": ":.5f"},
    "compute_latency": {"unit": "s", "format": ":.5f"},
    "compute_latency_at100": {"unit": "s", "format": ":.5f"},
    "compute_latency_at99": {"unit": "s", "format": ":.5f"},
    "compute_latency_at95": {"unit": "s", "format": ":.5f"},
    "compute_latency_at90": {"unit": "s", "format": ":.5f"},
    "first_batch_latency": {"unit": "s", "format": ":.5f"},
    "lr": {},
    "grad_scale": {"unit": None, "format": ":.5f"},
    "image_size": {"unit": "px", "format": ":d"},
    "bad_files": {"unit": "files", "format": ":d"},
}


def _jsonable(value: Any) -> Any:
    """Plain JSON values: tensors and numpy scalars become numbers, NaN/inf become strings as DLLogger does."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# The stdout label of the run summary (step []): its values are the best top-1/top-5, the lowest losses and the
# mean speeds over the epochs, not the last epoch's; the report's JSON record is the reference's, unlabelled.
SUMMARY_LABEL = "Summary (best top-1, lowest loss, mean speed over the run):"


def format_step(step, iterations_per_epoch: int = 0) -> str:
    """The stdout backend's rendering of a step, as the reference prints it, with the epoch's iteration count
    ("Iteration: 20/31") when it is known and the summary labelled as such."""
    if isinstance(step, str):
        return step
    if len(step) == 0:
        return SUMMARY_LABEL
    parts = [f"Epoch: {step[0]}" if isinstance(step[0], Number) else str(step[0])]
    if len(step) > 1:
        of = f"/{iterations_per_epoch}" if iterations_per_epoch and isinstance(step[0], Number) else ""
        parts.append(f"Iteration: {step[1]}{of}")
    if len(step) > 2:
        parts.append(f"Validation Iteration: {step[2]}")
    return " ".join(parts)


def format_value(name: str, value: Any) -> str:
    meta = METRIC_METADATA.get(name.split(".")[-1])
    if meta and "format" in meta and isinstance(value, (int, float)) and not isinstance(value, bool):
        spec = meta["format"]
        if spec.endswith("d") and isinstance(value, float):  # an integer metric averaged over epochs
            spec = ":g"
        text = ("{" + spec + "}").format(value)
        return f"{name} : {text}" + (f" {meta['unit']}" if meta.get("unit") else "")
    return f"{name} : {value}"


class ReportError(ValueError):
    """A report that cannot be read; the message names the file (and the line)."""


def read_report(path: str | Path) -> list[dict]:
    """The records (LOG and METADATA) of a DLLogger JSON-lines report, in order; other lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not a text report (DLLogger JSON lines)") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("DLLL "):
            try:
                records.append(json.loads(line[5:]))
            except json.JSONDecodeError:
                raise ReportError(f"{path}:{number}: not a JSON record") from None
    return records


def by_step(records: list[dict]) -> dict[tuple, dict]:
    """The LOG records of every step (a tuple: () the run, (epoch,), (epoch, iteration), ...) merged in file
    order: a step's metrics come as one record per verbosity level, and a resumed run logs an epoch again.
    A null (a registered metric a summary lacks) never hides a value."""
    steps: dict[tuple, dict] = {}
    for record in records:
        if record.get("type") == "LOG" and isinstance(record.get("step"), list):
            merged = steps.setdefault(tuple(record["step"]), {})
            merged.update({k: v for k, v in record["data"].items() if v is not None or k not in merged})
    return steps


def epoch_summaries(records: list[dict]) -> dict[int, dict]:
    """{epoch: its metrics} of a report's records, in epoch order."""
    epochs = {step[0]: data for step, data in by_step(records).items() if len(step) == 1 and isinstance(step[0], int)}
    return dict(sorted(epochs.items()))


class Logger:
    """DLLogger-format JSON-lines report plus a readable stdout log; only the main process writes anything.

    `.log(step, data)`, `.metadata(name, meta)`, `.flush()`, `.close()`. Steps: "PARAMETER", (), (epoch,),
    (epoch, it) or (epoch, it, val_it).

    With `deferred`, the file is neither created nor truncated until `begin()`: records logged before are
    kept in memory, so a run refused while it is being set up leaves no report (and an earlier report in the
    workspace untouched). `trackers` (trackers.py: TensorBoard, MLflow) receive every record too, from `begin()`
    on (with what was logged before).
    """

    def __init__(self, json_path: str | Path | None = None, *, enabled: bool = True, stdout: IO | None = None,
                 print_stdout: bool = True, append: bool = False, deferred: bool = False,
                 trackers: Sequence[Tracker] = ()):
        self.enabled = enabled
        # Training iterations per epoch (as run: --prof caps them): the stdout's "Iteration: i/N" and the trackers'
        # global step. 0 until the training loop sets it, and without training.
        self.iterations_per_epoch = 0
        self.tracking = TrackerFanOut(list(trackers)) if enabled and trackers else None
        self.start = time.time()
        self.levels: dict[str, int] = {}  # registered metrics, in order, and their verbosity levels
        self._outside_epochs: dict[str, Any] = {}  # last values of metrics logged outside epochs (calibration)
        self.stdout = stdout if stdout is not None else sys.stdout
        self.print_stdout = print_stdout and enabled
        self.file: IO | None = None
        self._path = Path(json_path) if enabled and json_path is not None else None
        self._append = append
        self._pending: list[str] | None = [] if self._path is not None and deferred else None
        if self._path is not None and not deferred:
            self.begin()

    def begin(self) -> None:
        """Open the report file (creating its folder) and the trackers, and write what was logged before; a no-op
        once open."""
        if self.tracking is not None:
            self.tracking.open()
        if self._path is None or self.file is not None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # Line-buffered: every record reaches the file as it is written.
        self.file = open(self._path, "a" if self._append else "w", buffering=1, encoding="utf-8")
        for line in self._pending or ():
            self.file.write(line)
        self._pending = None

    def _write(self, record: dict) -> None:
        line = "DLLL " + json.dumps(record) + "\n"
        if self.file is not None:
            self.file.write(line)
        else:
            self._pending.append(line)

    def _now(self) -> tuple[_dt.datetime, str]:
        """DLLogger's clock: an aware UTC datetime (printed with +00:00) and the seconds since the logger began."""
        now = _dt.datetime.now(_dt.timezone.utc)
        return now, str(now.timestamp() - self.start)

    def _log_record(self, step, data: dict) -> None:
        now, elapsed = self._now()
        self._write({"timestamp": str(now.timestamp()), "datetime": str(now), "elapsedtime": elapsed, "type": "LOG",
                     "step": step if isinstance(step, str) else list(step), "data": _jsonable(data)})

    def log(self, step, data: Mapping[str, Any], verbose: bool = True) -> None:
        """Write the step's LOG records, one per verbosity level (and, when `verbose`, a stdout line)."""
        if not self.enabled:
            return
        data = dict(data)
        if self._path is not None:
            if isinstance(step, str):  # PARAMETER: one record, as given
                self._log_record(step, data)
            else:
                if step and isinstance(step[0], str):  # e.g. ["Calibration", N]: its values reach the run summary
                    self._outside_epochs.update(data)
                for level_data in self._by_level(data, summary=len(step) <= 1):
                    self._log_record(step, level_data)
        if self.tracking is not None:
            self.tracking.record(step, _jsonable(data), self.iterations_per_epoch)
        if self.print_stdout and verbose:
            values = " ".join(format_value(k, _jsonable(v)) for k, v in data.items())
            # On a terminal, clear a progress line first; the progress display redraws itself below.
            clear = "\r\x1b[K" if _isatty(self.stdout) else ""
            print(f"{clear}DLL {_dt.datetime.now():%Y-%m-%d %H:%M:%S} - "
                  f"{format_step(step, self.iterations_per_epoch)} {values}", file=self.stdout, flush=True)

    def _by_level(self, data: dict, summary: bool) -> list[dict]:
        """`data` split by verbosity level, DEFAULT first, each in registration order (unregistered metrics last,
        as VERBOSE); an epoch or run summary also lists the registered metrics it lacks, as null."""
        order = {name: index for index, name in enumerate(self.levels)}
        names = [*data, *(name for name in self.levels if name not in data)] if summary else list(data)
        names.sort(key=lambda name: order.get(name, len(order)))  # stable: unregistered ones keep their order
        records = []
        for level in (DEFAULT, VERBOSE):
            part = {name: data[name] if name in data else self._outside_epochs.get(name) for name in names
                    if self.levels.get(name, VERBOSE) == level}
            if part:
                records.append(part)
        return records

    def metadata(self, name: str, meta: Mapping[str, Any], level: int = VERBOSE) -> None:
        """Register metric `name` at a verbosity level and describe it (unit, format) with a METADATA record."""
        self.levels[name] = level
        if not self.enabled or self._path is None:
            return
        now, elapsed = self._now()
        self._write({"timestamp": str(now.timestamp()), "elapsedtime": elapsed, "datetime": str(now),
                     "type": "METADATA", "metric": name, "metadata": _jsonable(dict(meta))})

    def register_metrics(self, prefix: str, names: Mapping[str, int]) -> None:
        """Register `prefix.name` for each name -> verbosity level of `names` (the reference registers metrics up
        front), with the reference's metadata."""
        for name, level in names.items():
            self.metadata(f"{prefix}.{name}", METRIC_METADATA.get(name, {}), level)

    def print(self, text: str) -> None:
        """A plain stdout line from the main process."""
        if self.print_stdout:
            print(text, file=self.stdout, flush=True)

    def flush(self) -> None:
        """Hand what was logged to the file, the trackers and stdout."""
        if self.file is not None:
            self.file.flush()
        if self.tracking is not None:
            self.tracking.flush()
        if self.print_stdout:
            self.stdout.flush()

    def close(self, failed: bool = False) -> None:
        """Close the report and end the trackers' run (`failed`: the run ended with an error)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tracking is not None:
            self.tracking.close(failed)
            self.tracking = None
        self._path, self._pending = None, None  # closed: later records go nowhere (a deferred report unwritten)

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)


class Progress:
    """Where an epoch (or a validation pass) is: iteration i/N, images per second and the time left.

    On a terminal, a one-line bar redrawn a few times a second (a log line clears it first). Elsewhere (a log file,
    a pipe, a batch job's output), a plain line every `interval` seconds, so that a long epoch is never silent
    between its log lines: `train 0: 120/625 iterations, 830.2 img/s, eta 04:31`.
    """

    def __init__(self, name: str, total: int, *, enabled: bool = True, stream: IO | None = None,
                 interval: float = 30.0):
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = enabled and total > 0
        self.terminal = _isatty(self.stream)
        self.name = name
        self.total = total
        self.interval = interval
        self.start = time.perf_counter()
        self.images = 0
        self.last_draw = 0.0 if self.terminal else self.start

    def update(self, iteration: int, batch_size: int, extra: str = "") -> None:
        """Record one finished iteration (0-based) of `batch_size` images; redraw at most a few times a second (on a
        terminal) or every `interval` seconds (elsewhere)."""
        if not self.enabled:
            return
        self.images += batch_size
        now = time.perf_counter()
        elapsed = now - self.start
        done = iteration + 1
        if self.terminal and (now - self.last_draw < 0.2 and done < self.total):
            return
        if not self.terminal and (now - self.last_draw < self.interval or done >= self.total):
            return  # the epoch's own log line follows its last iteration
        self.last_draw = now
        rate = self.images / elapsed if elapsed > 0 else 0.0
        remaining = _duration(elapsed / done * (self.total - done))
        if self.terminal:
            width = 24
            filled = int(width * done / self.total)
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r{self.name} [{bar}] {done}/{self.total} {rate:8.1f} img/s eta {remaining} {extra}")
        else:
            self.stream.write(f"{self.name}: {done}/{self.total} iterations, {rate:.1f} img/s, eta {remaining}"
                              f"{' ' + extra if extra else ''}\n")
        self.stream.flush()

    def close(self) -> None:
        """End the display (a terminal's bar keeps its last state on its own line)."""
        if self.enabled and self.terminal:
            self.stream.write("\n")
            self.stream.flush()


def _isatty(stream) -> bool:
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
