#!/usr/bin/env python3
"""Turn inference benchmark reports (raport_<bs>.json, one per batch size) into the reference's markdown table.

    bash efficientnet/inference/AMP/DGXA100_efficientnet-b0_AMP.sh ./bench      # writes ./bench/raport_<bs>.json
    .venv/bin/python scripts/inference_table.py ./bench/raport_*.json

| Batch Size | Throughput Avg | Latency Avg | Latency 90% | Latency 95% | Latency 99% |
|:--:|:--:|:--:|:--:|:--:|:--:|
| 1 | 55 img/s | 17.95 ms | 19.80 ms | 20.61 ms | 22.00 ms |

Throughput is val.total_ips (all processes), latencies are per-batch compute latencies of the run summary.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from image_classification.cli import ArgumentParser, error_message, print_error  # noqa: E402  (run as a script)
from image_classification.logger import ReportError, by_step, read_report  # noqa: E402

PROG = "inference_table.py"

COLUMNS = ("Batch Size", "Throughput Avg", "Latency Avg", "Latency 90%", "Latency 95%", "Latency 99%")
LATENCIES = ("compute_latency", "compute_latency_at90", "compute_latency_at95", "compute_latency_at99")


def inference_row(path: Path, prefix: str = "val") -> dict[str, float]:
    """batch_size, total_ips and the latencies (seconds) of one report: its summary, else its last epoch."""
    records = read_report(path)
    batch_size = None
    for record in records:
        data = record.get("data") or {}
        if record.get("type") == "LOG" and record.get("step") == "PARAMETER" and "batch_size" in data:
            batch_size = data["batch_size"]
    # The run summary ([]) is written after the epoch records ([epoch]) and wins.
    summaries = [data for step, data in by_step(records).items() if len(step) <= 1]
    with_speed = [data for data in summaries if isinstance(data.get(f"{prefix}.total_ips"), (int, float))]
    metrics = with_speed[-1] if with_speed else {}
    if batch_size is None:
        match = re.search(r"raport_(\d+)", path.name)
        if match is None:
            raise ReportError(f"{path}: no batch_size parameter and no raport_<bs> in the name")
        batch_size = int(match.group(1))
    needed = [f"{prefix}.total_ips"] + [f"{prefix}.{name}" for name in LATENCIES]
    missing = [key for key in needed if not isinstance(metrics.get(key), (int, float))]
    if missing:
        raise ReportError(f"{path}: no {', '.join(missing)} (is it a --mode benchmark_inference report?)")
    return {"batch_size": int(batch_size), "total_ips": float(metrics[f"{prefix}.total_ips"]),
            **{name: float(metrics[f"{prefix}.{name}"]) for name in LATENCIES}}


def markdown_table(rows: list[dict[str, float]]) -> str:
    """The reference's table: throughput in img/s, latencies in ms, one row per batch size (ascending)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + ":--:|" * len(COLUMNS)]
    for row in sorted(rows, key=lambda r: r["batch_size"]):
        ips = row["total_ips"]
        cells = [str(row["batch_size"]), f"{ips:,.0f} img/s" if ips >= 100 else f"{ips:.1f} img/s"]
        cells += [f"{1000 * row[name]:.2f} ms" for name in LATENCIES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, metavar="RAPORT", help="raport_<bs>.json files")
    parser.add_argument("--prefix", default="val", choices=("val", "val_ema"),
                        help="which evaluation's metrics (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        rows = [inference_row(path, args.prefix) for path in args.reports]
    except (ValueError, OSError) as err:  # ReportError, or a file that is missing or not UTF-8 text
        return print_error(PROG, error_message(err))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
