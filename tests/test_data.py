"""Data pipelines: batch format, transform geometry, backend agreement, sharding, exact resume, bad input,
folder rules, 16-bit images."""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import prefork
from image_classification.context import ExecutionContext
from image_classification.data import (BACKENDS, MEAN, STD, DataError, build_train_loader, build_val_loader)
from image_classification.data.folder import scan_split, shard_indices
from image_classification.data.generated import CLASS_NAMES, generate_dataset
from image_classification.data.generated import main as generated_main

ROOT = Path(__file__).resolve().parents[1]
FILE_BACKENDS = ("pytorch", "dali-cpu")
CPU = ExecutionContext()
NHWC = ExecutionContext(memory_format=torch.channels_last)
# pytorch and dali-cpu decode JPEGs with libjpeg-turbo; the val tests' 48 px images are upscaled (to 64 for
# S=32), where torchvision's antialiased resize and the reference's DALI resize (no antialiasing) filter alike:
# measured mean |difference| ~0.004 and max ~0.02 in normalised units (~1 gray level at most). Downscaled
# images differ more, as the reference's two backends do (tests/test_parity_augment.py pins DALI's pixels).
VAL_AGREEMENT_MEAN, VAL_AGREEMENT_MAX = 0.01, 0.05


def loader(kind: str, backend: str, data, *, size: int = 32, batch: int = 4, ctx=CPU, **options):
    build = build_train_loader if kind == "train" else build_val_loader
    options.setdefault("workers", 0 if backend == "pytorch" else 1)
    return build(backend, str(data), image_size=size, batch_size=batch, ctx=ctx, num_classes=10, seed=0, **options)


def epoch(data_loader, number: int = 0, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data_loader.set_epoch(number, skip_batches=skip)
    return list(data_loader)


def write_image(path: Path, size: tuple[int, int], colour=(128, 128, 128), mode: str = "RGB", fmt: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format=fmt)


@pytest.fixture(scope="session")
def gray(tmp_path_factory) -> Path:
    """Uniform 128-gray images of several sizes (PNG, so decoding is exact)."""
    root = tmp_path_factory.mktemp("gray")
    for split in ("train", "val"):
        for name in ("a", "b"):
            for i, size in enumerate([(40, 60), (70, 50), (33, 33), (90, 45)]):
                write_image(root / split / name / f"{i}.png", size)
    return root


def bomb_png() -> bytes:
    """A PNG of a few dozen bytes whose header claims 30000x30000 pixels: Pillow refuses it at open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 30001))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def bad(tmp_path_factory) -> Path:
    """Every kind of awkward input beside good images, 16 files per split; the unreadable ones are listed in BAD."""
    root = tmp_path_factory.mktemp("bad")
    for split in ("train", "val"):
        folder = root / split
        for i in range(7):
            write_image(folder / "good" / f"{i}.jpg", (50 + i, 40), (30 * i, 90, 200))
        good_bytes = (folder / "good" / "0.jpg").read_bytes()
        (folder / "odd" / "truncated.jpg").parent.mkdir(parents=True)
        (folder / "odd" / "truncated.jpg").write_bytes(good_bytes[: len(good_bytes) // 2])
        (folder / "odd" / "zero.JPG").write_bytes(b"")
        (folder / "odd" / "text.jpeg").write_text("not an image at all\n")
        (folder / "odd" / "bomb.png").write_bytes(bomb_png())
        (folder / "odd" / "notes.txt").write_text("ignored: not an image extension\n")
        write_image(folder / "odd" / "picture.png", (64, 48), (10, 200, 10))
        write_image(folder / "odd" / "gray.jpg", (50, 50), 100, mode="L")
        write_image(folder / "odd" / "cmyk.jpg", (50, 50), (0, 100, 200, 0), mode="CMYK")
        write_image(folder / "odd" / "huge.jpg", (3000, 2000), (250, 250, 0))
        write_image(folder / "odd" / "tiny.jpg", (1, 1), (0, 0, 250))
    return root


BAD = {"truncated.jpg", "zero.JPG", "text.jpeg", "bomb.png"}


# --- batch format -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FILE_BACKENDS)
@pytest.mark.parametrize("kind", ["train", "val"])
@pytest.mark.parametrize("ctx", [CPU, NHWC], ids=["nchw", "nhwc"])
def test_batches_are_normalised_float_in_the_memory_format(gray, backend, kind, ctx):
    batches = epoch(loader(kind, backend, gray, ctx=ctx))
    expected = ((128 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    assert len(batches) == 2
    for images, labels in batches:
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and labels.shape == (4,)
        assert images.is_contiguous(memory_format=ctx.memory_format)
        torch.testing.assert_close(images, expected.expand_as(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("ctx", [CPU, NHWC], ids=["nchw", "nhwc"])
def test_synthetic_batches(ctx):
    train = build_train_loader("synthetic", None, image_size=24, batch_size=3, ctx=ctx, num_classes=7, seed=1)
    assert train.classes == [str(i) for i in range(7)] and len(train) == 100
    batches = epoch(train, 0, skip=98)
    assert len(batches) == 2
    images, labels = batches[0]
    assert images.shape == (3, 3, 24, 24) and images.is_contiguous(memory_format=ctx.memory_format)
    assert labels.dtype == torch.int64 and int(labels.max()) < 7


def test_loader_attributes(generated):
    train, val = loader("train", "pytorch", generated, batch=5), loader("val", "pytorch", generated, batch=4)
    assert train.classes == val.classes == sorted(CLASS_NAMES[:3])
    assert (train.num_samples, len(train), train.batch_size) == (24, 4, 5)  # last partial batch dropped
    assert (val.num_samples, len(val)) == (15, 4)  # ... but kept for validation
    assert [len(b[1]) for b in epoch(val)] == [4, 4, 4, 3]


# --- transforms -------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def ramp(tmp_path_factory) -> Path:
    """A 120x60 image whose red channel is 2*x: the val geometry can be read off the output."""
    root = tmp_path_factory.mktemp("ramp")
    pixels = np.zeros((60, 120, 3), np.uint8)
    pixels[..., 0] = 2 * np.arange(120)[None, :]
    for split in ("train", "val"):
        (root / split / "c").mkdir(parents=True)
        Image.fromarray(pixels).save(root / split / "c" / "ramp.png")
    return root


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_val_geometry_is_resize_short_side_plus_32_then_centre_crop(ramp, backend):
    images, _ = epoch(loader("val", backend, ramp, size=32, batch=1))[0]
    red = images[0, 0, 16] * STD[0] + MEAN[0]
    # short side 60 -> 64, long side 120 -> 128, centre crop 32 starts at column 48 of the resized image
    source_x = (48 + torch.arange(32) + 0.5) * 120 / 128 - 0.5
    torch.testing.assert_close(red, 2 * source_x, atol=1.5, rtol=0)


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_train_crop_is_a_resized_piece_of_the_image(ramp, backend):
    batches = epoch(loader("train", backend, ramp, size=16, batch=1, workers=1), 3)
    for images, _ in batches:
        red = images[0, 0] * STD[0] + MEAN[0]
        assert images.shape == (1, 3, 16, 16)
        # A crop of a horizontal ramp, possibly mirrored: each row is monotonic, all rows alike.
        row = red[8]
        steps = row[1:] - row[:-1]
        assert bool((steps >= -1.5).all()) or bool((steps <= 1.5).all())
        torch.testing.assert_close(red, row.expand_as(red), atol=2.0, rtol=0)


def test_pytorch_and_dali_agree_on_validation(generated):
    outputs = [torch.cat([images for images, _ in epoch(loader("val", backend, generated, batch=8))])
               for backend in FILE_BACKENDS]
    difference = (outputs[0] - outputs[1]).abs()
    assert float(difference.mean()) < VAL_AGREEMENT_MEAN
    assert float(difference.max()) < VAL_AGREEMENT_MAX


@pytest.mark.parametrize(("backend", "augmentation"),
                         [(backend, augmentation) for backend in FILE_BACKENDS
                          for augmentation in ("autoaugment", "randaugment", "trivialaugment")]
                         + [("pytorch", "autoaugment-paper")])
def test_augmentation_policies_run(generated, backend, augmentation):
    batches = epoch(loader("train", backend, generated, batch=8, augmentation=augmentation, randaug_magnitude=15))
    assert len(batches) == 3
    for images, labels in batches:
        assert images.shape == (8, 3, 32, 32) and bool(torch.isfinite(images).all())


# --- order, sharding, resume ------------------------------------------------------------------------------

def test_shards_are_disjoint_and_cover_the_data():
    for shuffle, equal in [(False, False), (True, True)]:
        shards = [shard_indices(23, epoch=2, seed=5, rank=r, world_size=3, shuffle=shuffle, equal_shards=equal)
                  for r in range(3)]
        flat = [i for shard in shards for i in shard]
        assert len(flat) == len(set(flat))
        if equal:  # training: equal shards, at most world_size - 1 left out per epoch
            assert {len(s) for s in shards} == {7} and len(set(range(23)) - set(flat)) == 2
        else:
            assert sorted(flat) == list(range(23))


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_val_loaders_of_all_ranks_see_every_image_once(generated, backend):
    labels = []
    for rank in range(2):
        ctx = ExecutionContext(rank=rank, world_size=2)
        val = loader("val", backend, generated, batch=3, ctx=ctx)
        assert val.num_samples == (8 if rank == 0 else 7)
        labels += [label for _, batch_labels in epoch(val) for label in batch_labels.tolist()]
    assert sorted(labels) == sorted([0] * 5 + [1] * 5 + [2] * 5)


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_set_epoch_repeats_and_skip_batches_skips_exactly(generated, backend):
    train = loader("train", backend, generated, batch=4)
    first, again = epoch(train, 1), epoch(train, 1)
    skipped = epoch(train, 1, skip=2)
    assert len(first) == len(train) == 6 and len(skipped) == 4
    for (a, la), (b, lb) in zip(first, again):
        assert torch.equal(la, lb) and torch.equal(a, b)
    assert [l.tolist() for _, l in skipped] == [l.tolist() for _, l in first[2:]]
    if backend == "pytorch":  # pixels too: augmentation is seeded per (seed, epoch, sample)
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(skipped, first[2:]))
    other = epoch(train, 2)
    assert [l.tolist() for _, l in other] != [l.tolist() for _, l in first]


def test_both_backends_use_the_same_epoch_order(generated):
    orders = [[l.tolist() for _, l in epoch(loader("train", backend, generated, batch=4), 3)]
              for backend in FILE_BACKENDS]
    assert orders[0] == orders[1]


def test_pytorch_batches_do_not_depend_on_worker_count(generated):
    results = [epoch(loader("train", "pytorch", generated, batch=4, workers=w), 1) for w in (0, 2)]
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(*results))


def stop_after(data_loader, number: int, taken: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate epoch `number` as the training loop does and stop after `taken` batches; the generator is dropped."""
    data_loader.set_epoch(number)
    batches = []
    for batch in itertools.islice(data_loader, len(data_loader)):
        batches.append(batch)
        if len(batches) == taken:
            break
    return batches


def assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for (images, labels), (want_images, want_labels) in zip(actual, expected):
        assert torch.equal(labels, want_labels) and torch.equal(images, want_images)


@pytest.mark.parametrize(("backend", "workers"), [("pytorch", 0), ("pytorch", 2), ("dali-cpu", 2)],
                         ids=["pytorch-w0", "pytorch-w2", "dali-cpu"])
@pytest.mark.parametrize("augmentation", [None, "autoaugment"])
def test_resume_mid_epoch_continues_with_the_uninterrupted_batches(generated, tmp_path, backend, workers,
                                                                  augmentation):
    def build():
        return loader("train", backend, generated, size=16, batch=4, workers=workers, augmentation=augmentation)

    uninterrupted = build()
    expected, expected_next = epoch(uninterrupted, 1), epoch(uninterrupted, 2)
    uninterrupted.close()
    interrupted = build()
    taken = stop_after(interrupted, 1, 3)
    torch.save(interrupted.state_dict(), tmp_path / "loader.pt")  # as in a checkpoint
    interrupted.close()
    resumed = build()  # as in a new process
    resumed.load_state_dict(torch.load(tmp_path / "loader.pt", weights_only=True))
    assert_same_batches(taken + epoch(resumed, 1, skip=3), expected)
    assert_same_batches(epoch(resumed, 2), expected_next)
    resumed.close()


@pytest.fixture(scope="session")
def flawed(tmp_path_factory) -> Path:
    """14 generated images (so that random crops show) and 2 unreadable files per split."""
    root = generate_dataset(tmp_path_factory.mktemp("flawed"), num_classes=2, train_per_class=7, val_per_class=7,
                            image_size=48, seed=0)
    for split in ("train", "val"):
        folder = root / split / CLASS_NAMES[0]
        data = (folder / f"{CLASS_NAMES[0]}_00000.jpg").read_bytes()
        (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
        (folder / "text.jpg").write_text("not an image\n")
    return root


def test_dali_resume_is_exact_across_decode_failures(flawed):
    # A truncated file makes DALI fail and the loader rebuild its pipeline; the resumed run must agree about
    # where that happened (same epoch) and that it does not happen again (next epoch).
    def build():
        return loader("train", "dali-cpu", flawed, size=16, batch=2)

    uninterrupted = build()
    expected = epoch(uninterrupted, 1)
    expected_count = uninterrupted.epoch_bad_files
    expected_next = epoch(uninterrupted, 2)
    for taken in (1, 3):  # resuming at the batch that fails in epoch 1 (batch 1), and after it
        interrupted = build()
        batches = stop_after(interrupted, 1, taken)
        resumed = build()
        resumed.load_state_dict(interrupted.state_dict())
        assert_same_batches(batches + epoch(resumed, 1, skip=taken), expected)
        assert resumed.epoch_bad_files == expected_count == 2  # the batches before the resume count too
        assert_same_batches(epoch(resumed, 2), expected_next)


def global_rng_states() -> tuple:
    return torch.get_rng_state(), pickle.dumps(np.random.get_state()), random.getstate()


@pytest.mark.parametrize("workers", [0, 2])
def test_pytorch_loader_leaves_the_global_random_generators_alone(generated, workers):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    before = global_rng_states()
    data = loader("train", "pytorch", generated, size=16, batch=4, workers=workers)
    for number in (0, 1):  # a first and a second iterator (persistent workers are reset, not recreated)
        data.set_epoch(number)
        batches = iter(data)
        for _ in range(3):
            next(batches)
    data.close()
    after = global_rng_states()
    assert torch.equal(after[0], before[0]) and after[1:] == before[1:]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_pytorch_workers_ignore_stop_signals_and_close_still_stops_them(generated, signum):
    data = loader("train", "pytorch", generated, size=16, batch=4, workers=2)
    expected = epoch(loader("train", "pytorch", generated, size=16, batch=4, workers=0), 0)
    data.set_epoch(0)
    batches = iter(data)
    taken = [next(batches), next(batches)]  # one from each worker: both have started
    workers = list(data.loader._iterator._workers)
    for worker in workers:
        os.kill(worker.pid, signum)  # as a scheduler signals the whole process group
    assert_same_batches(taken + list(batches), expected)
    closing = threading.Thread(target=data.close, daemon=True)
    closing.start()
    closing.join(timeout=60)
    assert not closing.is_alive() and not any(worker.is_alive() for worker in workers)


@pytest.mark.slow
def test_a_process_that_fails_with_live_loader_workers_still_exits(generated):
    # The exception's traceback keeps the loader and its workers alive until interpreter exit, where
    # multiprocessing joins its children after a SIGTERM that our workers ignore: without closing the loaders
    # first, the process (a run that stopped on an error) never exited.
    code = ("from image_classification.context import ExecutionContext\n"
            "from image_classification.data import build_train_loader\n"
            f"data = build_train_loader('pytorch', {str(generated)!r}, image_size=16, batch_size=4, "
            "ctx=ExecutionContext(), workers=2, seed=0)\n"
            "data.set_epoch(0)\n"
            "batches = iter(data)\n"
            "next(batches)\n"
            "raise RuntimeError('the run failed')\n")
    # A process of its own, not a tests/prefork.py child: the exit under test is the interpreter's.
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "the run failed" in result.stderr


# --- bad input --------------------------------------------------------------------------------------------

def warnings_naming(caplog, name: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if name in record.getMessage()]


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_training_replaces_unreadable_images_warns_once_and_counts_them(bad, backend, caplog):
    data = loader("train", backend, bad, size=24, batch=2)  # 16 files: every one is in each epoch
    assert data.classes == ["good", "odd"]
    with caplog.at_level(logging.WARNING):
        batches = epoch(data)
        first_count = data.epoch_bad_files
        again = epoch(data)
    assert len(batches) == len(again) == len(data) == 8
    assert all(len(labels) == len(images) == 2 for images, labels in batches + again)  # full batches
    assert {Path(p).name for p in data.bad_files} == BAD
    assert first_count == data.epoch_bad_files == len(BAD)  # per epoch, not cumulative
    for name in BAD:
        [message] = warnings_naming(caplog, name)  # once, naming the file
        assert "replaced" in message
    assert "pixels" in warnings_naming(caplog, "bomb.png")[0]  # refused for its size, not left to the decoder
    for images, labels in batches:
        assert bool(torch.isfinite(images).all()) and set(labels.tolist()) <= {0, 1}


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_validation_drops_unreadable_images(bad, backend, caplog):
    data = loader("val", backend, bad, size=24, batch=2)
    samples = scan_split(bad, "val", 10).samples
    readable = [label for path, label in samples if Path(path).name not in BAD]
    # The readable images of each batch of two, in dataset order; a batch without any is not yielded.
    sizes = [sum(Path(path).name not in BAD for path, _ in samples[i:i + 2]) for i in range(0, len(samples), 2)]
    with caplog.at_level(logging.WARNING):
        batches = epoch(data)
    assert len(data) == 8 and 0 in sizes
    assert [len(labels) for _, labels in batches] == [size for size in sizes if size]
    assert all(len(images) == len(labels) for images, labels in batches)
    assert [label for _, labels in batches for label in labels.tolist()] == readable  # each readable image once
    assert data.epoch_bad_files == len(BAD)
    for name in BAD:
        [message] = warnings_naming(caplog, name)
        assert "left out" in message


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_epoch_bad_files_counts_this_epoch_and_rank(bad, backend):
    totals = 0
    for rank in range(2):
        val = loader("val", backend, bad, size=24, batch=2, ctx=ExecutionContext(rank=rank, world_size=2))
        epoch(val)
        totals += val.epoch_bad_files
        val.set_epoch(1)
        assert val.epoch_bad_files == 0  # reset by set_epoch
    assert totals == len(BAD)  # the validation shards cover every file once
    train = loader("train", backend, bad, size=24, batch=2)
    order = shard_indices(16, epoch=3, seed=0, rank=0, world_size=1, shuffle=True, equal_shards=True)
    samples = scan_split(bad, "train", 10).samples
    epoch(train, 3, skip=5)
    assert train.epoch_bad_files == sum(Path(samples[i][0]).name in BAD for i in order[10:])
    synthetic = build_train_loader("synthetic", None, image_size=8, batch_size=2, ctx=CPU, num_classes=3, seed=0)
    epoch(synthetic)
    assert synthetic.epoch_bad_files == 0 and synthetic.bad_files == []


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_unusable_folders_fail_at_build_time_naming_the_path(tmp_path, backend):
    with pytest.raises(DataError, match="does not exist"):
        loader("train", backend, tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        loader("val", backend, tmp_path / "file")
    write_image(tmp_path / "data" / "train" / "a" / "0.png", (8, 8))
    write_image(tmp_path / "data" / "train" / "a" / "1.png", (8, 8))
    with pytest.raises(DataError, match=str(tmp_path / "data" / "val")):
        loader("val", backend, tmp_path / "data")
    with pytest.raises(DataError, match=str(tmp_path / "empty" / "train")):
        (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
        loader("train", backend, tmp_path / "empty")
    with pytest.raises(DataError, match="fewer than one batch"):
        loader("train", backend, tmp_path / "data", batch=4)


def test_unknown_choices_name_the_flag(generated):
    with pytest.raises(ValueError, match="--data-backend.*pytorch, dali-cpu, dali-gpu, synthetic"):
        loader("train", "tfrecord", generated)
    with pytest.raises(ValueError, match="--augmentation.*autoaugment, autoaugment-paper, randaugment, trivialaugment"):
        loader("train", "pytorch", generated, augmentation="mixmatch")
    with pytest.raises(ValueError, match="--interpolation"):
        loader("val", "pytorch", generated, interpolation="lanczos")
    with pytest.raises(DataError, match="--num_classes 2"):
        build_val_loader("pytorch", str(generated), image_size=8, batch_size=2, ctx=CPU, num_classes=2)
    assert BACKENDS == ("pytorch", "dali-cpu", "dali-gpu", "synthetic")


def test_dali_gpu_without_a_gpu_says_to_use_dali_cpu(generated):
    with pytest.raises(ValueError, match="dali-gpu needs a CUDA GPU.*dali-cpu"):
        loader("train", "dali-gpu", generated)


# --- folder layout ----------------------------------------------------------------------------------------

def test_folder_scan_follows_imagefolder(tmp_path, caplog):
    from torchvision.datasets import ImageFolder
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    train = root / "train"
    for name in ["cat/b.png", "cat/a.JPG", "cat/sub/deeper/c.png", "cat/sub-2/d.png", "cat/sub/e.webp"]:
        write_image(train / name, (8, 8))
    (train / "cat" / "notes.txt").write_text("not an image\n")
    for name in ["dogs/f.png", "dogs/x/g.png", "more/h.png"]:
        write_image(elsewhere / name, (8, 8))
    (train / "dog").symlink_to(elsewhere / "dogs", target_is_directory=True)  # a linked class folder
    (train / "cat" / "linked").symlink_to(elsewhere / "more", target_is_directory=True)  # a linked subfolder
    write_image(root / "val" / "cat" / "v.png", (8, 8))
    reference = ImageFolder(str(train))
    with caplog.at_level(logging.WARNING, logger="image_classification.data.folder"):
        index = scan_split(root, "train", 10)
    assert index.classes == reference.classes == ["cat", "dog"]
    assert index.samples == reference.samples and len(index.samples) == 8
    # The linked subfolder is followed, as ImageFolder does, and named: its images become cats.
    assert [r.getMessage() for r in caplog.records] == [
        f"{train / 'cat' / 'linked'} is a link to {elsewhere / 'more'}, outside its class folder {train / 'cat'}: "
        "its images are labelled as cat"]
    # A symlink back to a folder above it would make os.walk descend until the path is too long.
    (train / "cat" / "sub" / "loop").symlink_to(train / "cat", target_is_directory=True)
    caplog.clear()
    assert scan_split(root, "train", 10).samples == reference.samples
    assert len(caplog.records) == 1  # the loop is not followed, so not warned about; the linked subfolder again


def test_a_link_from_a_class_folder_up_to_the_split_is_followed_with_a_warning_naming_it(tmp_path, caplog):
    train = tmp_path / "train"
    for name in ["cat/a.png", "dog/b.png"]:
        write_image(train / name, (8, 8))
    (train / "cat" / "everything").symlink_to(train, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="image_classification.data.folder"):
        index = scan_split(tmp_path, "train", 10)
    assert [r.getMessage() for r in caplog.records] == [
        f"{train / 'cat' / 'everything'} is a link to {train}, outside its class folder {train / 'cat'}: its images "
        "are labelled as cat"]
    assert (str(train / "cat" / "everything" / "dog" / "b.png"), 0) in index.samples  # a dog labelled cat, as said


def test_class_folders_without_images_are_an_error_naming_them(tmp_path):
    write_image(tmp_path / "train" / "a" / "0.png", (8, 8))
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "c" / "sub").mkdir(parents=True)
    (tmp_path / "train" / "c" / "notes.txt").write_text("not an image\n")
    write_image(tmp_path / "val" / "a" / "0.png", (8, 8))
    write_image(tmp_path / "val" / "d" / "0.png", (8, 8))
    split = re.escape(str(tmp_path / "train"))
    with pytest.raises(DataError, match=f"^{split} has class folders without images: b, c "):
        scan_split(tmp_path, "train", 10)
    # A class that one split lacks altogether is fine: classes are the union of both splits' folders.
    assert scan_split(tmp_path, "val", 10).classes == ["a", "b", "c", "d"]


# --- 16-bit images ----------------------------------------------------------------------------------------

def gray16(path: Path, side: int) -> np.ndarray:
    """A 16-bit grayscale PNG ramp over the whole 0..65535 range; returns its expected 8-bit values."""
    values = (np.arange(side * side, dtype=np.int64) * 65535 // (side * side - 1)).reshape(side, side)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    return np.round(values / 257)


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_16bit_images_are_scaled_to_8bit_not_clipped(tmp_path, backend):
    expected = gray16(tmp_path / "val" / "c" / "ramp.png", 48)
    # Validation at 16 px: 48 px is already S + 32, so no resize; the centre crop starts at 16.
    images, _ = epoch(loader("val", backend, tmp_path, size=16, batch=1))[0]
    pixels = (images[0] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)).numpy()
    assert np.abs(pixels - expected[None, 16:32, 16:32]).max() <= 1.01


# --- generated dataset and bench --------------------------------------------------------------------------

def test_generated_dataset_is_deterministic_and_readable(tmp_path, generated):
    again = generate_dataset(tmp_path / "again", num_classes=3, train_per_class=8, val_per_class=5, image_size=48,
                             seed=0)
    files = sorted(p.relative_to(generated) for p in generated.rglob("*.jpg"))
    assert len(files) == 3 * 13
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.jpg"))
    assert all((generated / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = generate_dataset(tmp_path / "other", num_classes=3, train_per_class=8, val_per_class=5, image_size=48,
                             seed=1)
    assert (other / files[0]).read_bytes() != (generated / files[0]).read_bytes()
    assert sorted(p.name for p in (generated / "train").iterdir()) == ["circle", "square", "triangle"]
    assert Image.open(generated / files[0]).size == (48, 48)


def test_generated_cli(tmp_path, capsys):
    assert generated_main(["--output", str(tmp_path / "d"), "--classes", "2", "--train-per-class", "1",
                           "--val-per-class", "1", "--image-size", "16"]) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        generated_main(["--output", str(tmp_path / "e"), "--classes", "99"])
    assert exc.value.code == 2 and "--classes: must be an integer in [1, 10], got 99" in capsys.readouterr().err


def test_transfer_class_set_draws_ten_other_classes(tmp_path, capsys):
    assert generated_main(["--output", str(tmp_path / "t"), "--class-set", "transfer", "--train-per-class", "2",
                           "--val-per-class", "1", "--image-size", "32"]) == 0
    names = sorted(p.name for p in (tmp_path / "t" / "train").iterdir())
    assert len(names) == 10 and not set(names) & set(CLASS_NAMES)
    assert all(len(list((tmp_path / "t" / "val" / name).glob("*.jpg"))) == 1 for name in names)
    again = generate_dataset(tmp_path / "again", num_classes=10, train_per_class=2, val_per_class=1, image_size=32,
                             class_set="transfer")
    assert all(f.read_bytes() == (again / f.relative_to(tmp_path / "t")).read_bytes()
               for f in (tmp_path / "t").rglob("*.jpg"))
    with pytest.raises(SystemExit) as exc:
        generated_main(["--output", str(tmp_path / "u"), "--class-set", "imagenet"])
    assert exc.value.code == 2 and "--class-set: invalid choice: 'imagenet'" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_quick_runs():
    result = prefork.run([sys.executable, "bench/bench_data.py", "--quick"], cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"pytorch"' in result.stdout and '"imagefolder-baseline"' in result.stdout
