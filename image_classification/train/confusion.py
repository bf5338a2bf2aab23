"""Per-class accuracy and the confusion matrix of a run's last validation (not in the reference): a record in the
report, a PNG in the workspace and a line saying where they went.

    confusion = ConfusionMatrix(num_classes, ctx)
    validate(model, loader, ..., confusion=confusion)    # each batch's top-1 predictions
    report_confusion(job, confusion, epoch)               # after --evaluate, and after a training run's last epoch

The report's record has the step ["Per class", epoch] and two VERBOSE values, `val.per_class_top1` (class name ->
top-1 %, null for a class without validation images) and `val.confusion_matrix` (counts; row: the true class,
column: the predicted one), so the reference's records and metrics stay as they are.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..context import ExecutionContext
from ..metrics import all_reduce_sum

if TYPE_CHECKING:
    from .job import Job

PNG_NAME = "confusion_matrix.png"
STEP = "Per class"
NAMED_TICKS = 40      # class names on the axes up to this many classes
ANNOTATED = 15        # counts written in the cells up to this many classes
LISTED = 10           # classes listed on the stdout line (all of them up to this many, else the lowest)


class ConfusionMatrix:
    """The (true class, top-1 class) pairs of a validation pass, kept on the device until `counts()`."""

    def __init__(self, num_classes: int, ctx: ExecutionContext) -> None:
        self.num_classes = num_classes
        self.ctx = ctx
        self._pairs: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """One batch: its logits (any monotone score, e.g. TTA's log-probabilities) and labels."""
        self._pairs.append(target * self.num_classes + logits.argmax(dim=1))

    def counts(self) -> torch.Tensor:
        """int64 [C, C] on the CPU, summed over every process (a collective): row i, column j counts the images of
        class i predicted as class j."""
        classes = self.num_classes
        pairs = torch.cat(self._pairs).cpu() if self._pairs else torch.zeros(0, dtype=torch.int64)
        counts = torch.bincount(pairs, minlength=classes * classes)
        if self.ctx.distributed:
            counts = all_reduce_sum(counts.to(self.ctx.device)).cpu()
        return counts.view(classes, classes)


def per_class_top1(counts: torch.Tensor) -> list[float | None]:
    """Top-1 accuracy in % of each true class (None where the class has no images)."""
    totals = counts.sum(dim=1).tolist()
    return [100.0 * hits / total if total else None for hits, total in zip(counts.diag().tolist(), totals)]


def report_confusion(job: Job, confusion: ConfusionMatrix, epoch: int) -> Path | None:
    """The record, the PNG (<workspace>/confusion_matrix.png) and the stdout line; every process calls it (the counts
    are summed over processes), the main process writes. Returns the PNG's path there."""
    counts = confusion.counts()
    if not job.ctx.is_main_process:
        return None
    classes = list(job.classes)
    # A model may score more classes than the data has (weights kept with their classes): those are named by index.
    names = classes + [str(i) for i in range(len(classes), confusion.num_classes)]
    accuracy = per_class_top1(counts)
    job.logger.log((STEP, epoch), {"val.per_class_top1": dict(zip(names, accuracy)),
                                   "val.confusion_matrix": counts.tolist()}, verbose=False)
    path = Path(job.config.checkpoint.workspace) / PNG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_confusion(counts, names, path, title=f"{job.config.model.arch}, validation after epoch {epoch}")
    scored = [(name, value) for name, value in zip(names, accuracy) if value is not None]
    shown = scored if len(scored) <= LISTED else sorted(scored, key=lambda item: item[1])[:LISTED]
    listing = ", ".join(f"{name} {value:.1f} %" for name, value in shown)
    job.logger.print(f"=> val top-1 per class{'' if len(shown) == len(scored) else f' (the {LISTED} lowest)'}: "
                     f"{listing}; confusion matrix: {path} (report: val.per_class_top1, val.confusion_matrix)")
    return path


def draw_confusion(counts: torch.Tensor, names: list[str], path: Path, *, title: str) -> None:
    """A PNG of the confusion matrix, each row as shares of its true class (so classes of any size compare)."""
    from matplotlib.figure import Figure  # no pyplot: nothing global, no display needed
    classes = len(names)
    shares = (counts.double() / counts.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    side = min(max(4.0, 0.3 * classes + 2.5), 24.0) if classes <= NAMED_TICKS else 10.0
    figure = Figure(figsize=(side + 1.5, side), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true class's images")
    axes.set(title=title, xlabel="predicted class", ylabel="true class")
    if classes <= NAMED_TICKS:
        axes.set_xticks(range(classes), names, rotation=90)
        axes.set_yticks(range(classes), names)
    if classes <= ANNOTATED:
        for (row, column), count in zip(((i, j) for i in range(classes) for j in range(classes)),
                                        counts.flatten().tolist()):
            if count:
                dark = shares[row, column] > 0.5
                axes.text(column, row, str(count), ha="center", va="center", color="white" if dark else "black",
                          fontsize=8)
    figure.savefig(path)
