"""DALI backend internals that the shared data tests cannot see: dali-cpu's uint8 batches normalised on the run's
device (the path of GPU runs, exercised here on the CPU), exact resume when the device runs a batch ahead, and
validation pipelines kept across passes."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

pytest.importorskip("nvidia.dali")

from image_classification.context import ExecutionContext  # noqa: E402
from image_classification.data import build_train_loader, build_val_loader  # noqa: E402
from image_classification.data import dali_backend  # noqa: E402
from image_classification.data.generated import CLASS_NAMES, generate_dataset  # noqa: E402
from image_classification.data.loader import Normalizer, device_batches  # noqa: E402

CPU = ExecutionContext()
NHWC = ExecutionContext(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def flawed_val(tmp_path_factory) -> Path:
    """10 validation images, a truncated JPEG and a text file."""
    root = generate_dataset(tmp_path_factory.mktemp("flawed"), num_classes=2, train_per_class=2, val_per_class=5,
                            image_size=48, seed=0)
    folder = root / "val" / CLASS_NAMES[0]
    good = (folder / f"{CLASS_NAMES[0]}_00000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "text.jpg").write_text("not an image\n")
    return root


def loader(kind: str, data: Path, *, ctx=CPU, size: int = 16, batch: int = 4, **options):
    build = build_train_loader if kind == "train" else build_val_loader
    return build("dali-cpu", str(data), image_size=size, batch_size=batch, ctx=ctx, num_classes=3, workers=1, seed=0,
                 **options)


def epoch(data_loader, number: int = 0, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data_loader.set_epoch(number, skip_batches=skip)
    return list(data_loader)


def assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for (images, labels), (want_images, want_labels) in zip(actual, expected):
        assert torch.equal(labels, want_labels) and torch.equal(images, want_images)


@pytest.fixture
def uint8_on_device(monkeypatch) -> list[torch.dtype]:
    """Make dali-cpu loaders built from now on take the GPU run's path: uint8 out of DALI, normalised by
    device_batches. Returns the dtypes of the host batches device_batches received."""
    received = []

    def recording(host_batches, ctx, *normalization):
        def batches():
            for images, labels in host_batches:
                received.append(images.dtype)
                yield images, labels
        return device_batches(batches(), ctx, *normalization)

    monkeypatch.setattr(dali_backend, "normalizes_in_pipeline", lambda gpu, ctx: False)
    monkeypatch.setattr(dali_backend, "device_batches", recording)
    return received


@pytest.mark.parametrize("kind", ["train", "val"])
@pytest.mark.parametrize("ctx", [CPU, NHWC], ids=["nchw", "nhwc"])
def test_uint8_batches_normalised_on_the_device_equal_dalis_normalisation(generated, kind, ctx, request):
    normalised_by_dali = epoch(loader(kind, generated, ctx=ctx), 1)
    received = request.getfixturevalue("uint8_on_device")
    normalised_on_device = epoch(loader(kind, generated, ctx=ctx), 1)
    assert received == [torch.uint8] * len(normalised_on_device)
    assert len(normalised_on_device) == len(normalised_by_dali) == (6 if kind == "train" else 4)
    for (images, labels), (want_images, want_labels) in zip(normalised_on_device, normalised_by_dali):
        assert images.dtype == torch.float32 and images.is_contiguous(memory_format=ctx.memory_format)
        assert torch.equal(labels, want_labels)
        torch.testing.assert_close(images, want_images, atol=1e-5, rtol=0)  # the same crops, flips and pixels


def one_batch_ahead(host_batches, ctx, *normalization):
    """device_batches as on a GPU (it takes batch i+1 from the pipeline before handing out batch i), on the CPU."""
    normalize = Normalizer(ctx, *normalization)
    iterator = iter(host_batches)
    pending = next(iterator, None)
    while pending is not None:
        ready, pending = pending, next(iterator, None)
        yield normalize(ready[0]), ready[1]


def test_resume_is_exact_when_the_device_runs_a_batch_ahead(generated, tmp_path, uint8_on_device, monkeypatch):
    # The pipeline has made one batch more than the consumer has taken: the saved DALI state must be that of
    # the last batch handed out, not of the pipeline's latest.
    monkeypatch.setattr(dali_backend, "device_batches", one_batch_ahead)
    uninterrupted = loader("train", generated)
    expected, expected_next = epoch(uninterrupted, 1), epoch(uninterrupted, 2)
    interrupted = loader("train", generated)
    interrupted.set_epoch(1)
    taken = list(itertools.islice(interrupted, 3))
    torch.save(interrupted.state_dict(), tmp_path / "loader.pt")
    resumed = loader("train", generated)
    resumed.load_state_dict(torch.load(tmp_path / "loader.pt", weights_only=True))
    assert_same_batches(taken + epoch(resumed, 1, skip=3), expected)
    assert_same_batches(epoch(resumed, 2), expected_next)


@pytest.fixture
def pipelines_built(monkeypatch) -> list[bool]:
    """One entry (whether it is a training pipeline) for each pipeline a DaliLoader builds from now on."""
    built = []
    build = dali_backend.DaliLoader._pipeline

    def counting(self, *args, **kwargs):
        built.append(self.train)
        return build(self, *args, **kwargs)

    monkeypatch.setattr(dali_backend.DaliLoader, "_pipeline", counting)
    return built


def test_validation_passes_reuse_one_pipeline(generated, pipelines_built):
    val = loader("val", generated, batch=4)
    first = epoch(val, 0)
    assert len(first) == 4 and pipelines_built == [False]
    val.set_epoch(1)
    # As validate() reads it: exactly len(loader) batches, so the generator never sees the end of the pass.
    assert_same_batches(list(itertools.islice(val, len(val))), first)
    assert_same_batches(epoch(val, 2), first)
    assert pipelines_built == [False]
    val.set_epoch(3)
    assert_same_batches(list(itertools.islice(val, 1)), first[:1])  # --prof: a pass stopped early ...
    assert_same_batches(epoch(val, 4), first)  # ... leaves its pipeline mid-way: the next pass builds one
    assert_same_batches(epoch(val, 5), first)
    assert pipelines_built == [False, False]


def test_training_builds_a_pipeline_per_epoch(generated, pipelines_built):
    # Its random draws are seeded per epoch (see DaliLoader._start): an epoch repeats exactly.
    train = loader("train", generated)
    assert_same_batches(epoch(train, 1), epoch(train, 1))
    assert pipelines_built == [True, True]


def test_validation_reuse_after_a_decode_failure(flawed_val):
    val = loader("val", flawed_val, batch=3)
    passes = [(epoch(val, number), val.epoch_bad_files) for number in range(3)]
    assert sorted(path.rsplit("/", 1)[-1] for path in val.bad_files) == ["text.jpg", "truncated.jpg"]
    (first, bad), *others = passes
    assert bad == 2 and sum(len(labels) for _, labels in first) == 10
    for batches, count in others:
        assert count == bad
        assert_same_batches(batches, first)


# --- no DALI threads for a forked DataLoader worker to wait for ----------------------------------------------

def live_pipelines() -> int:
    from nvidia.dali import Pipeline
    return sum(1 for ref in list(Pipeline._pipes) if ref() is not None)


@pytest.mark.parametrize("kind", ["train", "val"])
def test_pipelines_are_shut_down_when_a_loader_is_done_with_them(generated, kind):
    """A whole epoch, an epoch stopped early (--prof, a signal) and close(): no pipeline left running, so no forked
    worker can inherit one to finalize; a loader dropped without close() frees its pipeline at once."""
    before = live_pipelines()
    data_loader = loader(kind, generated)
    epoch(data_loader)
    assert live_pipelines() - before == (1 if kind == "val" else 0)  # validation keeps its pipeline for the next pass
    data_loader.set_epoch(1)
    batches = iter(data_loader)
    next(batches)
    del batches  # the consumer stopped after one batch
    data_loader.close()
    assert live_pipelines() == before
    epoch(data_loader)
    del data_loader  # dropped without close(): nothing keeps its pipeline alive in a reference cycle
    assert live_pipelines() == before


DEADLOCK = """
import gc, os, sys
from nvidia.dali import fn, pipeline_def, types
from image_classification.context import ExecutionContext
from image_classification.data import build_train_loader

@pipeline_def(batch_size=2, num_threads=2, device_id=None)
def graph():
    return fn.random.uniform(shape=[4], dtype=types.FLOAT)

class Holder:  # a pipeline in a reference cycle: only the garbage collector frees it
    pass
holder = Holder()
holder.pipe, holder.me = graph(), holder
holder.pipe.build()
holder.pipe.run()
del holder
gc.disable()  # the garbage survives until the fork ...
os.register_at_fork(after_in_child=gc.collect)  # ... and the child collects it, as a worker's allocations may
loader = build_train_loader("pytorch", sys.argv[1], image_size=16, batch_size=4, ctx=ExecutionContext(),
                            num_classes=3, workers=2, seed=0)
loader.set_epoch(0)
print("batches", sum(1 for _ in loader))
loader.close()
"""


@pytest.mark.slow
def test_dataloader_workers_survive_a_dropped_dali_pipeline(generated):
    """The hang of issue 25: a process holding an unreferenced DALI pipeline forks DataLoader workers, whose garbage
    collector finalizes it and waits for DALI threads that do not exist in the child. The workers start from a
    forkserver instead, and the epoch completes."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", DEADLOCK, str(generated)], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batches 6" in done.stdout
