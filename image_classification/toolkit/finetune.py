"""Fine-tuning: layer-wise LR decay, frozen early layers, a classifier LR multiplier and a zero-initialised head.

The network's depth, as these flags count it (EfficientNet's own module names):

    depth 0          stem
    depth 1 … N      the blocks in order, layers.0.block0 … layers.<S-1>.block<k> (N blocks in S stages)
    depth N+1        head: features (the last 1x1 conv and its BN) and classifier

--layer-decay R scales the LR of depth d by R**(N+1-d): the head trains at the base LR, the stem at R**(N+1)
of it. --head-lr-scale S multiplies the classifier's (classifier.fc's) LR on top. The factors live in the
optimizer's parameter groups (`lr_scale`, which the LR schedule multiplies in at every epoch, and which the
optimizer's state_dict saves), split within the reference's BN / non-BN weight-decay groups.

--freeze-until NAME freezes the stem and everything up to and including NAME (`stem`, a stage `2` or
`layers.2`, a block `layers.2.block1`, or `features`: all but the classifier): its parameters keep
requires_grad False and stay out of the optimizer, and the frozen modules run in eval mode during training,
so their BatchNorm normalises with its running statistics and does not update them (and stochastic depth,
an inference no-op, stays off there).
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Iterable

import torch
from torch import nn

from ..cli import Number, UserError
from ..config import Config
from ..features import TrainingFeature

HEAD_INITS = ("default", "zero")
# Names a wrapped training model adds in front of the model's own: DistributedDataParallel's `module.` and
# torch.compile's `_orig_mod.` (a scripted model keeps the names).
_WRAPPER_PREFIX = re.compile(r"^(module\.)?(_orig_mod\.)?")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The fine-tuning flags (main.py's and quant_main.py's)."""
    g = parser.add_argument_group(
        "fine-tuning (not in the reference)",
        "Depth counts the stem as 0, the blocks layers.0.block0 ... in order as 1 ... N, and the head\n"
        "(features + classifier) as N+1.")
    g.add_argument("--layer-decay", type=Number(float, low=0, high=1, low_open=True), default=None, metavar="R",
                   help="layer-wise LR decay: depth d trains at LR x R**(N+1-d) (default: off)")
    g.add_argument("--freeze-until", default=None, metavar="NAME",
                   help="freeze the stem and every block up to and including NAME: stem, a stage (2 or layers.2), "
                        "a block (layers.2.block1) or features (all but the classifier); frozen BatchNorm keeps its "
                        "running statistics (default: nothing frozen)")
    g.add_argument("--head-lr-scale", type=Number(float, low=0, low_open=True), default=None, metavar="S",
                   help="multiply the classifier's (classifier.fc) LR by S (default: 1)")
    g.add_argument("--head-init", default="default", choices=HEAD_INITS,
                   help="initialisation of the classifier when it is not loaded (no weights, or "
                        "--reset-classifier): zero or the model's own (default: %(default)s)")
    return parser


# --- the network's depth ---------------------------------------------------------------------------------------

def depth_units(model: nn.Module, arch: str = "the model", flag: str = "--layer-decay"
                ) -> list[tuple[str, list[str]]]:
    """(name, module names) per depth, stem first and head last; a UserError naming `flag` for a model without
    EfficientNet's stem / layers / features / classifier layout."""
    if not all(isinstance(getattr(model, name, None), nn.Module) for name in ("stem", "layers", "features",
                                                                               "classifier")):
        raise UserError(f"{flag} needs EfficientNet's stem, layers, features and classifier; {arch} has other "
                        "modules")
    units = [("stem", ["stem"])]
    for stage_name, stage in model.layers.named_children():
        units += [(f"layers.{stage_name}.{block}", [f"layers.{stage_name}.{block}"])
                  for block, _ in stage.named_children()]
    units.append(("head", ["features", "classifier"]))
    return units


def _unit_of(name: str, units: list[tuple[str, list[str]]]) -> int:
    """The depth of parameter or module `name`."""
    for depth, (_, modules) in enumerate(units):
        if any(name == m or name.startswith(m + ".") for m in modules):
            return depth
    raise UserError(f"{name} lies outside the stem, blocks and head")


def lr_scales(model: nn.Module, *, layer_decay: float | None = None, head_lr_scale: float | None = None,
              arch: str = "the model") -> dict[str, float] | None:
    """Parameter name -> LR factor for these flags, or None when both are off (the reference's groups)."""
    if layer_decay is None and head_lr_scale is None:
        return None
    units = depth_units(model, arch, "--layer-decay" if layer_decay is not None else "--head-lr-scale")
    top = len(units) - 1
    scales = {}
    for name, _ in model.named_parameters():
        scale = layer_decay ** (top - _unit_of(name, units)) if layer_decay is not None else 1.0
        if head_lr_scale is not None and name.startswith("classifier.fc."):
            scale *= head_lr_scale
        scales[name] = scale
    return scales


# --- freezing ---------------------------------------------------------------------------------------------------

def freeze_points(model: nn.Module) -> dict[str, list[str]]:
    """--freeze-until's accepted names -> the modules frozen by each (their names in the model)."""
    units = depth_units(model)
    blocks = [modules[0] for _, modules in units[1:-1]]
    points = {"stem": ["stem"]}
    for index, block in enumerate(blocks):
        points[block] = ["stem", *blocks[:index + 1]]
    for stage_name, _ in model.layers.named_children():
        last = max(i for i, block in enumerate(blocks) if block.startswith(f"layers.{stage_name}."))
        points[stage_name] = points[f"layers.{stage_name}"] = ["stem", *blocks[:last + 1]]
    points["features"] = ["stem", *blocks, "features"]
    return points


def freeze(model: nn.Module, until: str, arch: str = "the model") -> list[str]:
    """Freeze the stem and everything up to and including `until` (requires_grad False); a UserError naming the
    valid points for an unknown one."""
    depth_units(model, arch, "--freeze-until")
    points = freeze_points(model)
    if until not in points:
        stages = [s for s, _ in model.layers.named_children()]
        blocks = [p for p in points if p.count(".") == 2]
        raise UserError(f"--freeze-until {until!r}: not a part of {arch}; valid: stem, stages {stages[0]}…"
                        f"{stages[-1]} (or layers.{stages[0]}…layers.{stages[-1]}), blocks {blocks[0]}…{blocks[-1]} "
                        "(layers.<stage>.block<k>, in order), features")
    modules = points[until]
    for name, parameter in model.named_parameters():
        if any(name.startswith(m + ".") for m in modules):
            parameter.requires_grad_(False)
    return modules


# --- the head ---------------------------------------------------------------------------------------------------

def init_head(model: nn.Module, head_init: str, *, loaded_classifier: bool, arch: str = "the model") -> None:
    """--head-init zero: zero classifier.fc's weight and bias (refused where that would discard a loaded
    classifier, or where the classifier's quantizer calibrates its range from the weights)."""
    if head_init == "default":
        return
    if head_init != "zero":
        raise UserError(f"--head-init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")
    fc = getattr(getattr(model, "classifier", None), "fc", None)
    if not isinstance(fc, nn.Linear):
        raise UserError(f"--head-init zero needs a classifier.fc layer; {arch} has none")
    if loaded_classifier:
        raise UserError("--head-init zero would discard the classifier of the pretrained weights; add "
                        "--reset-classifier to start a new one")
    if hasattr(fc, "weight_quantizer"):
        raise UserError(f"--head-init zero: {arch}'s classifier quantizes its weights in a range calibrated from "
                        "them, which zeros leave empty; use --head-init default")
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.zero_()


# --- main.py's flags --------------------------------------------------------------------------------------------

def prepare(model: nn.Module, config: Config) -> None:
    """Apply --head-init and --freeze-until to a freshly built model (after checking the flags)."""
    check_flags(config)
    params, finetune = config.model.params, config.finetune
    loaded = bool(params.get("pretrained") or params.get("pretrained_from_file"))
    init_head(model, finetune.head_init, loaded_classifier=loaded and not params.get("reset_classifier"),
              arch=config.model.arch)
    if finetune.freeze_until is not None:
        freeze(model, finetune.freeze_until, config.model.arch)


def check_flags(config: Config) -> None:
    """Fine-tuning flags change training only: refused with --evaluate."""
    finetune = config.finetune
    given = [flag for flag, value in (("--layer-decay", finetune.layer_decay),
                                      ("--freeze-until", finetune.freeze_until),
                                      ("--head-lr-scale", finetune.head_lr_scale))
             if value is not None]
    if finetune.head_init != "default":
        given.append("--head-init")
    if config.runtime.evaluate and given:
        raise UserError(f"{', '.join(given)} change(s) training; not with --evaluate")


class Freeze(TrainingFeature):
    """The training feature of --freeze-until: the frozen modules stay in eval mode while the rest trains, so their
    BatchNorm keeps its running statistics (their parameters were frozen when the model was built)."""

    def __init__(self, modules: list[str]) -> None:
        self.modules = set(modules)

    @classmethod
    def from_config(cls, config: Config, job) -> "Freeze | None":
        if config.finetune.freeze_until is None or job.trainer.optimizer is None:
            return None
        return cls(freeze_points(job.trainer.model)[config.finetune.freeze_until])

    def start_epoch(self, job, epoch: int) -> None:
        keep_eval(job.trainer.train_model, self.modules)


def keep_eval(train_model: nn.Module, modules: Iterable[str]) -> None:
    """Eval mode for the frozen `modules` (freeze's names) of `train_model`: the model itself, or it compiled,
    scripted or DDP-wrapped."""
    frozen = set(modules)
    for name, module in train_model.named_modules():
        if _WRAPPER_PREFIX.sub("", name) in frozen:
            module.eval()
