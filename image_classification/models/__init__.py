"""Model registry: `available_models()` maps each arch name to an `EntryPoint`.

    >>> from image_classification.models import available_models, efficientnet_b0
    >>> model = efficientnet_b0(pretrained=False, num_classes=10)
"""
from __future__ import annotations

import argparse

from ..cli import UserError
from .efficientnet import EfficientNet, EfficientNetArch, efficientnet_specs
from .entrypoints import EntryPoint
from .quantized import quantized_specs
from .weights import WeightsError, load_weights

_REGISTRY: dict[str, EntryPoint] = {name: EntryPoint(name, spec)
                                  for name, spec in {**efficientnet_specs(), **quantized_specs()}.items()}


def register(name: str, entry: EntryPoint) -> EntryPoint:
    """Add an entry point (model families living in other modules register themselves here); besides building the
    model and its `parser()`, it says its image sizes and the `preprocessing` its weights expect."""
    _REGISTRY[name] = entry
    return entry


def available_models() -> dict[str, EntryPoint]:
    """Every registered arch name with its entry point."""
    return dict(_REGISTRY)


def get_entry(arch: str) -> EntryPoint:
    """The entry point of `arch`, or a ValueError listing the valid names."""
    if arch not in _REGISTRY:
        raise UserError(f"unknown --arch {arch!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[arch]


def parse_model_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str], prog: str,
                      defaults: dict | None = None) -> None:
    """Set args.model_args from --arch's own flags among `rest` (what `parser` left), `defaults` (dest -> value)
    replacing the model's; a wrong --arch or a flag that neither parser knows is a usage error of `parser`. Shared by
    the scripts that take an arch's flags."""
    try:
        entry = get_entry(args.arch)
    except ValueError as err:
        parser.error(str(err))
    model_parser = entry.parser()
    model_parser.prog = prog
    model_parser.set_defaults(**(defaults or {}))
    args.model_args, rest = model_parser.parse_known_args(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")


# Module-level entry points: efficientnet_b0 … efficientnet_b7, efficientnet_widese_b0 … b7, efficientnet_quant_b0 … b7.
globals().update({entry.__name__: entry for entry in _REGISTRY.values()})

__all__ = ["EfficientNet", "EfficientNetArch", "EntryPoint", "WeightsError", "available_models", "get_entry",
           "load_weights", "parse_model_flags", "register"] + [entry.__name__ for entry in _REGISTRY.values()]
