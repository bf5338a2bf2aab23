"""DALI with every --augmentation policy it runs and every --interpolation: one training batch each (the policies'
geometric operations have their own filters), torchvision's policy refused naming the flag, and a pipeline failure
that no file caused surfaces at once."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("nvidia.dali")

from image_classification.context import ExecutionContext  # noqa: E402
from image_classification.data import INTERPOLATIONS, build_train_loader  # noqa: E402
from image_classification.data import dali_backend, dali_graph  # noqa: E402
from image_classification.data.generated import generate_dataset  # noqa: E402

NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="dali-gpu needs a CUDA GPU")
DALI_BACKENDS = ["dali-cpu", pytest.param("dali-gpu", marks=NO_GPU)]
SIZE, BATCH, CLASSES = 24, 4, 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("tiny"), num_classes=CLASSES, train_per_class=4, val_per_class=1,
                            image_size=32, seed=0)


def context(backend: str) -> ExecutionContext:
    return ExecutionContext(device=torch.device("cuda" if backend == "dali-gpu" else "cpu"))


def train_loader(data: Path, backend: str, **options):
    return build_train_loader(backend, str(data), image_size=SIZE, batch_size=BATCH, ctx=context(backend),
                              num_classes=CLASSES, workers=1, seed=0, **options)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("augmentation", (None, *dali_graph.DALI_AUGMENTATIONS), ids=str)
@pytest.mark.parametrize("backend", DALI_BACKENDS)
def test_every_policy_trains_with_every_interpolation(tiny, backend, augmentation, interpolation):
    loader = train_loader(tiny, backend, augmentation=augmentation, interpolation=interpolation)
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    assert images.shape == (BATCH, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert bool(torch.isfinite(images).all()) and float(images.std()) > 0
    assert labels.shape == (BATCH,) and set(labels.tolist()) <= set(range(CLASSES))


def test_torchvisions_policy_is_refused_naming_the_flag(tiny):
    with pytest.raises(ValueError, match="--augmentation autoaugment-paper .*--data-backend pytorch only"):
        train_loader(tiny, "dali-cpu", augmentation="autoaugment-paper")


def test_a_failure_no_file_caused_surfaces_without_probing_files(tiny, monkeypatch):
    # The defect this replaces: a cubic warp_affine (what the policies got with --interpolation bicubic), whose
    # error the loader blamed on the batch's files, building a one-image pipeline per file before raising.
    from nvidia.dali import fn, types

    def cubic_warp(images, *args, **kwargs):
        return fn.warp_affine(images, matrix=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], interp_type=types.INTERP_CUBIC)

    monkeypatch.setattr(dali_graph, "_augment", cubic_warp)
    calls = []
    for name in ("_pipeline", "_decodes"):  # the epoch's pipelines, and the one-image probes of files
        method = getattr(dali_backend.DaliLoader, name)
        monkeypatch.setattr(dali_backend.DaliLoader, name,
                            lambda self, *args, name=name, method=method, **kwargs:
                            calls.append(name) or method(self, *args, **kwargs))
    loader = train_loader(tiny, "dali-cpu", augmentation="autoaugment")
    loader.set_epoch(0)
    with pytest.raises(RuntimeError, match="warp_affine"):
        next(iter(loader))
    assert calls == ["_pipeline"] and loader.bad_files == []
