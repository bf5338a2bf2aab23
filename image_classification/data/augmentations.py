"""--augmentation: each policy once, with its implementation on each data backend.

A policy is one entry of POLICIES: where its transform lives for the pytorch backend (a function of (magnitude,
torchvision interpolation mode) to PIL-image transforms) and for the DALI backends (a function of (HWC uint8
images, magnitude, image size) to images), as "module:function" references imported when a loader is built. A
backend without an implementation refuses the policy in one line.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from ..cli import UserError
from ..registry import Registry


@dataclass(frozen=True)
class Policy:
    """An augmentation policy's implementations: "module:function" per backend family (None: none there)."""

    pytorch: str | None
    dali: str | None
    about: str = ""   # why a backend lacks it, for the refusal

    def implementation(self, name: str, family: str) -> Callable:
        """The policy's function for `family` ("pytorch" or "dali"); a UserError where it has none."""
        reference = getattr(self, family)
        if reference is None:
            backends = ", ".join(backend for other, backends in FAMILIES.items() if getattr(self, other)
                                 for backend in backends)
            raise UserError(f"--augmentation {name} runs on --data-backend {backends} only{self.about}; "
                            f"{' and '.join(FAMILIES[family])} take {', '.join(available(family))}")
        module, _, function = reference.partition(":")
        return getattr(importlib.import_module(module), function)


# The data backends of each implementation family.
FAMILIES = {"pytorch": ("pytorch",), "dali": ("dali-cpu", "dali-gpu")}


POLICIES: Registry[Policy] = Registry("augmentation policy", flag="--augmentation")
# The reference's AutoAugment: TensorFlow EfficientNet's policy_v0 (autoaugment.py holds it as data).
POLICIES.register("autoaugment", Policy("image_classification.data.pytorch_backend:autoaugment",
                                        "image_classification.data.dali_autoaugment:autoaugment"))
# torchvision's AutoAugment ImageNet policy (the paper's); DALI's auto_augment_image_net is policy_v0, not this.
POLICIES.register("autoaugment-paper", Policy("image_classification.data.pytorch_backend:autoaugment_paper", None,
                                              " (torchvision's AutoAugment ImageNet policy: DALI has none; its "
                                              "auto_augment_image_net is policy_v0, which --augmentation autoaugment "
                                              "runs)"))
POLICIES.register("randaugment", Policy("image_classification.data.pytorch_backend:randaugment",
                                        "image_classification.data.dali_graph:randaugment"))
POLICIES.register("trivialaugment", Policy("image_classification.data.pytorch_backend:trivialaugment",
                                           "image_classification.data.dali_graph:trivialaugment"))


def available(family: str) -> list[str]:
    """The policies that `family` ("pytorch" or "dali") implements."""
    return [name for name in POLICIES if getattr(POLICIES.get(name), family) is not None]
