"""Registry entry points: build a named model, optionally with NGC, packaged or local weights, and its CLI parser."""
from __future__ import annotations

import argparse
from dataclasses import asdict

from torch import nn

from ..cli import UserError
from ..preprocessing import Preprocessing
from .efficientnet import ModelSpec
from .weights import load_pretrained, load_weights, packaged_weights


class EntryPoint:
    """Callable that builds one registered architecture: `entry(pretrained=False, pretrained_from_file=None, **params)`."""

    def __init__(self, name: str, spec: ModelSpec):
        self.name = name
        self.spec = spec
        # Public so a deployment (or a test) can point --pretrained at a mirror of the NGC file.
        self.pretrained_url = spec.pretrained_url
        self.__name__ = name.replace("-", "_")
        self.__doc__ = f"Build {name} (default input {spec.arch.default_image_size}px)."

    @property
    def has_pretrained(self) -> bool:
        """Whether --pretrained has weights to load: NVIDIA's NGC file, or a weights package's file."""
        return self.pretrained_url is not None or self.spec.pretrained_package is not None

    @property
    def preprocessing(self) -> Preprocessing:
        """The normalisation and resize filter the arch's weights expect (classify.py, data loaders, exports)."""
        return self.spec.preprocessing

    @property
    def default_image_size(self) -> int:
        """Training input size."""
        return self.spec.arch.default_image_size

    @property
    def default_eval_image_size(self) -> int:
        """Evaluation input size (larger than the training size for EfficientNetV2)."""
        return self.spec.arch.default_eval_image_size

    def __call__(self, pretrained: bool = False, pretrained_from_file: str | None = None,
                 reset_classifier: bool = False, **model_params) -> nn.Module:
        params = asdict(self.spec.params)
        unknown = sorted(set(model_params) - set(params))
        if unknown:
            raise TypeError(f"{self.name}: unknown model parameters {unknown}; valid: {sorted(params)}")
        params.update(model_params)
        model = self.spec.build(self.spec.arch, **params)
        if pretrained and pretrained_from_file:
            raise UserError("give either --pretrained or --pretrained-from-file, not both")
        if pretrained:
            if not self.has_pretrained:
                raise UserError(f"{self.name} has no published NGC weights; use --pretrained-from-file")
            if self.pretrained_url is not None:
                load_pretrained(model, self.pretrained_url, reset_classifier=reset_classifier)
            else:
                load_weights(model, packaged_weights(self.spec.pretrained_package), reset_classifier=reset_classifier,
                             arch=self.name)
        elif pretrained_from_file:
            load_weights(model, pretrained_from_file, reset_classifier=reset_classifier, arch=self.name)
        return model

    def parser(self) -> argparse.ArgumentParser:
        """The model flags (reference names), plus the weight-loading flags."""
        p = self.spec.params.parser(self.name)
        p.add_argument("--pretrained-from-file", default=None, metavar="PATH",
                       help="load weights from a state dict or a training checkpoint")
        if self.pretrained_url is not None:
            p.add_argument("--pretrained", action="store_true",
                           help="load NVIDIA's published weights (downloaded once to the torch hub cache)")
        elif self.spec.pretrained_package is not None:
            p.add_argument("--pretrained", action="store_true",
                           help="load the ImageNet weights that the installed package "
                                f"{self.spec.pretrained_package.split('==')[0]} ships (nothing is downloaded)")
        p.add_argument("--reset-classifier", action="store_true",
                       help="with pretrained weights for another class count: keep all but classifier.fc, "
                            "which is freshly initialised (fine-tuning)")
        return p

    def __repr__(self) -> str:
        return f"EntryPoint({self.name!r})"
