"""The DLLogger report: writing it, reading it back, plotting it (logger.py, scripts/plot_report.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import prefork
from reports import read_report

from image_classification.logger import Logger

ROOT = Path(__file__).resolve().parents[1]


def test_logger_writes_dllogger_lines(tmp_path):
    path = tmp_path / "r.json"
    logger = Logger(path, print_stdout=False)
    logger.log("PARAMETER", {"lr": 0.1})
    logger.metadata("train.loss", {"unit": None})
    logger.log((0, 1), {"train.loss": torch.tensor(2.5)})
    logger.log((0, 1, 2), {"val.top1": float("nan")})
    # Flushed as it goes: readable before close.
    records = read_report(path)
    assert [r.get("step", r["type"]) for r in records] == ["PARAMETER", "METADATA", [0, 1], [0, 1, 2]]
    assert records[2]["data"] == {"train.loss": 2.5}
    assert records[1]["metric"] == "train.loss" and records[1]["metadata"] == {"unit": None}
    logger.close()
    silent = Logger(tmp_path / "other.json", enabled=False)
    silent.log((), {"x": 1})
    assert not (tmp_path / "other.json").exists()


def test_report_reader_merges_a_steps_records_and_names_a_bad_line(tmp_path):
    from image_classification.logger import ReportError, by_step, epoch_summaries
    from image_classification.logger import read_report as read_records
    path = tmp_path / "r.json"
    logger = Logger(path, print_stdout=False)
    logger.register_metrics("val", {"top1": 0, "loss": 1})
    logger.log((1,), {"val.top1": 50.0, "val.loss": 1.5})
    logger.log((0,), {"val.top1": 40.0})  # the summary lists val.loss as null
    logger.log((0,), {"val.loss": 2.0})   # logged again (a resumed run): its values win, its nulls do not
    logger.log((), {"val.top1": 50.0})
    logger.close()
    records = read_records(path)
    assert records == read_report(path)  # the tests' strict reader sees the same records
    assert epoch_summaries(records) == {0: {"val.top1": 40.0, "val.loss": 2.0}, 1: {"val.top1": 50.0, "val.loss": 1.5}}
    assert list(epoch_summaries(records)) == [0, 1] and by_step(records)[()]["val.top1"] == 50.0
    path.write_text(path.read_text() + "DLLL {not json\n")
    with pytest.raises(ReportError, match=f"{path}:{len(records) + 1}: not a JSON record"):
        read_records(path)


@pytest.mark.slow
def test_plot_report_writes_png(tmp_path):
    report = tmp_path / "raport.json"
    logger = Logger(report, print_stdout=False)
    for epoch in range(3):
        logger.log((epoch,), {"train.loss": 2.0 - epoch * 0.5, "val.loss": 2.1 - epoch * 0.4,
                              "val.top1": 30.0 + 10 * epoch, "val.top5": 80.0 + epoch})
    logger.close()
    result = prefork.run([sys.executable, "scripts/plot_report.py", str(report)], cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    png = tmp_path / "raport.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
