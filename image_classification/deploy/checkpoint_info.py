"""What a weights file says about its model, for classify.py and model2onnx.py to use unless the command line says
otherwise: arch, class count, the image size, crop and interpolation it was validated with, and its class names.

A training checkpoint of this suite records its arch ("arch"), the run's flags ("args": --image-size,
--eval-image-size, --eval-crop-pct, --interpolation) and the data's class names ("classes"); any weights give their
class count (the classifier's rows). Training also writes classes.txt into its workspace, beside its checkpoints,
which names the classes of weights extracted there by checkpoint2model.py too.

    info = read_checkpoint_info("ws/model_best.pth.tar")
    info.arch, info.num_classes, info.image_size, info.crop_pct, info.interpolation, info.classes
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import CLASS_NAMES_FILE, Checkpoint, load_file
from ..cli import UserError
from ..models.weights import classifier_classes


@dataclass(frozen=True)
class CheckpointInfo:
    """A weights file's own account of its model; None where it does not say (everything, for CheckpointInfo())."""

    path: Path | None = None
    arch: str | None = None
    num_classes: int | None = None
    image_size: int | None = None         # the run's validation size: --eval-image-size, else --image-size
    crop_pct: float | None = None         # the run's --eval-crop-pct (None: the reference's resize to size + 32)
    interpolation: str | None = None
    classes: list[str] | None = None      # the checkpoint's "classes"
    names_file: Path | None = None        # classes.txt beside the file

    def check_class_count(self, num_classes: int) -> None:
        """A --num_classes that the weights do not have: one line whose cure is --num_classes (for a trained model,
        --reset-classifier would only replace its classifier by a random one)."""
        if self.num_classes is not None and num_classes != self.num_classes:
            raise UserError(f"{self.path}: the weights score {self.num_classes} classes, --num_classes is "
                            f"{num_classes}; give --num_classes {self.num_classes} or leave it out (the weights' "
                            "count is the default)")


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """The CheckpointInfo of a state dict, training checkpoint or .safetensors file (WeightsError when unreadable)."""
    path = Path(path)
    saved = load_file(path)
    checkpoint = Checkpoint.from_dict(saved)
    args = checkpoint.args if isinstance(checkpoint.args, Mapping) else {}
    classes = checkpoint.classes
    if not (isinstance(classes, (list, tuple)) and all(isinstance(name, str) for name in classes)):
        classes = None
    beside = path.parent / CLASS_NAMES_FILE
    return CheckpointInfo(
        path=path,
        arch=checkpoint.arch if isinstance(checkpoint.arch, str) else None,
        num_classes=classifier_classes(Checkpoint.weights_of(saved, source=str(path))),
        image_size=_number(args.get("eval_image_size"), int) or _number(args.get("image_size"), int),
        crop_pct=_number(args.get("eval_crop_pct"), float),
        interpolation=args.get("interpolation") if isinstance(args.get("interpolation"), str) else None,
        classes=list(classes) if classes is not None else None,
        names_file=beside if beside.is_file() else None)


def _number(value, kind: type):
    return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def weights_flag(rest: list[str]) -> str | None:
    """The value of --pretrained-from-file among a command line's model flags (its last, as argparse takes it)."""
    value = None
    for i, token in enumerate(rest):
        if token == "--pretrained-from-file" and i + 1 < len(rest):
            value = rest[i + 1]
        elif token.startswith("--pretrained-from-file="):
            value = token.split("=", 1)[1]
    return value
