"""checkpoint2model.py: plain weights out of a training checkpoint, raw or EMA."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from image_classification.models import get_entry

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "checkpoint2model.py"), *args], capture_output=True, text=True)


def test_extracts_raw_and_ema_weights(tmp_path):
    model = get_entry("efficientnet-b0")(num_classes=4)
    raw = {f"module.{k}": v for k, v in model.state_dict().items()}
    ema = {k: v.float() + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 2, "best_prec1": 42.0, "state_dict": raw, "state_dict_ema": ema, "optimizer": {}}, ckpt)

    result = run("--checkpoint-path", str(ckpt), "--weight-path", str(tmp_path / "raw.pth"))
    assert result.returncode == 0, result.stderr
    assert "42.0" in result.stdout
    weights = torch.load(tmp_path / "raw.pth", weights_only=True)
    assert list(weights) == list(model.state_dict())
    torch.testing.assert_close(weights["stem.conv.weight"], model.stem.conv.weight)

    assert run("--checkpoint-path", str(ckpt), "--weight-path", str(tmp_path / "ema.pth"), "--ema").returncode == 0
    ema_weights = torch.load(tmp_path / "ema.pth", weights_only=True)
    torch.testing.assert_close(ema_weights["stem.conv.weight"], model.stem.conv.weight + 1)
    get_entry("efficientnet-b0")(num_classes=4, pretrained_from_file=str(tmp_path / "ema.pth"))


def test_ema_flag_without_ema_weights_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 1, "best_prec1": 0.0, "state_dict": {"w": torch.zeros(1)}}, ckpt)
    result = run("--checkpoint-path", str(ckpt), "--weight-path", str(tmp_path / "out.pth"), "--ema")
    assert result.returncode == 1
    assert "--use-ema" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.pth").exists()
