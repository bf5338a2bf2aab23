"""The main job, end to end: scripts/demo.sh itself, shortened to one epoch."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_script_trains_and_classifies(tmp_path):
    data, workspace = tmp_path / "data", tmp_path / "ws"
    env = {**os.environ, "DATA": str(data), "WORKSPACE": str(workspace)}
    result = subprocess.run(["bash", "scripts/demo.sh", "--epochs", "1"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (data / "train").is_dir() and (workspace / "model_best.pth.tar").is_file()
    # classify.py's output: the first validation image (glob order), then its top-5 classes.
    first = sorted((data / "val").glob("*/*.jpg"))[0]
    lines = result.stdout.strip().splitlines()
    assert lines[-6] == str(first), lines[-6:]
    classes = (workspace / "classes.txt").read_text().split()
    for line in lines[-5:]:
        name, prob = line.rsplit(": ", 1)
        assert name in classes and re.fullmatch(r"\d+\.\d%", prob), line
