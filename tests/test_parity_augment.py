"""The reference's recipes train on the same augmented images: our AutoAugment (policy_v0) and DALI geometry
against what the reference's own code computes, stored in tests/fixtures/parity_augment.npz by
tests/fixtures/make_parity_fixtures.py (the reference is not needed here).

pytorch: every operation and the seeded policy give the reference's pixels exactly. dali-cpu: every operation
exactly, but equalize (DALI's formula, see dali_autoaugment.py); rotate exactly on the fixture image and at
224 px on all but a pixel or two (float32 source coordinates); validation crops and seeded training crops
exactly."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import parity_images
from image_classification.data import autoaugment
from image_classification.data.pytorch_backend import train_transform

FIXTURES = np.load(Path(__file__).resolve().parent / "fixtures" / "parity_augment.npz")
OPERATION_CASES = sorted(key for key in FIXTURES.files if key.startswith("op/"))
VAL_CASES = sorted({tuple(key.split("/")[1:3]) for key in FIXTURES.files if key.startswith("val/")})

# DALI's equalize maps by OpenCV's formula, Pillow's by another (dali_autoaugment.py); measured on the fixture
# image, whose channels have about 60 levels each (the gap grows with the share of the most frequent ones):
# mean 3.8/255, at most 21/255 (the image left as it is differs from Pillow's equalization by a mean of 20).
EQUALIZE_MEAN, EQUALIZE_MAX = 4.0, 21


def operation_case(key: str) -> tuple[str, int, int]:
    _, name, magnitude_bin, sign = key.split("/")
    return name, int(magnitude_bin), int(sign)


def operation_image() -> np.ndarray:
    return parity_images.structured_image(*parity_images.OPERATION_SIZE)


# --- the policy table ------------------------------------------------------------------------------------

def test_the_policy_is_the_references_25_sub_policies():
    names, probabilities = FIXTURES["policy/names"], FIXTURES["policy/probabilities"]
    bins, magnitudes = FIXTURES["policy/bins"], FIXTURES["policy/magnitudes"]
    assert len(autoaugment.SUB_POLICIES) == len(names) == 25
    for row, sub_policy in enumerate(autoaugment.SUB_POLICIES):
        for column, (name, probability, magnitude_bin) in enumerate(sub_policy):
            assert (name, probability, magnitude_bin) == (names[row, column], probabilities[row, column],
                                                          bins[row, column])
            value = autoaugment.magnitude(name, magnitude_bin)
            # the reference's table holds 0 for operations without a magnitude
            assert (0.0 if value is None else value) == magnitudes[row, column]
    assert set(names.ravel()) == set(autoaugment.OPERATIONS)


# --- pytorch backend: Pillow as the reference ------------------------------------------------------------

@pytest.mark.parametrize("key", OPERATION_CASES)
def test_pytorch_operation_gives_the_references_pixels(key):
    name, magnitude_bin, sign = operation_case(key)
    image = autoaugment.apply(Image.fromarray(operation_image()), name, magnitude_bin, sign)
    np.testing.assert_array_equal(np.asarray(image), FIXTURES[key])


def test_pytorch_policy_with_the_same_random_draws_gives_the_references_images():
    image = Image.fromarray(parity_images.structured_image(*parity_images.POLICY_SIZE))
    policy = autoaugment.PolicyV0()
    seeds, expected = FIXTURES["policy/seeds"], FIXTURES["policy/outputs"]
    for seed, want in zip(seeds, expected):  # one seed per sub-policy
        random.seed(int(seed))
        np.testing.assert_array_equal(np.asarray(policy(image)), want, err_msg=f"random.seed({seed})")


def test_pytorch_training_transform_runs_the_policy_after_the_crop_and_the_flip():
    steps = [type(step).__name__ for step in train_transform(32, "bicubic", "autoaugment").transforms]
    assert steps == ["RandomResizedCrop", "RandomHorizontalFlip", "PolicyV0", "PILToTensor"]
    paper = [type(step).__name__ for step in train_transform(32, "bicubic", "autoaugment-paper").transforms]
    assert paper[2] == "AutoAugment"


# --- dali-cpu --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dali():
    return pytest.importorskip("nvidia.dali")


def run_pipeline(graph, batch_size: int = 1, seed: int = 0) -> list:
    """The outputs of one iteration of a CPU pipeline defined by `graph()`, as lists of numpy arrays."""
    from nvidia.dali import pipeline_def
    pipe = pipeline_def(graph, batch_size=batch_size, num_threads=1, device_id=None, seed=seed)()
    pipe.build()
    outputs = pipe.run()
    return [[np.array(sample) for sample in output] for output in outputs]


def dali_operations(cases: list[tuple[str, int, int]], images: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Each (operation, bin, sign) of dali_autoaugment applied to `images` (all of one size)."""
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug.core import signed_bin

    from image_classification.data.dali_autoaugment import augmentations
    height, width = images[0].shape[:2]
    operations = augmentations(width, height)

    def graph():
        batch = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        outputs = []
        for name, magnitude_bin, sign in cases:
            if name in autoaugment.SIGNED:
                magnitude_bin = signed_bin(magnitude_bin, random_sign=types.Constant(np.int32(sign < 0), device="cpu"))
            elif name not in autoaugment.MAGNITUDES:
                magnitude_bin = None
            outputs.append(operations[name](batch, magnitude_bin=magnitude_bin,
                                            num_magnitude_bins=autoaugment.NUM_MAGNITUDE_BINS))
        return tuple(outputs)

    return run_pipeline(graph, batch_size=len(images))


@pytest.fixture(scope="module")
def dali_operation_outputs(dali) -> dict[str, np.ndarray]:
    """Every fixture case through its DALI operation, in one pipeline."""
    outputs = dali_operations([operation_case(key) for key in OPERATION_CASES], [operation_image()])
    return {key: output[0] for key, output in zip(OPERATION_CASES, outputs)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("key", OPERATION_CASES)
def test_dali_operation_gives_the_references_pixels(dali_operation_outputs, key):
    ours, want = dali_operation_outputs[key].astype(int), FIXTURES[key].astype(int)
    if operation_case(key)[0] == "equalize":
        difference = np.abs(ours - want)
        assert difference.mean() <= EQUALIZE_MEAN and difference.max() <= EQUALIZE_MAX
    else:
        np.testing.assert_array_equal(ours, want)


@pytest.mark.timeout(120)
def test_dali_rotation_at_the_training_size_takes_pillows_pixels_but_for_one_or_two(dali):
    # Pillow's 16.16 fixed-point source coordinates in DALI's float32: a neighbouring source pixel now and then.
    size = 224
    image = parity_images.structured_image(size, size)
    angles = sorted({magnitude_bin for sub_policy in autoaugment.SUB_POLICIES
                     for name, probability, magnitude_bin in sub_policy if name == "rotate" and magnitude_bin})
    cases = [("rotate", magnitude_bin, sign) for magnitude_bin in angles for sign in (1, -1)]
    for case, output in zip(cases, dali_operations(cases, [image])):
        want = np.asarray(autoaugment.apply(Image.fromarray(image), *case))
        assert int((output[0] != want).any(axis=-1).sum()) <= 2, case


def test_dali_policy_is_the_table_without_its_never_run_operations(dali):
    from image_classification.data.dali_autoaugment import policy
    built = policy(32, 32)
    assert built.num_magnitude_bins == autoaugment.NUM_MAGNITUDE_BINS
    assert len(built.sub_policies) == len(autoaugment.SUB_POLICIES)
    for ours, table in zip(built.sub_policies, autoaugment.SUB_POLICIES):
        expected = [(name, probability, magnitude_bin if name in autoaugment.MAGNITUDES else None)
                    for name, probability, magnitude_bin in table if probability > 0]
        assert [(operation.name, probability, magnitude_bin) for operation, probability, magnitude_bin in ours] \
            == expected


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("size", "interpolation"), VAL_CASES, ids="-".join)
def test_dali_validation_crop_is_the_references(dali, tmp_path, size, interpolation):
    from image_classification.context import ExecutionContext
    from image_classification.data import MEAN, STD, build_val_loader
    folder = tmp_path / "val" / "photo"
    folder.mkdir(parents=True)
    (folder / "image.png").write_bytes(parity_images.png_bytes(parity_images.structured_image(
        *parity_images.VAL_SIZE)))
    loader = build_val_loader("dali-cpu", str(tmp_path), image_size=int(size), batch_size=1, ctx=ExecutionContext(),
                              num_classes=1, workers=1, interpolation=interpolation, seed=0)
    loader.set_epoch(0)
    (images, _), = list(loader)
    pixels = images[0] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    crop = pixels.round().to(torch.uint8).permute(1, 2, 0).numpy()
    stored = FIXTURES[f"val/{size}/{interpolation}/pixels"]
    np.testing.assert_array_equal(crop[::4, ::4], stored)
    assert hashlib.sha256(crop.tobytes()).hexdigest() == str(FIXTURES[f"val/{size}/{interpolation}/sha256"])


@pytest.mark.timeout(120)
def test_dali_training_crop_draws_the_references_windows(dali):
    # The same pipeline seed gives the crop operator the same seed, so equal pixels mean the same windows (the
    # elongated image fails most attempts: an attempt count other than the reference's 100 falls back to the
    # centre crop in other draws) and the same resize (no antialiasing).
    from nvidia.dali import fn, types

    from image_classification.data.dali_graph import random_resized_crop
    want = FIXTURES["train/crops"]
    sources = [np.frombuffer(parity_images.png_bytes(parity_images.structured_image(*size)), dtype=np.uint8)
               for size in parity_images.TRAIN_SIZES]
    batch = [sources[i % len(sources)] for i in range(len(want))]

    def graph():
        images = fn.decoders.image(fn.external_source(source=lambda: batch, batch=True), output_type=types.RGB)
        return random_resized_crop(images, want.shape[1], types.INTERP_LINEAR)

    crops, = run_pipeline(graph, batch_size=len(batch), seed=12)
    np.testing.assert_array_equal(np.stack(crops), want)
