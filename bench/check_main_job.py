#!/usr/bin/env python3
"""Run the README's main job (efficientnet-b0 on the generated default dataset, CPU) and check its top-1.

    .venv/bin/python bench/check_main_job.py                     # generate data/generated if needed, train, check
    .venv/bin/python bench/check_main_job.py --data DIR --workspace runs/check

Prints the measured best val top-1 and wall time beside the stated ones; exits 1 when the top-1 is below
the stated value minus --tolerance. Not a timed test: the time is reported, not checked.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The main job's flags (scripts/demo.sh runs the same) and what it reached when measured on 2 CPU cores.
MAIN_JOB_FLAGS = ["--arch", "efficientnet-b0", "--data-backend", "pytorch", "--image-size", "64",
                  "--epochs", "12", "--batch-size", "32", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9",
                  "--nesterov", "--wd", "5e-5", "--lr-schedule", "cosine", "--warmup", "1",
                  "--label-smoothing", "0.1", "--num_classes", "10", "--bn_momentum", "0.1", "--workers", "2",
                  "--print-freq", "20", "--seed", "0"]
# Measured on a stand-in 10-class shapes/textures set (1000 train / 300 val images, 80 px JPEGs): 77.0 % best
# val top-1 in 2.5 minutes on 2 shared CPU cores. To be re-measured on image_classification.data.generated's
# default dataset once that module lands. BN momentum 0.1 (not the reference's 0.01): with ~30 steps per epoch
# the running statistics must follow the weights within an epoch, or validation sits at chance.
STATED_TOP1 = 75.0          # percent, best val top-1 over the run
STATED_MINUTES = 3.0        # on 2 CPU cores, for information only


def best_top1(report: Path) -> tuple[float, int]:
    """(best val.top1, epochs logged) of a report."""
    best, epochs = float("-inf"), 0
    for line in report.read_text().splitlines():
        record = json.loads(line[5:])
        if record["type"] == "LOG" and isinstance(record["step"], list) and len(record["step"]) == 1:
            epochs += 1
            best = max(best, record["data"].get("val.top1", float("-inf")))
    return best, epochs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "generated", help="dataset (generated if missing)")
    p.add_argument("--workspace", type=Path, default=None, help="run folder (default: a temporary one)")
    p.add_argument("--tolerance", type=float, default=5.0, help="accepted shortfall in top-1 points")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more main.py flags (override the job's)")
    args = p.parse_args(argv)
    python = sys.executable
    if not (args.data / "train").is_dir():
        subprocess.run([python, "-m", "image_classification.data.generated", "--output", str(args.data)],
                       cwd=ROOT, check=True)
    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="main_job_"))
    command = [python, "main.py", str(args.data), *MAIN_JOB_FLAGS, "--workspace", str(workspace),
               "--raport-file", "raport.json", *args.extra]
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    minutes = (time.perf_counter() - start) / 60
    top1, epochs = best_top1(workspace / "raport.json")
    print(f"\n{'':14}{'measured':>10}{'stated':>10}")
    print(f"{'val top-1 %':14}{top1:10.2f}{STATED_TOP1:10.2f}")
    print(f"{'minutes':14}{minutes:10.1f}{STATED_MINUTES:10.1f}")
    print(f"{'epochs':14}{epochs:10d}")
    ok = top1 >= STATED_TOP1 - args.tolerance
    print("OK" if ok else f"FAILED: top-1 {top1:.2f} < {STATED_TOP1 - args.tolerance:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
