"""Atomic writes (atomic.py): a killed write, a full disk and a read-only one keep the previous file."""
from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import run_args, train

from image_classification.atomic import atomic_save

ROOT = Path(__file__).resolve().parents[1]


def test_killed_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth.tar"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process is killed in the middle of the write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth.tar"]


def needs_mount_namespace() -> None:
    """Skip unless this user may mount a small tmpfs in a mount namespace of its own (unshare)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a small tmpfs")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace here: {probe.stderr.decode().strip()}")


@pytest.mark.slow
def test_full_disk_is_one_line_naming_the_file_and_keeps_the_previous_checkpoint(tmp_path):
    needs_mount_namespace()
    # The size of one checkpoint of this run, measured, then a file system with room for it but not for two.
    measure = tmp_path / "measure"
    train(run_args(measure, "--run-epochs", "1", "--training-only"))
    size = (measure / "checkpoint.pth.tar").stat().st_size
    small = tmp_path / "small"
    small.mkdir()
    command = " ".join(shlex.quote(a) for a in [sys.executable, "main.py", *run_args(small, "--training-only")])
    script = f"mount -t tmpfs -o size={size * 3 // 2} tmpfs {shlex.quote(str(small))} && {command}; " \
             f"status=$?; ls -a {shlex.quote(str(small))}; " \
             f"{sys.executable} -c \"import torch; print('epoch', torch.load('{small}/checkpoint.pth.tar', " \
             f"weights_only=True)['epoch'])\"; exit $status"
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"main.py: error: cannot write {small / 'checkpoint.pth.tar'}: no space left")
    assert re.search(r"\(\d+\.\d (KiB|MiB) free, about \d+\.\d MiB needed\); the previous file is kept", errors[0])
    listing = result.stdout.split()
    assert "checkpoint.pth.tar" in listing and not [n for n in listing if n.endswith(".tmp")]
    assert "epoch 1" in result.stdout  # the first epoch's checkpoint, intact


@pytest.mark.slow
def test_a_small_read_only_file_system_is_reported_as_read_only(tmp_path):
    needs_mount_namespace()
    train(run_args(tmp_path / "ws", "--run-epochs", "1", "--training-only"))
    small = tmp_path / "small"
    small.mkdir()
    command = shlex.join([sys.executable, "checkpoint2model.py", "--checkpoint-path",
                          str(tmp_path / "ws" / "checkpoint.pth.tar"), "--weight-path", str(small / "weights.pth")])
    # 64 KiB, less than the weights need: the free-space comparison alone would call it full.
    script = f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(small))} && mount -o remount,ro " \
             f"{shlex.quote(str(small))} && {command}"
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"checkpoint2model.py: error: cannot write {small / 'weights.pth'}: its file system is read-only; the previous "
        "file is kept"]


@pytest.mark.slow
def test_no_temporary_file_survives_a_killed_write_and_files_follow_the_umask(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    code = ("import os, signal, torch\n"
            "os.umask(0o027)\n"
            "from image_classification import atomic, checkpoint as c\n"
            f"atomic.atomic_save({{'epoch': 1}}, {str(path)!r})\n"
            f"c.write_class_names({str(tmp_path)!r}, ['a', 'b'])\n"
            "real = torch.save\n"
            "def save(obj, f, *a, **k):\n"
            "    real(obj, f, *a, **k); os.kill(os.getpid(), signal.SIGKILL)\n"
            "torch.save = save\n"
            f"atomic.atomic_save({{'epoch': 2, 'w': torch.zeros(100000)}}, {str(path)!r})\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth.tar", "classes.txt"]
    assert torch.load(path, weights_only=True)["epoch"] == 1
    for name in ("checkpoint.pth.tar", "classes.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name  # 0o666 under umask 027, as torch.save
