"""Reading the run report (DLLogger JSON lines) in tests, checking DLLogger's record layout on the way."""
from __future__ import annotations

import json
from pathlib import Path

from image_classification.logger import by_step, epoch_summaries  # noqa: F401  (the tests import them from here)


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
