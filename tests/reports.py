"""Reading the run report (DLLogger JSON lines) in tests, checking DLLogger's record layout on the way."""
from __future__ import annotations

import json
from pathlib import Path


def read_report(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        assert line.startswith("DLLL "), line
        record = json.loads(line[len("DLLL "):])
        assert record["type"] in ("LOG", "METADATA")
        # DLLogger's keys, in its order.
        assert list(record) == (["timestamp", "datetime", "elapsedtime", "type", "step", "data"]
                                if record["type"] == "LOG" else
                                ["timestamp", "elapsedtime", "datetime", "type", "metric", "metadata"])
        records.append(record)
    return records


def by_step(records: list[dict]) -> dict[tuple, dict]:
    """LOG records merged per step (a step's metrics come as one record per verbosity level)."""
    steps: dict[tuple, dict] = {}
    for r in records:
        if r["type"] == "LOG" and isinstance(r["step"], list):
            steps.setdefault(tuple(r["step"]), {}).update(r["data"])
    return steps


def epoch_records(records: list[dict]) -> dict[int, dict]:
    return {step[0]: data for step, data in by_step(records).items() if len(step) == 1}
