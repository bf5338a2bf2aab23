"""WebDataset shard writer: every folder sample once with its label, shard sizes, index, determinism, tar layout,
unreadable sources, refusals, truncated shards, CLI exit statuses."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from image_classification.data.folder import DataError, dataset_classes, scan_split
from image_classification.data.generated import CLASS_NAMES, generate_dataset
from image_classification.data.shard_format import INDEX_FILE, SPLITS, iter_samples, read_index
from image_classification.data.shards import convert, main, summary_lines

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE = 5  # 24 train samples -> 5+5+5+5+4, 15 val -> 5+5+5


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """3 classes, 8 train and 5 val images each, 40 px."""
    return generate_dataset(tmp_path_factory.mktemp("source"), num_classes=3, train_per_class=8, val_per_class=5,
                            image_size=40, seed=0)


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("shards")
    convert(source, output, shard_size=SHARD_SIZE, seed=0, progress=False)
    return output


def shard_paths(output: Path, split: str) -> list[Path]:
    return [output / shard["name"] for shard in read_index(output)["splits"][split]["shards"]]


def split_samples(output: Path, split: str) -> list[tuple[str, dict[str, bytes]]]:
    return [sample for path in shard_paths(output, split) for sample in iter_samples(path)]


def test_every_folder_sample_is_in_its_split_once_with_the_folder_label(source, converted):
    for split in SPLITS:
        expected = Counter((Path(path).read_bytes(), label)
                           for path, label in scan_split(source, split, len(CLASS_NAMES)).samples)
        samples = split_samples(converted, split)
        assert all(set(members) == {"jpg", "cls"} for _, members in samples)
        found = Counter((members["jpg"], int(members["cls"].decode("ascii"))) for _, members in samples)
        assert found == expected
        keys = [key for key, _ in samples]
        assert len(set(keys)) == len(keys)


def test_shard_sizes_index_and_classes(source, converted):
    index = read_index(converted)
    assert index["num_classes"] == 3 and index["shard_size"] == SHARD_SIZE and index["seed"] == 0
    assert index["source"] == str(source.resolve())
    for split, total in (("train", 24), ("val", 15)):
        record = index["splits"][split]
        counts = [shard["samples"] for shard in record["shards"]]
        assert counts == [SHARD_SIZE] * (total // SHARD_SIZE) + ([total % SHARD_SIZE] if total % SHARD_SIZE else [])
        assert record["samples"] == total and record["skipped"] == 0 and record["extensions"] == ["jpg"]
        for shard, path in zip(record["shards"], shard_paths(converted, split)):
            assert shard["samples"] == len(list(iter_samples(path)))
            assert shard["bytes"] == path.stat().st_size
        assert record["bytes"] == sum(shard["bytes"] for shard in record["shards"])
    listed = {shard["name"] for record in index["splits"].values() for shard in record["shards"]}
    assert {path.name for path in converted.glob("*.tar")} == listed
    classes = (converted / "classes.txt").read_text().splitlines()
    assert classes == dataset_classes(source) == list(CLASS_NAMES[:3])


def test_members_are_adjacent_keys_have_no_dots_and_headers_are_neutral(converted):
    for path in converted.glob("*.tar"):
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        names = [member.name for member in members]
        assert len(names) % 2 == 0
        for image, label in zip(names[::2], names[1::2]):
            key = image.split(".", 1)[0]
            assert "." not in key and "/" not in key
            assert (image, label) == (f"{key}.jpg", f"{key}.cls")
        assert all((m.mtime, m.uid, m.gid, m.mode, m.uname, m.gname) == (0, 0, 0, 0o444, "", "") for m in members)
    first = split_samples(converted, "train")[:SHARD_SIZE]
    assert len({members["cls"] for _, members in first}) > 1  # shuffled at write time: classes already mixed


def tar_bytes(output: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(output.glob("*.tar"))}


def test_same_seed_is_byte_identical_and_another_seed_reorders(source, converted, tmp_path):
    again, pooled, other = tmp_path / "again", tmp_path / "pooled", tmp_path / "other"
    convert(source, again, shard_size=SHARD_SIZE, seed=0, progress=False)
    convert(source, pooled, shard_size=SHARD_SIZE, seed=0, workers=2, progress=False)  # worker processes
    convert(source, other, shard_size=SHARD_SIZE, seed=1, progress=False)
    assert tar_bytes(again) == tar_bytes(pooled) == tar_bytes(converted)
    assert (again / INDEX_FILE).read_bytes() == (converted / INDEX_FILE).read_bytes()
    for split in SPLITS:
        keys = [key for key, _ in split_samples(converted, split)]
        other_keys = [key for key, _ in split_samples(other, split)]
        assert other_keys != keys and sorted(other_keys) == sorted(keys)


def test_unreadable_sources_are_warned_about_left_out_and_counted(source, tmp_path, caplog):
    flawed = tmp_path / "flawed"
    shutil.copytree(source, flawed)
    folder = flawed / "train" / CLASS_NAMES[0]
    data = (folder / f"{CLASS_NAMES[0]}_00000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "text.JPG").write_text("not an image\n")
    with caplog.at_level(logging.WARNING):
        result = convert(flawed, tmp_path / "out", shard_size=SHARD_SIZE, progress=False)
    for name in ("truncated.jpg", "text.JPG"):
        [message] = [r.getMessage() for r in caplog.records if name in r.getMessage()]
        assert str(folder / name) in message and "left out" in message
    record = result["splits"]["train"]
    assert record["skipped"] == 2 and record["samples"] == 24
    assert [shard["samples"] for shard in record["shards"]] == [5, 5, 5, 5, 4]  # full shards all the same
    assert sorted(Path(p).name for p in result["skipped_files"]["train"]) == ["text.JPG", "truncated.jpg"]
    assert "2 unreadable files left out" in summary_lines(result, tmp_path / "out")[-1]


def test_an_output_with_shards_is_refused_without_overwrite(source, tmp_path):
    output = tmp_path / "out"
    convert(source, output, shard_size=SHARD_SIZE, progress=False)
    before = tar_bytes(output)
    with pytest.raises(DataError, match=f"{output}.*--overwrite"):
        convert(source, output, shard_size=SHARD_SIZE, seed=1, progress=False)
    assert tar_bytes(output) == before
    # Replacing with fewer shards removes the previous conversion's extra ones.
    convert(source, output, shard_size=100, seed=1, overwrite=True, progress=False)
    assert sorted(tar_bytes(output)) == ["train-000000.tar", "val-000000.tar"]
    assert read_index(output)["shard_size"] == 100


def test_a_truncated_shard_is_refused_naming_it(converted, tmp_path):
    whole = (converted / "train-000000.tar").read_bytes()
    with tarfile.open(converted / "train-000000.tar") as tar:
        second = tar.getmembers()[2].offset  # the header of the second sample: a cut between samples
    for cut in (100, second, second + 700, len(whole) - 10240):
        shard = tmp_path / f"cut-{cut}.tar"
        shard.write_bytes(whole[:cut])
        with pytest.raises(DataError, match=f"{shard}.*truncated"):
            list(iter_samples(shard))
    with pytest.raises(DataError, match=str(tmp_path / INDEX_FILE)):
        read_index(tmp_path)


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        status = main(argv)
    except SystemExit as stop:
        status = stop.code
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_exit_statuses(source, tmp_path, capsys):
    output = tmp_path / "out"
    status, out, err = run_main(["--source", str(source), "--output", str(output), "--shard-size", "10",
                                 "--workers", "0"], capsys)
    assert status == 0 and err == ""
    assert "train: 24 samples in 3 shards" in out and "val: 15 samples in 2 shards" in out
    no_val = tmp_path / "no-val"
    shutil.copytree(source / "train", no_val / "train")
    for argv, named in (
        (["--source", str(tmp_path / "missing"), "--output", str(tmp_path / "x")], tmp_path / "missing"),
        (["--source", str(no_val), "--output", str(tmp_path / "y")], no_val / "val"),
        (["--source", str(source), "--output", str(output)], output),
    ):
        status, out, err = run_main(argv + ["--workers", "0"], capsys)
        assert status == 1 and out == "" and len(err.splitlines()) == 1 and str(named) in err
    status, _, err = run_main(["--source", str(no_val), "--output", str(tmp_path / "z"), "--split", "train",
                               "--workers", "0"], capsys)
    assert status == 0 and read_index(tmp_path / "z")["splits"].keys() == {"train"}
    for bad in (["--shard-size", "0"], ["--split", "test"]):
        status, _, err = run_main(["--source", str(source), "--output", str(tmp_path / "w"), *bad], capsys)
        assert status == 2 and len(err.splitlines()) == 1


@pytest.mark.slow
def test_module_runs_as_a_program(source, tmp_path):
    result = subprocess.run([sys.executable, "-m", "image_classification.data.shards", "--source", str(source),
                             "--output", str(tmp_path / "out"), "--workers", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / INDEX_FILE).read_text())["splits"]["val"]["samples"] == 15


def test_an_interrupted_conversion_leaves_no_partial_shard_and_no_index(source, tmp_path, monkeypatch):
    from image_classification.data import shards
    written = []

    def add_then_stop(tar, key, *rest):
        if len(written) == SHARD_SIZE + 2:  # inside the second shard
            raise KeyboardInterrupt
        written.append(key)
        add_sample(tar, key, *rest)

    add_sample = shards._add_sample
    monkeypatch.setattr(shards, "_add_sample", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        convert(source, tmp_path / "out", shard_size=SHARD_SIZE, progress=False)
    assert sorted(os.listdir(tmp_path / "out")) == ["train-000000.tar"]  # complete; no temporary file left
    assert len(list(iter_samples(tmp_path / "out" / "train-000000.tar"))) == SHARD_SIZE
