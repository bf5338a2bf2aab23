"""Training and validation from WebDataset shards: the folder's samples and labels, rank split, per-epoch order,
exact resume (loader and main.py), damaged shards, backend agreement, --data-format detection."""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import shutil
import signal
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

import prefork
from image_classification import models
from image_classification.arguments import build_parser, parse_args, parse_config
from image_classification.context import ExecutionContext
from image_classification.data import DataError, build_train_loader, build_val_loader, scan_data
from image_classification.data.folder import scan_split, shard_size
from image_classification.data.shard_format import INDEX_FILE, read_index
from image_classification.data.shards import convert
from image_classification.data.shard_reader import resolve_format, scan_shards
from image_classification.launcher import build_args

import tiny_model

ROOT = Path(__file__).resolve().parents[1]
CPU = ExecutionContext()
SHARD_SIZE = 5  # the generated 24 train samples -> 5+5+5+5+4, 15 val -> 5+5+5


@pytest.fixture(scope="module")
def shards(generated, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("shards")
    convert(generated, output, shard_size=SHARD_SIZE, seed=0, progress=False)
    return output


def loader(kind: str, backend: str, data, *, size: int = 32, batch: int = 4, ctx=CPU, **options):
    build = build_train_loader if kind == "train" else build_val_loader
    options.setdefault("workers", 0 if backend == "pytorch" else 1)
    return build(backend, str(data), image_size=size, batch_size=batch, ctx=ctx, num_classes=10, seed=0, **options)


def epoch(data_loader, number: int = 0, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data_loader.set_epoch(number, skip_batches=skip)
    return list(data_loader)


def labels_of(batches) -> list[list[int]]:
    return [labels.tolist() for _, labels in batches]


# --- the same samples as the folder ---------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "val"])
def test_shards_hold_the_folder_samples_with_the_folder_labels(generated, shards, split):
    index = scan_shards(shards, split, 10)
    folder = scan_split(generated, split, 10)
    assert index.classes == folder.classes
    found = Counter((index.read(i), label) for i, (_, label) in enumerate(index.samples))
    assert found == Counter((Path(path).read_bytes(), label) for path, label in folder.samples)
    order = index.epoch_order(epoch=0, seed=0, rank=0, world_size=1, shuffle=split == "train",
                              equal_shards=split == "train")
    assert sorted(order) == list(range(len(folder.samples)))


def test_validation_batches_equal_the_folder_ones_image_for_image(generated, shards):
    # The same transform and normalisation: every (pixels, label) of the folder pass is in the shard pass.
    def images(data):
        return Counter((hashlib.sha1(image.numpy().tobytes()).hexdigest(), label)
                       for images, labels in epoch(loader("val", "pytorch", data, batch=4))
                       for image, label in zip(images, labels.tolist()))
    assert images(shards) == images(generated)


# --- rank split and order -------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3, 7])  # 7 ranks: more ranks than the 5 train shards
def test_ranks_read_disjoint_equal_shares(shards, world_size):
    index = scan_shards(shards, "train", 10)
    n = len(index.samples)
    for train in (True, False):
        orders = [index.epoch_order(epoch=4, seed=1, rank=rank, world_size=world_size, shuffle=train,
                                    equal_shards=train) for rank in range(world_size)]
        flat = [i for order in orders for i in order]
        assert len(flat) == len(set(flat))  # no sample twice in an epoch
        assert [len(order) for order in orders] == [
            shard_size(n, rank=rank, world_size=world_size, equal_shards=train) for rank in range(world_size)]
        if train:
            assert len(flat) == n - n % world_size
        else:
            assert sorted(flat) == list(range(n))  # validation scores every sample once
    if world_size == 2:  # each rank reads about half the shards: a contiguous stretch of the shuffled shards
        shard_of = {i: shard for shard in range(5) for i in range(*index.shard_starts[shard:shard + 2])}
        for rank in range(2):
            order = index.epoch_order(epoch=4, seed=1, rank=rank, world_size=2, shuffle=True, equal_shards=True)
            assert len({shard_of[i] for i in order}) <= 3


def test_order_is_a_function_of_seed_and_epoch(shards):
    index = scan_shards(shards, "train", 10)

    def order(seed, number):
        return index.epoch_order(epoch=number, seed=seed, rank=0, world_size=2, shuffle=True, equal_shards=True)
    assert order(0, 1) == order(0, 1) == scan_shards(shards, "train", 10).epoch_order(
        epoch=1, seed=0, rank=0, world_size=2, shuffle=True, equal_shards=True)
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)
    assert set(order(0, 1)) != set(order(0, 2))  # the rank reads other shards in another epoch


def test_two_rank_loaders_share_the_epoch_without_overlap(shards):
    labels = []
    for rank in range(2):
        train = loader("train", "pytorch", shards, batch=3, ctx=ExecutionContext(rank=rank, world_size=2))
        assert len(train) == 4  # 24 samples, 12 per rank
        labels.append(Counter(label for batch in labels_of(epoch(train, 2)) for label in batch))
    assert sum(labels, Counter()) == Counter({0: 8, 1: 8, 2: 8})


def test_pytorch_and_dali_read_the_same_labels_in_the_same_order(shards):
    train = [labels_of(epoch(loader("train", backend, shards), 3)) for backend in ("pytorch", "dali-cpu")]
    val = [labels_of(epoch(loader("val", backend, shards))) for backend in ("pytorch", "dali-cpu")]
    assert train[0] == train[1] and val[0] == val[1]


# --- exact resume ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("backend", "workers"), [("pytorch", 0), ("pytorch", 2), ("dali-cpu", 1)],
                         ids=["pytorch-w0", "pytorch-w2", "dali-cpu"])  # w2: reads in worker processes
def test_loader_resumes_mid_epoch_with_the_uninterrupted_batches(shards, tmp_path, backend, workers):
    def build():
        return loader("train", backend, shards, size=16, batch=4, workers=workers)

    uninterrupted = build()
    expected = epoch(uninterrupted, 1)
    uninterrupted.close()
    interrupted = build()
    interrupted.set_epoch(1)
    taken = list(itertools.islice(interrupted, 2))
    torch.save(interrupted.state_dict(), tmp_path / "loader.pt")
    interrupted.close()
    resumed = build()
    resumed.load_state_dict(torch.load(tmp_path / "loader.pt", weights_only=True))
    actual = taken + epoch(resumed, 1, skip=2)
    resumed.close()
    assert len(actual) == len(expected) == 6
    for (images, labels), (want_images, want_labels) in zip(actual, expected):
        assert torch.equal(labels, want_labels) and torch.equal(images, want_images)


def shard_run(data: Path, workspace: Path, *extra: str) -> list[str]:
    """A tiny BN-free model trained from shards: 2 epochs of 6 batches of 4."""
    return [str(data), "--arch", tiny_model.NAME, "--data-backend", "pytorch", "--image-size", "16", "-b", "4",
            "--num_classes", "3", "--workers", "0", "--epochs", "2", "--seed", "3", "--mixup", "0.2",
            "--lr", "0.05", "--workspace", str(workspace), *extra]


def train(argv: list[str]) -> dict:
    from image_classification.train import run
    return run(parse_config(argv))


def test_main_resumed_from_shards_mid_epoch_equals_the_uninterrupted_run(shards, tmp_path, monkeypatch):
    from image_classification.train import epoch as training
    monkeypatch.setitem(models._REGISTRY, tiny_model.NAME, tiny_model.TinyEntry())
    full, split = tmp_path / "full", tmp_path / "split"
    train(shard_run(shards, full))
    real_step, calls = training.train_step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6 + 2:  # epoch 1, during its second batch
            signal.raise_signal(signal.SIGTERM)
        return real_step(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(training, "train_step", step)
        assert train(shard_run(shards, split))["interrupted"]
    saved = torch.load(split / "checkpoint.pth.tar", weights_only=True)
    assert (saved["epoch"], saved["iteration"]) == (1, 2)
    train(shard_run(shards, split, "--resume", str(split / "checkpoint.pth.tar")))
    expected = torch.load(full / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    resumed = torch.load(split / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)


def test_resume_on_shards_listing_the_classes_in_another_order_is_refused(shards, tmp_path, monkeypatch):
    """Class i must stay class i: the checkpoint records the class names, --resume compares them, and the
    workspace's classes.txt (which classify.py reads) is left as the run wrote it."""
    monkeypatch.setitem(models._REGISTRY, tiny_model.NAME, tiny_model.TinyEntry())
    workspace = tmp_path / "ws"
    train(shard_run(shards, workspace, "--epochs", "1"))
    checkpoint = workspace / "checkpoint.pth.tar"
    classes = torch.load(checkpoint, weights_only=True)["classes"]
    assert classes == (shards / "classes.txt").read_text().split()
    reordered = tmp_path / "reordered"
    shutil.copytree(shards, reordered)
    (reordered / "classes.txt").write_text("".join(f"{name}\n" for name in reversed(classes)))
    written = (workspace / "classes.txt").read_text()
    with pytest.raises(ValueError) as refused:
        train(shard_run(reordered, workspace, "--resume", str(checkpoint)))
    assert str(refused.value) == (f"--resume {checkpoint}: the data's classes are not those the checkpoint was trained "
                                  f"on (class 0 is {classes[-1]!r}, in the checkpoint {classes[0]!r}); resume on the "
                                  "data it was trained on")
    assert (workspace / "classes.txt").read_text() == written


# --- damaged shards -------------------------------------------------------------------------------------------

def member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path) as tar:
        return {member.name: (member.offset_data, member.size) for member in tar}


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture(scope="module")
def damaged(shards, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the shards where each split has a garbage image (shard 0, sample 1), a .cls that is not a number
    (shard 1, sample 0) and a shard cut in the middle of its sample 2's image (shard 2). Returns the folder and,
    per split, the bad samples' names and the truncated shard."""
    root = tmp_path_factory.mktemp("damaged")
    for path in shards.iterdir():
        shutil.copy(path, root / path.name)
    bad = {}
    for split in ("train", "val"):
        paths = [root / shard["name"] for shard in read_index(root)["splits"][split]["shards"]]
        members = [list(member_offsets(path).items()) for path in paths[:3]]  # image, cls, image, cls, ...
        garbage, (offset, size) = members[0][2]
        overwrite(paths[0], offset, b"\x00garbage" * (size // 8))
        unlabelled, (offset, _) = members[1][0][0], members[1][1][1]
        overwrite(paths[1], offset, b"x")
        cut, (offset, size) = members[2][4]
        with open(paths[2], "r+b") as f:
            f.truncate(offset + size // 2)
        bad[split] = ([f"{paths[0]}:{garbage}", f"{paths[1]}:{unlabelled}", f"{paths[2]}:{cut}"], str(paths[2]))
    return root, bad


@pytest.mark.parametrize("backend", ["pytorch", "dali-cpu"])
def test_damaged_samples_are_replaced_in_training_and_dropped_in_validation(damaged, backend, caplog):
    root, bad = damaged
    with caplog.at_level(logging.WARNING):
        train = loader("train", backend, root, batch=4)
        val = loader("val", backend, root, batch=4)
        train_batches, val_batches = epoch(train), epoch(val)
    messages = [record.getMessage() for record in caplog.records]
    for split in ("train", "val"):
        assert any(bad[split][1] in m and "truncated" in m for m in messages)
    # 24 train samples, 2 lost with the truncated shard's end: 22 read, 3 of them bad, each replaced.
    assert len(train) == 5 and all(len(labels) == 4 for labels in labels_of(train_batches))
    assert train.epoch_bad_files == 3 and sorted(train.bad_files) == sorted(bad["train"][0])
    for name in bad["train"][0]:
        [message] = [m for m in messages if name in m and "unreadable" in m]  # warned once, naming shard:key
        assert "replaced" in message
    # 15 val samples, 2 lost: 13 read, 3 bad and left out.
    assert sum(len(labels) for labels in labels_of(val_batches)) == 10 and val.epoch_bad_files == 3
    for name in bad["val"][0]:
        assert any(name in m and "left out" in m for m in messages)
    assert any("not a class index" in m for m in messages)


# --- --data-format --------------------------------------------------------------------------------------------

def test_data_format_detection_and_one_line_errors(generated, shards, tmp_path):
    assert resolve_format(generated, "auto") == "folder" and resolve_format(shards, "auto") == "shards"
    assert len(scan_data(shards, "val", 10, "shards").samples) == 15
    with pytest.raises(DataError, match="holds tar shards.*--data-format shards"):
        scan_data(shards, "train", 10, "folder")
    with pytest.raises(DataError, match="holds class folders.*--data-format folder"):
        scan_data(generated, "train", 10, "shards")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(shards / "train-000000.tar", unfinished)
    with pytest.raises(DataError, match=f"{INDEX_FILE} is missing"):
        scan_data(unfinished, "train", 10, "auto")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither"):
        scan_data(tmp_path / "empty", "train", 10, "auto")
    with pytest.raises(DataError, match="has 3 classes but the model has --num_classes 2"):
        scan_data(shards, "train", 2)
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    record = read_index(broken)
    record["splits"]["val"]["shards"] = "val-000000.tar"
    (broken / INDEX_FILE).write_text(json.dumps(record))
    with pytest.raises(DataError, match=f"{INDEX_FILE}: the val split's shard list is not"):
        scan_data(broken, "val", 10)
    record["splits"]["val"] = read_index(shards)["splits"]["val"]
    (broken / INDEX_FILE).write_text(json.dumps(record))
    (broken / "val-000001.tar").unlink()
    with pytest.raises(DataError, match="val-000001.tar is missing \\(1 of the 3 val shards"):
        scan_data(broken, "val", 10)
    del record["splits"]["val"]
    (broken / INDEX_FILE).write_text(json.dumps(record))
    with pytest.raises(DataError, match="has no val split"):
        scan_data(broken, "val", 10)


@pytest.mark.slow
def test_data_format_flag_reaches_main_and_launch(shards):
    assert "--data-format {auto,folder,shards}" in build_parser().format_help()  # main.py -h, quant_main.py -h
    assert parse_args([str(shards)]).data_format == "auto"
    assert parse_args([str(shards), "--data-format", "shards"]).data_format == "shards"
    launched = build_args(["--model", "efficientnet-b0", "--precision", "FP32", "--mode", "convergence",
                           "--platform", "CPU", str(shards), "--data-format", "shards"])
    assert launched.data_format == "shards"
    result = prefork.run([sys.executable, "main.py", str(ROOT / "no-such-data"), "--data-format", "shards",
                          "--data-backend", "pytorch", "--epochs", "1"], cwd=ROOT, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"main.py: error: data folder {ROOT / 'no-such-data'} does not exist"]


def test_tars_with_pax_headers_and_folders_are_read_as_tarfile_reads_them(shards, tmp_path):
    # Another writer's shard: pax headers (a key longer than ustar's 100 characters), a folder member, keys in
    # a subfolder. The index falls back to tarfile's walk and finds the same samples with the same bytes.
    source = scan_shards(shards, "val", 10)
    key = "sub/" + "k" * 120
    path = tmp_path / "val-000000.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        folder = tarfile.TarInfo("sub")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for number in range(3):
            for name, data in ((f"{key}{number}.JPG", source.read(number)),
                               (f"{key}{number}.cls", f"{source.samples[number][1]}\n".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shutil.copy(shards / "classes.txt", tmp_path)
    index = read_index(shards)
    index["splits"] = {"val": {"shards": [{"name": path.name, "samples": 3}]}}
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    found = scan_shards(tmp_path, "val", 10)
    assert [name for name, _ in found.samples] == [f"{path}:{key}{number}.JPG" for number in range(3)]
    assert [found.read(i) for i in range(3)] == [source.read(i) for i in range(3)]
    assert found.labels == source.labels[:3]


@pytest.mark.parametrize(("data", "label"), [(b"2", 2), (b"0002\n", 2), (b"3", -1), (b"-1", -1), (b"2.0", -1),
                                             (b"", -1), (b"\xd9\xa2", -1)])
def test_a_label_is_ascii_decimal_and_a_class_index(data, label):
    from image_classification.data.shard_reader import _parse_label
    found, problem = _parse_label(data, 3)
    assert found == label and bool(problem) == (label == -1)
