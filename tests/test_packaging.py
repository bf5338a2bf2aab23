"""`pip install -e .` into a fresh virtual environment: the console scripts exist and run the package's mains."""
from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["efficientnet-train", "efficientnet-quant-train", "efficientnet-launch", "efficientnet-multiproc",
           "efficientnet-classify", "efficientnet-export", "efficientnet-checkpoint2model"]


@pytest.mark.slow
def test_pip_install_editable_gives_the_console_scripts(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The fresh environment sees this one's packages through a .pth file (torch is several GB: not installed
    # again); the project itself is installed on its own, as `pip install -e .` does.
    packages = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                              capture_output=True, text=True).stdout.strip()
    Path(packages, "parent-environment.pth").write_text(site.getsitepackages()[0] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-build-isolation", "--no-index", "-e", str(ROOT)], capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    for name in SCRIPTS:
        assert (venv / "bin" / name).is_file(), name
    train = subprocess.run([str(venv / "bin" / "efficientnet-train"), "--help"], capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
    assert train.returncode == 0 and train.stdout.startswith("usage: efficientnet-train "), train.stderr
    assert "--config FILE.yaml" in train.stdout and "--tensorboard DIR" in train.stdout
    bad = subprocess.run([str(venv / "bin" / "efficientnet-quant-train"), "-b", "0"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("efficientnet-quant-train: error: argument -b/--batch-size")
    # The package the scripts run is this checkout's (editable), not a copy.
    where = subprocess.run([str(python), "-c", "import image_classification; print(image_classification.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert where.stdout.strip() == str(ROOT / "image_classification" / "__init__.py")


def test_multiproc_runs_an_installed_command_without_python(tmp_path, monkeypatch):
    from image_classification.multiproc import build_parser, torchrun_argv
    command = tmp_path / "efficientnet-train"
    command.write_text("#!/bin/sh\n")
    command.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    argv = torchrun_argv(build_parser().parse_args(["--nproc_per_node", "2", "efficientnet-train", "/data", "-b", "8"]))
    assert argv[-5:] == ["--no-python", str(command), "/data", "-b", "8"]
    with pytest.raises(SystemExit, match="no-such-command: no such file or command"):
        torchrun_argv(build_parser().parse_args(["no-such-command"]))
