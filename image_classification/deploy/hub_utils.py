"""torch.hub's `nvidia_convnets_processing_utils`: the helpers NVIDIA's published hub example calls.

    utils = torch.hub.load(repo, "nvidia_convnets_processing_utils", source="local")
    model = torch.hub.load(repo, "nvidia_efficientnet_b0", source="local").eval()
    batch = torch.cat([utils.prepare_input_from_uri(uri) for uri in uris])
    with torch.no_grad():
        probabilities = torch.softmax(model(batch), dim=1)
    results = utils.pick_n_best(predictions=probabilities, n=5)   # prints "sample 0: [(name, '93.1%'), ...]"

A URI is a local path or an http(s)/ftp URL; URLs are fetched by torch.hub's downloader, as weights are.
"""
from __future__ import annotations

import os
import tempfile
from urllib.parse import urlparse

import numpy as np
import torch

from ..context import ExecutionContext
from ..data.loader import Normalizer
from .classify import ImageError, imagenet_class_names, load_image

# The example's preprocessing: short side to 256, centre crop 224.
IMAGE_SIZE = 224
REMOTE_SCHEMES = ("http", "https", "ftp")


def _is_url(uri: str) -> bool:
    return urlparse(str(uri)).scheme in REMOTE_SCHEMES


def _load(uri: str) -> torch.Tensor:
    """uint8 [3,224,224] of a local image or of one downloaded to a temporary file; ImageError names the URI."""
    if not _is_url(uri):
        return load_image(uri, IMAGE_SIZE)
    handle, path = tempfile.mkstemp(suffix=os.path.splitext(urlparse(uri).path)[1])
    os.close(handle)
    try:
        try:
            torch.hub.download_url_to_file(uri, path, progress=False)
        except OSError as err:  # urllib's HTTPError and URLError are OSErrors
            raise ImageError(f"{uri}: download failed ({err})") from None
        try:
            return load_image(path, IMAGE_SIZE)
        except ImageError as err:
            raise ImageError(str(err).replace(path, uri)) from None
    finally:
        os.unlink(path)


class ConvNetsProcessingUtils:
    """The reference's `Processing` helpers, with the suite's image decoding and ImageNet names."""

    @staticmethod
    def prepare_input_from_uri(uri: str, cuda: bool = False) -> torch.Tensor:
        """A normalised float batch of one image, [1, 3, 224, 224], on the GPU with `cuda`."""
        batch = Normalizer(ExecutionContext())(_load(uri).unsqueeze(0))  # ImageNet mean and std, as classify.py
        return batch.cuda() if cuda else batch

    @staticmethod
    def pick_n_best(predictions: torch.Tensor, n: int = 5) -> list[list[tuple[str, str]]]:
        """Per sample, the n most probable (ImageNet name, "12.3%") pairs, best first; each sample's list is printed."""
        probabilities = predictions.float().cpu().numpy()
        names = ConvNetsProcessingUtils.get_imgnet_classes()
        results = []
        for index, row in enumerate(probabilities):
            best = np.argsort(-row, kind="stable")[:n]
            result = [(str(names[c]), f"{100 * row[c]:.1f}%") for c in best]
            print(f"sample {index}: {result}")
            results.append(result)
        return results

    @staticmethod
    def get_imgnet_classes() -> np.ndarray:
        """The 1000 ImageNet class names in index order (the reference's LOC_synset_mapping.json)."""
        return np.array(imagenet_class_names())
