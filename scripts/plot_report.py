#!/usr/bin/env python3
"""Plot loss, top-1, top-5 and the learning rate per epoch from a main.py report (DLLogger JSON lines) to a PNG.

    .venv/bin/python scripts/plot_report.py runs/demo/raport.json                 # -> runs/demo/raport.png
    .venv/bin/python scripts/plot_report.py raport.json --output curves.png
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from image_classification.cli import ArgumentParser  # noqa: E402  (the project root, when run as a script)
from image_classification.logger import ReportError, epoch_summaries, read_report  # noqa: E402

PROG = "plot_report.py"
# (metric, the report prefixes drawn for it), one panel each.
PANELS = [("loss", ("train", "val", "val_ema")), ("top1", ("val", "val_ema")), ("top5", ("val", "val_ema")),
          ("lr", ("train",))]


def read_epochs(path: Path) -> dict[int, dict[str, float]]:
    """Epoch records ({epoch: metrics}) of a report; later records of an epoch (a resumed run) win."""
    try:
        return epoch_summaries(read_report(path))
    except ReportError as err:
        raise SystemExit(f"{PROG}: error: {err}") from None


def plot(epochs: dict[int, dict[str, float]], output: Path, title: str = "") -> None:
    """Four panels: loss (train, val, val_ema), top-1 and top-5 (val, val_ema), learning rate (train)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = sorted(epochs)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(20, 4.2))
    for ax, (metric, prefixes) in zip(axes, PANELS):
        for prefix in prefixes:
            key = f"{prefix}.{metric}"
            points = [(e, epochs[e][key]) for e in xs if isinstance(epochs[e].get(key), (int, float))]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=prefix)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric + (" (%)" if metric.startswith("top") else ""))
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    """plot_report.py: draw the curves, say where the PNG went; a bad report is one error line."""
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path, help="the --raport-file of a run")
    p.add_argument("--output", "-o", type=Path, default=None, help="PNG to write (default: the report's name, .png)")
    args = p.parse_args(argv)
    if not args.report.is_file():
        raise SystemExit(f"{PROG}: error: {args.report}: no such file")
    epochs = read_epochs(args.report)
    if not epochs:
        raise SystemExit(f"{PROG}: error: {args.report}: no epoch records (was the run trained?)")
    output = args.output or args.report.with_suffix(".png")
    plot(epochs, output, title=str(args.report))
    print(f"{PROG}: wrote the loss, top-1, top-5 and learning-rate curves of {len(epochs)} epochs to {output}")
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
