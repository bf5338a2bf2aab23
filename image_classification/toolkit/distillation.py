"""Knowledge distillation from a trained teacher (--teacher-arch, --teacher-weights, --kd-alpha, --kd-temperature).

The loss of a training step, Hinton et al.'s form with student logits s and teacher logits t:

    loss = (1 - A) * task_loss + A * T^2 * KL(softmax(t / T) || softmax(s / T))

task_loss is the run's own loss (label smoothing, mixup/CutMix soft targets); the KL term is averaged over the
batch and computed in fp32; T^2 keeps its gradients on the scale of the task loss's as T grows. The report
logs the total as train.loss and the distillation term T^2 * KL (before the A weighting) as train.kd_loss, both
divided by the gradient accumulation as the reference's train.loss is.

The teacher is any arch of the registry, or a timm model named `timm:<name>` (with timm installed), built for
the run's class count and loaded from --teacher-weights (a state dict, safetensors file or training
checkpoint). It runs in eval mode without gradients, in the run's precision (under the same autocast) and
memory format, on the very batch the student sees, after mixup/CutMix; it is not DDP-wrapped (it has no
gradients to synchronise), not in the optimizer and not in checkpoints. Checkpoints record which teacher it
was (arch, weights path and the file's sha256), and --resume refuses a run with another teacher.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError
from ..cli import Number, UserError
from ..config import Config
from ..features import TrainingFeature
from ..logger import DEFAULT
from ..models.weights import WeightsError, extract_state_dict, load_file, load_weights

TIMM_PREFIX = "timm:"
DEFAULT_ALPHA = 0.5
DEFAULT_TEMPERATURE = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The distillation flags (main.py's and quant_main.py's)."""
    g = parser.add_argument_group(
        "knowledge distillation (not in the reference)",
        "loss = (1-A)·task_loss + A·T²·KL(softmax(teacher/T) ‖ softmax(student/T)); the teacher runs in eval\n"
        "mode on the same (mixed) batch, under the run's precision; train.kd_loss is the T²·KL term.")
    g.add_argument("--teacher-arch", default=None, metavar="ARCH",
                   help="teacher architecture: an --arch of this suite, or timm:<model> with timm installed "
                        "(default: no distillation)")
    g.add_argument("--teacher-weights", default=None, metavar="FILE",
                   help="the teacher's trained weights (state dict, .safetensors or training checkpoint) for the "
                        "run's --num_classes; required with --teacher-arch")
    g.add_argument("--kd-alpha", type=Number(float, low=0, high=1), default=None, metavar="A",
                   help=f"weight of the distillation term (default: {DEFAULT_ALPHA} with a teacher)")
    g.add_argument("--kd-temperature", type=Number(float, low=0, low_open=True), default=None, metavar="T",
                   help=f"softmax temperature of the distillation term (default: {DEFAULT_TEMPERATURE} with a "
                        "teacher)")
    return parser


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch, in fp32."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * (t * t)


class DistillationLoss:
    """A training loss (train.losses.TrainingLoss's interface) that mixes the teacher's soft targets into the task
    loss: (1-A)·criterion + A·T²·KL, with the T²·KL term reported as kd_loss."""

    terms = ("kd_loss",)

    def __init__(self, criterion: nn.Module, teacher: nn.Module, *, alpha: float, temperature: float):
        self.criterion = criterion
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha = alpha
        self.temperature = temperature
        self._last_kd: torch.Tensor | None = None

    def __call__(self, student_logits: torch.Tensor, target: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The loss of the batch `images` the student produced `student_logits` from; call it under the run's
        autocast."""
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        kd = kd_loss(student_logits, teacher_logits, self.temperature)
        self._last_kd = kd.detach()
        return (1.0 - self.alpha) * self.criterion(student_logits, target) + self.alpha * kd

    def last_terms(self) -> list[torch.Tensor]:
        return [self._last_kd]


# --- the teacher ------------------------------------------------------------------------------------------------

def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def build_teacher(arch: str, weights: str, num_classes: int) -> nn.Module:
    """The teacher `arch` (registry name or timm:<name>) for `num_classes` classes, loaded from `weights`."""
    if arch.startswith(TIMM_PREFIX):
        return _timm_teacher(arch[len(TIMM_PREFIX):], weights, num_classes)
    from ..models import available_models
    models = available_models()
    if arch not in models:
        raise UserError(f"unknown --teacher-arch {arch!r}; available: {', '.join(sorted(models))}, or "
                        f"{TIMM_PREFIX}<model> for a timm model")
    teacher = models[arch](num_classes=num_classes)
    load_weights(teacher, weights, arch=arch, arch_flag="--teacher-arch")
    return teacher


def _timm_teacher(name: str, weights: str, num_classes: int) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UserError(f"--teacher-arch {TIMM_PREFIX}{name}: timm is not installed (pip install timm)") from None
    if not timm.is_model(name):
        raise UserError(f"--teacher-arch {TIMM_PREFIX}{name}: not a timm model (timm.list_models() names them)")
    teacher = timm.create_model(name, pretrained=False, num_classes=num_classes)
    state_dict = {key.removeprefix("module."): value
                  for key, value in extract_state_dict(load_file(weights), source=weights).items()}
    expected = teacher.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise WeightsError(f"{weights}: does not fit timm's {name} for {num_classes} classes: "
                           f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected "
                           f"{unexpected[:3]}, {len(wrong)} of another shape {wrong[:3]}")
    teacher.load_state_dict(state_dict)
    return teacher


# --- the training feature ---------------------------------------------------------------------------------------

def check_flags(config: Config) -> None:
    """Distillation flags that would do nothing (or cannot work) are refused."""
    kd = config.distillation
    if kd.teacher_arch is None:
        given = [flag for flag, value in (("--teacher-weights", kd.teacher_weights), ("--kd-alpha", kd.kd_alpha),
                                          ("--kd-temperature", kd.kd_temperature)) if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} need(s) --teacher-arch")
        return
    if kd.teacher_weights is None:
        raise UserError("--teacher-arch needs --teacher-weights FILE (the teacher's trained weights)")
    if config.runtime.evaluate:
        raise UserError("--teacher-arch distils during training; not with --evaluate")
    if not Path(kd.teacher_weights).is_file():
        raise UserError(f"--teacher-weights {kd.teacher_weights}: no such file")


def teacher_identity(config: Config) -> dict | None:
    """What a checkpoint records of the run's teacher (None without one)."""
    kd = config.distillation
    if kd.teacher_arch is None:
        return None
    return {"arch": kd.teacher_arch, "weights": str(kd.teacher_weights), "sha256": file_sha256(kd.teacher_weights)}


class Distillation(TrainingFeature):
    """The training feature of --teacher-arch: the job's loss becomes a DistillationLoss with the teacher on the
    run's device, train.kd_loss is reported, and checkpoints record which teacher it was."""

    checkpoint_key = "teacher"

    def __init__(self, identity: dict) -> None:
        self.identity = identity

    @classmethod
    def metrics(cls, config: Config) -> dict[str, dict[str, int]]:
        return {"train": {"kd_loss": DEFAULT}} if config.distillation.teacher_arch else {}

    @classmethod
    def from_config(cls, config: Config, job) -> "Distillation | None":
        check_flags(config)
        kd = config.distillation
        if kd.teacher_arch is None:
            return None
        try:
            teacher = build_teacher(kd.teacher_arch, kd.teacher_weights, config.model.num_classes)
        except WeightsError as err:  # the file is named already; say which flag it came from
            raise WeightsError(f"--teacher-weights {err}") from None
        teacher = teacher.to(job.ctx.device, memory_format=job.ctx.memory_format)
        job.trainer.loss = DistillationLoss(job.trainer.loss.criterion, teacher,
                                            alpha=DEFAULT_ALPHA if kd.kd_alpha is None else kd.kd_alpha,
                                            temperature=DEFAULT_TEMPERATURE if kd.kd_temperature is None
                                            else kd.kd_temperature)
        return cls(teacher_identity(config))

    def state_dict(self) -> dict:
        return self.identity

    def load_state_dict(self, state: dict | None, checkpoint, source: str) -> None:
        """Refuse a checkpoint trained with another teacher, or without one: the run would not continue the same
        training."""
        _check_same_teacher(state, self.identity, source)

    @classmethod
    def check_absent(cls, state: dict, source: str) -> None:
        _check_same_teacher(state, None, source)


def _describe(identity: dict | None) -> str:
    if identity is None:
        return "without a teacher"
    return f"with teacher {identity['arch']} {identity['weights']} (sha256 {identity['sha256'][:16]}…)"


def _check_same_teacher(before: dict | None, now: dict | None, path: str) -> None:
    same = (before is None and now is None) or (before is not None and now is not None
                                                and before["arch"] == now["arch"]
                                                and before["sha256"] == now["sha256"])
    if not same:
        raise CheckpointError(f"--resume {path}: the checkpoint was trained {_describe(before)}, this run is "
                              f"{_describe(now)}; resume with the checkpoint's --teacher-arch and --teacher-weights")
