#!/usr/bin/env python3
"""Measure the fine-tuning and accuracy toolkit on the generated datasets: the README's toolkit table.

    .venv/bin/python bench/toolkit_table.py                       # every row, into runs/toolkit (30 to 45 min)
    .venv/bin/python bench/toolkit_table.py --epochs 2 --teacher-epochs 3 --transfer-epochs 2 --average-last 2 \
        --bn-batches 2 --workspace /tmp/t                         # the plumbing only

Every training row is the main job (scripts/demo.sh: efficientnet-b0, 64 px, SGD, 20 epochs) with the flags of
the row added, so the rows differ from the main job only by what they name:

  base         the main job on the default dataset, keeping its last 5 per-epoch checkpoints
  tta / sizes  the base model validated with --tta flip, and at larger evaluation sizes (scripts/eval_sizes.py)
  average      the base run's last --average-last checkpoints averaged (scripts/average_checkpoints.py),
               with and without BN statistics recomputed over --bn-batches training batches
  swa          the main job with --swa-start (weights averaged over the last epochs, BN recomputed)
  teacher      the main job trained for --teacher-epochs (a stronger b0)
  kd           the main job distilled from the teacher (--teacher-arch/--teacher-weights)
  transfer     --transfer-epochs on a second generated dataset of ten other classes (--class-set transfer):
               from scratch, and fine-tuned from the base model (--pretrained-from-file --reset-classifier)
               as it is, with --layer-decay, with --freeze-until a stage, and with only the head trained

A row whose run already finished in the workspace is read back, not run again, so an interrupted
measurement continues where it stopped. Prints a markdown table and writes it with the commands to
WORKSPACE/toolkit.json. Not a timed test: minutes are reported for information.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from image_classification.logger import by_step, epoch_summaries, read_report  # noqa: E402

PY = sys.executable
BASE_EPOCHS = 20  # the main job's, in scripts/demo.sh
IMAGE_SIZE = 64   # its --image-size


@dataclass
class Row:
    group: str
    name: str
    top1: float              # best val top-1 of a training row, the top-1 of an evaluation row
    last: float | None       # a training row's val top-1 after its last epoch
    minutes: float
    commands: list[str] = field(default_factory=list)


def run(command: list[str], log: Path, env: dict | None = None) -> None:
    """Run a command with its output into `log`; a failure stops the measurement, naming the log."""
    print("$ " + shlex.join(command), flush=True)
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"toolkit_table.py: {command[1]} failed with status {done.returncode}; see {log}")


def finished(workspace: Path, epochs: int) -> bool:
    report = workspace / "raport.json"
    return report.exists() and len(epoch_summaries(read_report(report))) == epochs


def train(args: argparse.Namespace, group: str, name: str, label: str, data: Path, epochs: int, *flags: str,
          metric: str = "val.top1") -> Row:
    """One main-job run with `flags` in WORKSPACE/name; its row (the best and last `metric`), labelled `label`,
    skipping a run already finished."""
    workspace = args.workspace / name
    command = ["bash", "scripts/demo.sh", "--epochs", str(epochs), *flags, *args.main_flags]
    shown = f"DATA={data} WORKSPACE={workspace} " + shlex.join(command)
    if not finished(workspace, epochs):
        run(command, args.workspace / f"{name}.log", dict(os.environ, DATA=str(data), WORKSPACE=str(workspace)))
    records = read_report(workspace / "raport.json")
    minutes = float(records[-1]["elapsedtime"]) / 60  # of the training run itself, also when read back
    values = [e[metric] for e in epoch_summaries(records).values() if e.get(metric) is not None]
    if metric.startswith("swa."):  # validated once, at the end of the run
        values = [by_step(records)[()][metric]]
    return Row(group, label, max(values), values[-1], minutes, [shown])


def evaluate(args: argparse.Namespace, weights: Path, *flags: str,
             sizes: tuple[int, ...] = (IMAGE_SIZE,)) -> tuple[list[tuple[int, float, float]], str]:
    """scripts/eval_sizes.py on `weights` (10 classes of the default dataset): its (size, crop, top1) rows and
    the command."""
    command = [PY, "scripts/eval_sizes.py", str(args.data), "-a", "efficientnet-b0", "--num_classes", "10",
               "--pretrained-from-file", str(weights), "--sizes", *map(str, sizes), "-j", "1", *flags]
    print("$ " + shlex.join(command), flush=True)
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0].isdigit():
            rows.append((int(cells[0]), float(cells[1]), float(cells[2])))
    return rows, shlex.join(command)


def average(args: argparse.Namespace, name: str, *flags: str) -> tuple[Path, str]:
    """The base run's last checkpoints averaged (once) into a file named after the row; (file, command)."""
    stem = name.replace(",", "").replace(" ", "_")
    output = args.workspace / f"{stem}.pth.tar"
    command = [PY, "scripts/average_checkpoints.py", "--workspace", str(args.workspace / "base"),
               "--last", str(args.average_last), "--output", str(output), *flags]
    if not output.exists():
        run(command, args.workspace / f"{stem}.log")
    return output, shlex.join(command)


def measure(args: argparse.Namespace) -> list[Row]:
    data, transfer = args.data, args.transfer_data
    for folder, extra in ((data, []), (transfer, ["--class-set", "transfer"])):
        if not (folder / "train").is_dir():
            run([PY, "-m", "image_classification.data.generated", "--output", str(folder), *extra],
                args.workspace / f"generate_{folder.name}.log")
    rows = [train(args, "baseline", "base", f"the main job ({args.epochs} epochs)", data, args.epochs,
                  "--gather-checkpoints", str(args.average_last))]
    best = args.workspace / "base" / "model_best.pth.tar"
    last = args.workspace / "base" / "checkpoint.pth.tar"

    for label, weights in (("best", best), ("last", last)):
        (plain,), command = evaluate(args, weights)
        (flip,), flip_command = evaluate(args, weights, "--tta", "flip")
        rows += [Row("evaluation", f"{label} checkpoint", plain[2], None, 0, [command]),
                 Row("evaluation", f"{label} checkpoint, --tta flip", flip[2], None, 0, [flip_command])]
    sized, command = evaluate(args, best, sizes=tuple(args.eval_sizes))
    rows += [Row("evaluation", f"best checkpoint at {size} px (crop {crop:.3f})", top1, None, 0, [command])
             for size, crop, top1 in sized if size != IMAGE_SIZE]

    for name, flags in ((f"last {args.average_last} averaged", ()),
                        (f"last {args.average_last} averaged, BN recomputed",
                         ("--recompute-bn", str(args.bn_batches), "--data", str(data)))):
        weights, command = average(args, name, *flags)
        ((_, _, top1),), eval_command = evaluate(args, weights)
        rows.append(Row("averaging", name, top1, None, 0, [command, eval_command]))
    swa_start = max(args.epochs - 5, 1)
    rows.append(train(args, "averaging", "swa", f"SWA from epoch {swa_start}, BN recomputed", data, args.epochs,
                      "--swa-start", str(swa_start), "--swa-lr", "0.01",
                      "--swa-anneal-epochs", "2", metric="swa.top1"))

    rows.append(train(args, "distillation", "teacher", f"teacher: the main job for {args.teacher_epochs} epochs", data,
                      args.teacher_epochs))
    teacher = args.workspace / "teacher" / "model_best.pth.tar"
    rows.append(train(args, "distillation", "student_kd", "student: the main job + teacher, alpha 0.5, T 2", data,
                      args.epochs, "--teacher-arch", "efficientnet-b0",
                      "--teacher-weights", str(teacher), "--kd-alpha", "0.5", "--kd-temperature", "2"))

    pretrained = ("--pretrained-from-file", str(best), "--reset-classifier", "--lr", str(args.finetune_lr))
    for name, label, flags in (
            ("transfer_scratch", "from scratch (the job's LR)", ()),
            ("transfer_finetune", f"fine-tuned from the base model, LR {args.finetune_lr}", pretrained),
            ("transfer_layer_decay", "fine-tuned, --layer-decay 0.7", (*pretrained, "--layer-decay", "0.7")),
            ("transfer_freeze_stage3", "fine-tuned, --freeze-until 3", (*pretrained, "--freeze-until", "3")),
            ("transfer_head_only", "head only, --freeze-until features",
             (*pretrained, "--freeze-until", "features"))):
        rows.append(train(args, "transfer", name, label, transfer, args.transfer_epochs, *flags))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = ["| group | row | top-1 % (best epoch) | top-1 % (last epoch) | minutes |", "|---|---|---:|---:|---:|"]
    for row in rows:
        last = "" if row.last is None else f"{row.last:.1f}"
        minutes = f"{row.minutes:.1f}" if row.minutes else ""
        lines.append(f"| {row.group} | {row.name} | {row.top1:.1f} | {last} | {minutes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "generated",
                   help="default dataset (generated if missing)")
    p.add_argument("--transfer-data", type=Path, default=ROOT / "data" / "transfer",
                   help="the second dataset, of other classes (generated with --class-set transfer if missing)")
    p.add_argument("--workspace", type=Path, default=ROOT / "runs" / "toolkit", help="folder of every run")
    p.add_argument("--epochs", type=int, default=BASE_EPOCHS, help="epochs of the base, SWA and distilled runs")
    p.add_argument("--teacher-epochs", type=int, default=2 * BASE_EPOCHS, help="epochs of the teacher")
    p.add_argument("--transfer-epochs", type=int, default=BASE_EPOCHS // 2, help="epochs of each transfer run")
    p.add_argument("--finetune-lr", type=float, default=0.02, help="LR of the fine-tuning runs (scratch: the job's)")
    p.add_argument("--average-last", type=int, default=5, help="checkpoints the base run keeps and averages")
    p.add_argument("--bn-batches", type=int, default=30, help="training batches of the BN recomputation")
    p.add_argument("--eval-sizes", type=int, nargs="+", default=[IMAGE_SIZE, 80, 96],
                   help="evaluation sizes of the base model")
    p.add_argument("main_flags", nargs=argparse.REMAINDER,
                   help="after --: more main.py flags for every training run (e.g. -- -b 8 on a tiny dataset)")
    args = p.parse_args(argv)
    args.main_flags = args.main_flags[1:] if args.main_flags[:1] == ["--"] else args.main_flags
    args.workspace = args.workspace.resolve()
    args.workspace.mkdir(parents=True, exist_ok=True)
    rows = measure(args)
    table = format_table(rows)
    print("\n" + table)
    (args.workspace / "toolkit.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "table": table},
                                                            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
